"""The users API's writes answered straight from ASGI (`core/users/write_path.py`): which
requests it answers itself, which it hands to FastAPI, and that both answer alike."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.types import Receive, Scope, Send

from b24sync.core.app import create_app
from b24sync.core.models import SyncStatus, User
from b24sync.core.users.repository import FRESH_SYNC_STATE
from b24sync.core.users.schemas import CREATE_EXAMPLE, UserRead
from b24sync.core.users.write_path import CREATE, MOVE, UPDATE, UserWritePath, route
from b24sync.settings import Settings
from tests.core.helpers import running_core

# Set by the database, so different for any two users.
_UNIQUE = ("id", "created_at", "updated_at")


class Recorder:
    """The app behind the write path, noting every request that reached it."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.reached: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.reached.append(f"{scope['method']} {scope['path']}")
        await self.app(scope, receive, send)


async def _served(
    settings: Settings, sessions: async_sessionmaker[AsyncSession]
) -> AsyncIterator[tuple[httpx.AsyncClient, Recorder]]:
    app = create_app(settings)
    app.state.sessionmaker = sessions
    behind = Recorder(app)
    transport = httpx.ASGITransport(app=UserWritePath(behind, app.state))
    async with httpx.AsyncClient(transport=transport, base_url="http://core") as http:
        yield http, behind


@pytest.fixture
async def served(
    core_settings: Settings, rollback_sessionmaker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[tuple[httpx.AsyncClient, Recorder]]:
    async for pair in _served(core_settings, rollback_sessionmaker):
        yield pair


async def _chunks(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def _shared(user: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in user.items() if key not in _UNIQUE}


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/users", (CREATE, 0)),
        ("PATCH", "/users/5", (UPDATE, 5)),
        ("POST", "/users/5/move", (MOVE, 5)),
        ("POST", f"/users/{2**63 - 1}/move", (MOVE, 2**63 - 1)),
        ("GET", "/users", None),
        ("PATCH", "/users", None),
        ("POST", "/users/5", None),
        ("PATCH", "/users/5/move", None),
        ("PATCH", "/users/0", None),
        ("PATCH", "/users/05", None),
        ("PATCH", f"/users/{2**63}", None),
        ("POST", "/users/5/resync", None),
        ("POST", "/users/", None),
    ],
)
def test_route(method: str, path: str, expected: tuple[object, int] | None) -> None:
    assert route(method, path) == expected


async def test_answers_well_formed_writes_itself(
    served: tuple[httpx.AsyncClient, Recorder],
) -> None:
    http, behind = served
    created = await http.post("/users", json=CREATE_EXAMPLE)
    assert created.status_code == 201, created.text
    user_id = created.json()["id"]
    updated = await http.patch(f"/users/{user_id}", json={"phone": "8 700 111 22 44"})
    assert updated.status_code == 200, updated.text
    assert updated.json()["phone"] == "+77001112244"
    assert updated.json()["version"] == 2
    moved = await http.post(f"/users/{user_id}/move", json={"stage": "CONVERTED"})
    assert moved.status_code == 200, moved.text
    assert moved.json()["stage"] == "CONVERTED"
    assert moved.json()["version"] == 3
    # The service's own refusals are answered here too, as FastAPI's handlers word them.
    bad_phone = await http.post("/users", json={**CREATE_EXAMPLE, "phone": "12"})
    assert bad_phone.status_code == 422
    assert bad_phone.json()["detail"][0]["loc"] == ["body", "phone"]
    missing = await http.patch("/users/999999999", json={"stage": "NEW"})
    assert missing.status_code == 404
    assert missing.json() == {"detail": "User 999999999 not found"}
    assert behind.reached == []


@pytest.mark.parametrize(
    ("request_args", "status"),
    [
        # The body fails the model: FastAPI words the 422.
        ({"json": {**CREATE_EXAMPLE, "extra": 1}}, 422),
        ({"content": b'{"full_name": NaN, "phone": "+77001112233"}'}, 422),
        ({"content": b"{not json"}, 422),
        # No Content-Length (a chunked body).
        ({"content": "chunked"}, 201),
        # Another content type, a query string, a body over the limit.
        ({"content": b"full_name=x", "headers": {"Content-Type": "text/plain"}}, 422),
        ({"json": CREATE_EXAMPLE, "params": {"x": "1"}}, 201),
        ({"json": {**CREATE_EXAMPLE, "full_name": "x" * 20_000}}, 413),
    ],
)
async def test_hands_other_requests_to_fastapi(
    served: tuple[httpx.AsyncClient, Recorder], request_args: dict[str, Any], status: int
) -> None:
    http, behind = served
    request_args = dict(request_args)
    headers = {"Content-Type": "application/json", **request_args.pop("headers", {})}
    if request_args.get("content") == "chunked":
        request_args["content"] = _chunks(b'{"full_name": "A B", ', b'"phone": "+77001112233"}')
    answer = await http.post("/users", headers=headers, **request_args)
    assert answer.status_code == status, answer.text
    assert behind.reached == ["POST /users"]


async def test_a_body_refused_by_the_model_reads_as_fastapi_words_it(
    served: tuple[httpx.AsyncClient, Recorder],
) -> None:
    http, _ = served
    answer = await http.post("/users", json={"full_name": "A B"})
    assert answer.status_code == 422
    (error,) = answer.json()["detail"]
    assert error["type"] == "missing"
    assert error["loc"] == ["body", "phone"]


