"""The users API over HTTP, on the real database, each test rolled back."""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from b24sync.core.app import create_app
from b24sync.settings import Settings

SEED_CREATE = {"full_name": "Иван Иванов", "phone": "+77001112233", "stage": "NEW"}
SEED_UPDATE = {"full_name": "Иван Петров", "phone": "+77001112233", "stage": "IN_PROCESS"}
SEED_MOVE = {"stage": "CONVERTED"}


async def counts(connection: AsyncConnection) -> tuple[int, int]:
    users = (await connection.execute(text("SELECT count(*) FROM users"))).scalar_one()
    events = (await connection.execute(text("SELECT count(*) FROM outbox_events"))).scalar_one()
    return users, events


async def events_of(connection: AsyncConnection, user_id: int) -> list[dict[str, Any]]:
    rows = await connection.execute(
        text("SELECT pattern, body FROM outbox_events WHERE user_id = :id ORDER BY seq"),
        {"id": user_id},
    )
    return [{"pattern": row.pattern, "body": row.body} for row in rows]


async def create(client: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    response = await client.post("/users", json={**SEED_CREATE, **overrides})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_seed_requests_verbatim(
    client: httpx.AsyncClient, connection: AsyncConnection, core_settings: Settings
) -> None:
    created = await client.post(
        "/users",
        content='{\n    "full_name": "Иван Иванов",\n    "phone": "+77001112233",\n'
        '    "stage": "NEW"\n  }',
        headers={"Content-Type": "application/json"},
    )
    assert created.status_code == 201
    user = created.json()
    user_id = user["id"]
    assert {k: user[k] for k in ("full_name", "phone", "stage")} == SEED_CREATE
    assert user["version"] == 1
    assert user["bitrix_lead_id"] is None
    assert user["sync"] == {
        "status": "pending",
        "synced_version": None,
        "error": None,
        "error_code": None,
        "retryable": None,
        "attempts": 0,
        "retries": 0,
        "next_retry_at": None,
        "failed_at": None,
        "synced_at": None,
    }

    updated = await client.patch(f"/users/{user_id}", json=SEED_UPDATE)
    assert updated.status_code == 200
    assert {k: updated.json()[k] for k in ("id", "full_name", "phone", "stage")} == {
        "id": user_id,
        **SEED_UPDATE,
    }
    moved = await client.post(f"/users/{user_id}/move", json=SEED_MOVE)
    assert moved.status_code == 200
    assert moved.json()["stage"] == "CONVERTED"
    assert moved.json()["version"] == 3

    fetched = await client.get(f"/users/{user_id}")
    assert fetched.json() == moved.json()

    events = await events_of(connection, user_id)
    reply_queue = core_settings.rabbitmq_reply_queue
    assert [event["pattern"] for event in events] == ["user_created", "user_updated", "user_moved"]
    assert events[2]["body"] == {
        "pattern": "user_moved",
        "data": {
            "action": "move_card",
            "user": {
                "id": user_id,
                "full_name": "Иван Петров",
                "phone": "+77001112233",
                "stage": "CONVERTED",
                "version": 3,
                "bitrix_lead_id": None,
            },
            "replyQueue": reply_queue,
            # Nothing confirmed yet: every field goes, whatever the action.
            "changed": ["full_name", "phone", "stage"],
        },
    }
    assert [event["body"]["data"]["action"] for event in events] == [
        "create_card",
        "update_card",
        "move_card",
    ]


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        pytest.param(
            {"full_name": "Пользователь без телефона", "stage": "NEW"},
            "phone",
            "Field required",
            id="no-phone",
        ),
        pytest.param({"phone": "+77001112233"}, "full_name", "Field required", id="no-name"),
        pytest.param({**SEED_CREATE, "full_name": "   "}, "full_name", "at least 1", id="blank"),
        pytest.param(
            {**SEED_CREATE, "full_name": "x" * 201}, "full_name", "at most 200", id="long"
        ),
        pytest.param({**SEED_CREATE, "full_name": None}, "full_name", "string", id="null-name"),
        pytest.param({**SEED_CREATE, "phone": "12"}, "phone", "phone number", id="short-phone"),
        pytest.param({**SEED_CREATE, "phone": "hello"}, "phone", "phone number", id="text-phone"),
        pytest.param({**SEED_CREATE, "phone": "+7700"}, "phone", "phone number", id="bad-phone"),
        pytest.param({**SEED_CREATE, "phone": 77001112233}, "phone", "string", id="int-phone"),
        pytest.param(
            {**SEED_CREATE, "full_name": "Иван\x00"}, "full_name", "control", id="nul-name"
        ),
        pytest.param(
            {**SEED_CREATE, "full_name": "Иван\nИванов"}, "full_name", "control", id="newline"
        ),
        pytest.param({**SEED_CREATE, "phone": "+7700\x001112233"}, "phone", "control", id="nul"),
        pytest.param({**SEED_CREATE, "stage": "WON"}, "stage", "NEW, IN_PROCESS", id="stage"),
        pytest.param({**SEED_CREATE, "id": 5}, "id", "Extra inputs", id="extra-id"),
        pytest.param(
            {**SEED_CREATE, "bitrix_lead_id": 7}, "bitrix_lead_id", "Extra inputs", id="lead-id"
        ),
        pytest.param({**SEED_CREATE, "sync": {}}, "sync", "Extra inputs", id="extra-sync"),
        pytest.param({**SEED_CREATE, "version": 9}, "version", "Extra inputs", id="version"),
    ],
)
async def test_create_rejects(
    client: httpx.AsyncClient,
    connection: AsyncConnection,
    body: dict[str, Any],
    field: str,
    message: str,
) -> None:
    before = await counts(connection)
    response = await client.post("/users", json=body)
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert any(error["loc"][-1] == field and message in error["msg"] for error in errors), errors
    assert await counts(connection) == before


