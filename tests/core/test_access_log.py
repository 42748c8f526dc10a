"""Core's access log: one line per request, without the body or the Authorization header; and
the users' personal data masked in Core's log lines unless LOG_PII."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import httpx
import pytest
import structlog
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.core.app import create_app
from b24sync.core.middleware import loggable_query
from b24sync.logs import configure_logging
from b24sync.settings import Settings
from tests.conftest import eventually
from tests.core.helpers import all_published

TOKEN = "access-log-token-5f2c9a"
NO_PHONE = {"full_name": "Пользователь без телефона", "stage": "NEW"}
ACCESS_LINE = re.compile(r"\[Core\] Request .*")


async def _client(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    app.state.sessionmaker = sessions
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://core") as http:
        yield http


@pytest.fixture
async def guarded(
    core_settings: Settings, rollback_sessionmaker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    """The API behind CORE_API_TOKEN, its token sent with every request."""
    settings = core_settings.model_copy(update={"core_api_token": SecretStr(TOKEN)})
    async for http in _client(settings, rollback_sessionmaker):
        http.headers["Authorization"] = f"Bearer {TOKEN}"
        yield http


def _access_lines(output: str) -> list[str]:
    return ACCESS_LINE.findall(output)


async def test_a_rejected_request_leaves_a_line_without_its_body(
    guarded: httpx.AsyncClient, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    response = await guarded.post("/users", json=NO_PHONE)
    assert response.status_code == 422
    logged = capfd.readouterr().out
    (line,) = _access_lines(logged)
    assert "method=POST" in line
    assert "path=/users" in line
    assert "status=422" in line
    assert re.search(r"duration_ms=\d+\.\d", line)
    assert "query=" not in line
    for secret in ("Пользователь", "П***", "NEW", TOKEN, "Bearer"):
        assert secret not in logged


async def test_every_answer_has_its_line(
    guarded: httpx.AsyncClient, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    created = await guarded.post(
        "/users", json={"full_name": "Иван Иванов", "phone": "+77001112233", "stage": "NEW"}
    )
    missing = await guarded.get("/users/987654321")
    unauthorized = await guarded.get("/sync", headers={"Authorization": "Bearer wrong"})
    too_large = await guarded.post("/users", content=b"x" * 20_000)
    statuses = [r.status_code for r in (created, missing, unauthorized, too_large)]
    assert statuses == [201, 404, 401, 413]
    lines = _access_lines(capfd.readouterr().out)
    assert [re.search(r"status=(\d+)", line)[1] for line in lines] == [  # type: ignore[index]
        str(status) for status in statuses
    ]
    assert "path=/users/987654321" in lines[1]


async def test_secrets_in_the_query_are_masked(
    guarded: httpx.AsyncClient, capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    response = await guarded.get(
        "/users", params={"stage": "NEW", "access_token": "q-secret-91", "limit": 5}
    )
    assert response.status_code == 200
    (line,) = _access_lines(capfd.readouterr().out)
    assert "stage=NEW&access_token=***&limit=5" in line
    assert "q-secret-91" not in line


def test_loggable_query() -> None:
    assert loggable_query(b"page=2&limit=50") == "page=2&limit=50"
    assert loggable_query(b"api_key=x&token=y&password=z&flag") == (
        "api_key=***&token=***&password=***&flag"
    )


async def test_access_log_off(
    core_settings: Settings,
    rollback_sessionmaker: async_sessionmaker[AsyncSession],
    capfd: pytest.CaptureFixture[str],
) -> None:
    settings = core_settings.model_copy(update={"access_log": False})
    async for http in _client(settings, rollback_sessionmaker):
        capfd.readouterr()
        assert (await http.post("/users", json=NO_PHONE)).status_code == 422
        assert (await http.get("/healthz")).status_code == 200
    assert _access_lines(capfd.readouterr().out) == []


@pytest.mark.parametrize("log_pii", [False, True], ids=["masked", "LOG_PII"])
async def test_core_lines_mask_the_user_unless_log_pii(
    running_app: httpx.AsyncClient,
    committed: async_sessionmaker[AsyncSession],
    capfd: pytest.CaptureFixture[str],
    log_pii: bool,
) -> None:
    configure_logging("DEBUG", personal_data=log_pii)
    try:
        user = {"full_name": "Иван Иванов", "phone": "+77001112233", "stage": "NEW"}
        assert (await running_app.post("/users", json=user)).status_code == 201
        await eventually(lambda: all_published(committed))
    finally:
        structlog.reset_defaults()
        configure_logging("DEBUG")  # as tests/conftest.py set it
    logged = capfd.readouterr().out
    (emitted,) = re.findall(r"About to emit message to BITRIX_SERVICE: (\{.*\})", logged)
    payload = json.loads(emitted)["data"]["user"]
    shown = (user["full_name"], user["phone"]) if log_pii else ("И*** И***", "+7******2233")
    assert (payload["full_name"], payload["phone"]) == shown
    assert ("Иван Иванов" in logged) is log_pii
    assert ("+77001112233" in logged) is log_pii