async def test_without_the_token_fastapi_refuses(
    core_settings: Settings, rollback_sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    settings = core_settings.model_copy(update={"core_api_token": SecretStr("s3cret-token")})
    async for http, behind in _served(settings, rollback_sessionmaker):
        refused = await http.post("/users", json=CREATE_EXAMPLE)
        assert refused.status_code == 401
        assert behind.reached == ["POST /users"]
        accepted = await http.post(
            "/users", json=CREATE_EXAMPLE, headers={"Authorization": "Bearer s3cret-token"}
        )
        assert accepted.status_code == 201
        assert behind.reached == ["POST /users"]


Answers = dict[str, list[tuple[int, Any]]]


async def _answers_by_path(http: httpx.AsyncClient) -> tuple[Answers, list[int]]:
    """The same writes, once answered by the write path and once (a query string sends them
    on) by FastAPI's routes, each answer but for what makes each user unique; and the ids of
    the two users they created."""
    answers: Answers = {}
    user_ids = []
    for path, params in (("write path", {}), ("fastapi", {"via": "fastapi"})):
        created = await http.post("/users", json=CREATE_EXAMPLE, params=params)
        user_id = created.json()["id"]
        user_ids.append(user_id)
        writes = [
            created,
            await http.patch(f"/users/{user_id}", json={"full_name": "Иван Петров"}, params=params),
            await http.patch(f"/users/{user_id}", json={"full_name": "Иван Петров"}, params=params),
            await http.patch(f"/users/{user_id}", json={}, params=params),
            await http.post(f"/users/{user_id}/move", json={"stage": "IN_PROCESS"}, params=params),
            await http.post("/users", json={**CREATE_EXAMPLE, "stage": "LOST"}, params=params),
            await http.post(f"/users/{user_id}/move", json={"stage": "NOPE"}, params=params),
            await http.patch("/users/999999999", json={}, params=params),
        ]
        answers[path] = [
            (
                answer.status_code,
                _shared(answer.json()) if answer.status_code < 300 else answer.json(),
            )
            for answer in writes
        ]
    return answers, user_ids


ALIKE_STATUSES = [201, 200, 200, 200, 200, 422, 422, 404]


async def test_both_paths_answer_alike(served: tuple[httpx.AsyncClient, Recorder]) -> None:
    """In a session of the request's own (an app not started through its lifespan)."""
    http, behind = served
    answers, _ = await _answers_by_path(http)
    assert answers["write path"] == answers["fastapi"]
    assert [status for status, _ in answers["fastapi"]] == ALIKE_STATUSES
    assert [user["version"] for _, user in answers["fastapi"][:5]] == [1, 2, 2, 2, 3]
    assert len(behind.reached) == 8  # only the requests with a query string


async def test_through_the_app_s_groups_both_paths_answer_alike(
    core_settings: Settings, committed: async_sessionmaker[AsyncSession]
) -> None:
    """The app started: every write of either path goes through its groups of writes, an
    empty update and one of a user that does not exist included."""
    async with running_core(core_settings) as http:
        answers, user_ids = await _answers_by_path(http)
    assert answers["write path"] == answers["fastapi"]
    assert [status for status, _ in answers["fastapi"]] == ALIKE_STATUSES
    assert [user["version"] for _, user in answers["fastapi"][:5]] == [1, 2, 2, 2, 3]
    async with committed() as session:
        query = text("SELECT user_id, version FROM outbox_events WHERE user_id = ANY(:ids)")
        events = (await session.execute(query, {"ids": user_ids})).all()
    # Each user's events for versions 1, 2 and 3: none for a change to nothing new.
    assert sorted(events) == sorted((user_id, v) for user_id in user_ids for v in (1, 2, 3))


def _user(**fields: Any) -> User:
    now = datetime(2026, 12, 5, 21, 0, 0, 123456, tzinfo=UTC)
    values: dict[str, Any] = {
        "id": 7,
        "full_name": 'Иван "Ваня" Иванов',
        "phone": "+77001112233",
        "stage": "NEW",
        "bitrix_lead_id": None,
        "version": 1,
        "sync_status": SyncStatus.PENDING.value,
        "synced_version": None,
        **FRESH_SYNC_STATE,
        "sync_failed_at": None,
        "synced_at": None,
        "created_at": now,
        "updated_at": now,
    }
    return User(**{**values, **fields})


@pytest.mark.parametrize(
    "user",
    [
        _user(),
        _user(
            bitrix_lead_id=4242,
            version=5,
            sync_status=SyncStatus.SYNCED.value,
            synced_version=5,
            sync_attempts=2,
            synced_at=datetime(2026, 12, 5, 21, 0, 1, tzinfo=UTC),
        ),
        _user(
            sync_status=SyncStatus.FAILED.value,
            sync_error="Bitrix24: QUERY_LIMIT_EXCEEDED\n<b>too many</b>",
            sync_error_code="QUERY_LIMIT_EXCEEDED",
            sync_retryable=True,
            sync_retries=3,
            next_sync_at=datetime(2026, 12, 5, 21, 5, tzinfo=timezone(timedelta(hours=3))),
            sync_failed_at=datetime(2026, 12, 5, 21, 4, 59, 999999, tzinfo=UTC),
        ),
    ],
    ids=["pending", "synced", "failed"],
)
def test_a_write_is_answered_as_user_read_dumps_the_user(user: User) -> None:
    assert UserRead.json_of(user) == UserRead.from_user(user).model_dump_json().encode()