@pytest.mark.parametrize(
    ("path", "body", "field", "message"),
    [
        pytest.param("", {"phone": None}, "body", "not null", id="patch-null-phone"),
        pytest.param("", {"full_name": ""}, "full_name", "at least 1", id="patch-empty-name"),
        pytest.param("", {"phone": "+1"}, "phone", "phone number", id="patch-bad-phone"),
        pytest.param("", {"stage": "LOST"}, "stage", "allowed", id="patch-stage"),
        pytest.param("", {"full_name": "A\x00"}, "full_name", "control", id="patch-nul-name"),
        pytest.param("/move", {"stage": "NEW\x00"}, "stage", "control", id="move-nul-stage"),
        pytest.param("", {"id": 2}, "id", "Extra inputs", id="patch-id"),
        pytest.param("", {"sync_status": "synced"}, "sync_status", "Extra", id="patch-sync"),
        pytest.param("/move", {}, "stage", "Field required", id="move-no-stage"),
        pytest.param("/move", {"stage": "LOST"}, "stage", "allowed", id="move-unknown"),
        pytest.param("/move", {"stage": "NEW", "x": 1}, "x", "Extra inputs", id="move-extra"),
    ],
)
async def test_change_rejects(
    client: httpx.AsyncClient,
    connection: AsyncConnection,
    path: str,
    body: dict[str, Any],
    field: str,
    message: str,
) -> None:
    user = await create(client)
    before = await counts(connection)
    method = client.patch if path == "" else client.post
    response = await method(f"/users/{user['id']}{path}", json=body)
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert any(error["loc"][-1] == field and message in error["msg"] for error in errors), errors
    assert await counts(connection) == before
    assert (await client.get(f"/users/{user['id']}")).json() == user


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        pytest.param('{"full_name": "Иван", ', "application/json", id="truncated"),
        pytest.param("not json", "application/json", id="garbage"),
        pytest.param("[1, 2]", "application/json", id="array"),
    ],
)
async def test_malformed_body(
    client: httpx.AsyncClient, connection: AsyncConnection, content: str, content_type: str
) -> None:
    before = await counts(connection)
    response = await client.post("/users", content=content, headers={"content-type": content_type})
    assert response.status_code in (400, 422)
    assert response.json()["detail"]
    assert await counts(connection) == before


async def test_body_over_16_kib(client: httpx.AsyncClient, connection: AsyncConnection) -> None:
    before = await counts(connection)
    big = {**SEED_CREATE, "full_name": "x" * 17_000}
    response = await client.post("/users", json=big)
    assert response.status_code == 413
    assert "larger than" in response.json()["detail"]

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(20):
            yield b" " * 1024

    chunked = await client.post(
        "/users", content=chunks(), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413
    assert await counts(connection) == before


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/users/999999999", None, 404),
        ("PATCH", "/users/999999999", SEED_UPDATE, 404),
        ("POST", "/users/999999999/move", SEED_MOVE, 404),
        ("GET", "/users/abc", None, 422),
        ("PATCH", "/users/1.5", SEED_UPDATE, 422),
        ("POST", "/users/abc/move", SEED_MOVE, 422),
        ("GET", "/users/0", None, 422),
        ("GET", "/users/99999999999999999999999", None, 422),
    ],
)
async def test_unknown_or_bad_id(
    client: httpx.AsyncClient, method: str, path: str, body: Any, status: int
) -> None:
    response = await client.request(method, path, json=body)
    assert response.status_code == status
    detail = response.json()["detail"]
    if status == 404:
        assert detail == "User 999999999 not found"


async def test_phone_is_normalised_to_e164(client: httpx.AsyncClient) -> None:
    user = await create(client, phone="8 (700) 111-22-33", full_name="  Иван Иванов  ")
    assert user["phone"] == "+77001112233"
    assert user["full_name"] == "Иван Иванов"


async def test_stage_defaults_to_new(client: httpx.AsyncClient) -> None:
    user = await create(client, stage=None)
    assert user["stage"] == "NEW"


async def test_no_change_emits_nothing(
    client: httpx.AsyncClient, connection: AsyncConnection
) -> None:
    user = await create(client)
    before = await counts(connection)
    same = await client.patch(f"/users/{user['id']}", json=SEED_CREATE)
    assert same.status_code == 200
    assert same.json()["version"] == 1
    empty = await client.patch(f"/users/{user['id']}", json={})
    assert empty.json()["version"] == 1
    # The same number typed differently is the same phone.
    retyped = await client.patch(f"/users/{user['id']}", json={"phone": "87001112233"})
    assert retyped.json()["version"] == 1
    moved = await client.post(f"/users/{user['id']}/move", json={"stage": "NEW"})
    assert moved.status_code == 200
    assert moved.json() == user
    assert await counts(connection) == before


async def test_partial_patch_keeps_other_fields(
    client: httpx.AsyncClient, connection: AsyncConnection
) -> None:
    user = await create(client)
    response = await client.patch(f"/users/{user['id']}", json={"full_name": "Иван Петров"})
    assert response.json()["phone"] == "+77001112233"
    assert response.json()["stage"] == "NEW"
    assert response.json()["version"] == 2
    events = await events_of(connection, user["id"])
    assert events[-1]["body"]["data"]["user"]["full_name"] == "Иван Петров"
    assert events[-1]["body"]["data"]["user"]["version"] == 2


async def test_list_filters_and_pages(client: httpx.AsyncClient) -> None:
    first = await create(client, stage="JUNK")
    second = await create(client, stage="JUNK", full_name="Пётр")
    await create(client, stage="NEW")
    page = await client.get("/users", params={"stage": "JUNK", "limit": 1})
    assert page.status_code == 200
    assert [item["id"] for item in page.json()["items"]] == [first["id"]]
    assert page.json()["pagination"] == {"total_count": 2, "max_page": 2}
    page2 = await client.get("/users", params={"stage": "JUNK", "limit": 1, "page": 2})
    assert [item["id"] for item in page2.json()["items"]] == [second["id"]]
    synced = await client.get("/users", params={"sync_status": "synced"})
    assert synced.json()["items"] == []
    pending = await client.get("/users", params={"sync_status": "pending", "stage": "JUNK"})
    assert pending.json()["pagination"]["total_count"] == 2
    bad = await client.get("/users", params={"sync_status": "done"})
    assert bad.status_code == 422
    nul = await client.get("/users", params={"stage": "JUNK\x00"})
    assert nul.status_code == 422
    assert "control characters" in nul.json()["detail"][0]["msg"]


async def test_token_required_when_set(core_settings: Settings, rollback_sessionmaker: Any) -> None:
    app = create_app(core_settings.model_copy(update={"core_api_token": SecretStr("s3cr3t-t0ken")}))
    app.state.sessionmaker = rollback_sessionmaker
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://core"
    ) as http:
        missing = await http.post("/users", json=SEED_CREATE)
        assert missing.status_code == 401
        assert "s3cr3t" not in missing.text
        wrong = await http.get("/users", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        basic = await http.get("/users", headers={"Authorization": "Basic s3cr3t-t0ken"})
        assert basic.status_code == 401
        right = await http.post(
            "/users", json=SEED_CREATE, headers={"Authorization": "Bearer s3cr3t-t0ken"}
        )
        assert right.status_code == 201
        assert (await http.get("/docs")).status_code == 401
        assert (await http.get("/openapi.json")).status_code == 401
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/sync")).status_code == 401
        assert (await http.get("/metrics")).status_code == 401
        scraped = await http.get("/metrics", headers={"Authorization": "Bearer s3cr3t-t0ken"})
        assert scraped.status_code == 200
        assert "b24sync_core_users" in scraped.text


async def test_openapi_has_seed_examples(client: httpx.AsyncClient) -> None:
    docs = await client.get("/docs")
    assert docs.status_code == 200
    schema = (await client.get("/openapi.json")).text
    for text_ in ("Иван Иванов", "Иван Петров", "CONVERTED", "Пользователь без телефона"):
        assert text_ in schema


async def test_healthz(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.json() == {"status": "ok", "pid": os.getpid(), "ppid": os.getppid()}
