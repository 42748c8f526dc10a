"""Users sent again by hand: `POST /users/{id}/resync`, `POST /sync/resync` and
`b24sync resync`, on the real database."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from b24sync.core.app import create_app
from b24sync.settings import Settings
from tests.conftest import eventually
from tests.core.helpers import (
    answer,
    create_user,
    error,
    events_of,
    publish_all,
    read_user,
    rename_user,
    success,
)
from tests.core.test_api import SEED_CREATE, counts
from tests.processes import finished, start_command

Sessions = async_sessionmaker[AsyncSession]


async def failed_user(sessions: Sessions, settings: Settings, *, retryable: bool) -> int:
    """A user whose lead exists and whose latest change failed."""
    user = await create_user(sessions, settings)
    await publish_all(sessions)
    [create] = await events_of(sessions, user.id)
    await answer(sessions, settings, success(user.id, 1, lead=9), create.id)
    await rename_user(sessions, settings, user.id, "Иван Петров")
    await publish_all(sessions)
    _, update = await events_of(sessions, user.id)
    await answer(sessions, settings, error(user.id, 2, retryable=retryable), update.id)
    assert (await read_user(sessions, user.id)).sync_status == "failed"
    return user.id


async def test_resync_of_one_user(
    client: httpx.AsyncClient, rollback_sessionmaker: Sessions, core_settings: Settings
) -> None:
    user_id = await failed_user(rollback_sessionmaker, core_settings, retryable=False)
    response = await client.post(f"/users/{user_id}/resync")
    assert response.status_code == 202
    body = response.json()
    assert body["sync"]["status"] == "pending"
    assert body["sync"]["retries"] == 0
    *_, event = await events_of(rollback_sessionmaker, user_id)
    assert (event.pattern, event.version) == ("user_updated", 2)
    assert event.body["data"]["changed"] == ["full_name"]
    assert "force" not in event.body["data"]

    forced = await client.post(f"/users/{user_id}/resync", params={"force": "true"})
    assert forced.status_code == 202
    *_, event = await events_of(rollback_sessionmaker, user_id)
    assert event.body["data"]["force"] is True
    assert event.body["data"]["changed"] == ["full_name", "phone", "stage"]

    missing = await client.post("/users/999999999/resync")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "User 999999999 not found"}


async def test_resync_of_many(
    client: httpx.AsyncClient, rollback_sessionmaker: Sessions, core_settings: Settings
) -> None:
    sessions = rollback_sessionmaker
    permanent = await failed_user(sessions, core_settings, retryable=False)
    retrying = await failed_user(sessions, core_settings, retryable=True)
    waiting = (await client.post("/users", json=SEED_CREATE)).json()["id"]

    named = await client.post("/sync/resync", json={"user_ids": [permanent, 999999999]})
    assert (named.status_code, named.json()) == (202, {"resent": 1})
    assert len(await events_of(sessions, permanent)) == 3

    failed = await client.post("/sync/resync", json={"status": "failed"})
    assert failed.json() == {"resent": 1}  # the permanent one is pending since
    assert (await read_user(sessions, retrying)).sync_status == "pending"

    everyone = await client.post("/sync/resync", json={"all": True, "force": True})
    assert everyone.json() == {"resent": 3}
    # A user whose lead id is unknown goes as a create.
    *_, event = await events_of(sessions, waiting)
    assert (event.pattern, event.body["data"]["force"]) == ("user_created", True)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="nothing"),
        pytest.param({"user_ids": [1], "all": True}, id="two"),
        pytest.param({"user_ids": []}, id="no-ids"),
        pytest.param({"user_ids": [0]}, id="id-0"),
        pytest.param({"user_ids": [2**63]}, id="id-too-big"),
        pytest.param({"status": "synced"}, id="status"),
        pytest.param({"all": True, "extra": 1}, id="extra"),
    ],
)
async def test_resync_refuses_a_body_that_names_no_users_clearly(
    client: httpx.AsyncClient, connection: AsyncConnection, body: dict[str, Any]
) -> None:
    await client.post("/users", json=SEED_CREATE)
    before = await counts(connection)
    response = await client.post("/sync/resync", json=body)
    assert response.status_code == 422
    assert response.json()["detail"]
    assert await counts(connection) == before


async def test_resync_needs_the_token(
    core_settings: Settings, rollback_sessionmaker: Sessions
) -> None:
    app = create_app(core_settings.model_copy(update={"core_api_token": SecretStr("t0ken")}))
    app.state.sessionmaker = rollback_sessionmaker
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://core") as http:
        assert (await http.post("/sync/resync", json={"all": True})).status_code == 401
        assert (await http.post("/users/1/resync")).status_code == 401
        allowed = await http.post(
            "/sync/resync", json={"all": True}, headers={"Authorization": "Bearer t0ken"}
        )
        assert allowed.status_code == 202


# --- b24sync resync -------------------------------------------------------------------------


async def start_resync(settings: Settings, *args: str) -> asyncio.subprocess.Process:
    return await start_command(settings, "resync", *args)


async def b24sync_resync(settings: Settings, *args: str) -> tuple[int, str, str]:
    """Runs the command without following the sync (nothing answers in these tests)."""
    return await finished(await start_resync(settings, *args, "--no-wait"))


async def test_the_command_sends_named_failed_or_all_users(
    core_settings: Settings, committed: Sessions
) -> None:
    permanent = await failed_user(committed, core_settings, retryable=False)
    synced = await create_user(committed, core_settings)
    await publish_all(committed)
    await answer(committed, core_settings, success(synced.id, 1))

    code, out, err = await b24sync_resync(core_settings, str(permanent))
    assert (code, out.strip(), err) == (0, "Sent 1 user(s) again.", "")
    *_, event = await events_of(committed, permanent)
    assert event.pattern == "user_updated"
    # The reply queue is the one Core listens on, from the command's settings.
    assert event.body["data"]["replyQueue"] == core_settings.rabbitmq_reply_queue

    await publish_all(committed)
    await answer(committed, core_settings, error(permanent, 2, retryable=False), event.id)
    code, out, _ = await b24sync_resync(core_settings, "--failed")
    assert (code, out.strip()) == (0, "Sent 1 user(s) again.")
    code, out, _ = await b24sync_resync(core_settings, "--all", "--force")
    assert (code, out.strip()) == (0, "Sent 2 user(s) again with force.")
    *_, forced = await events_of(committed, synced.id)
    assert forced.body["data"]["force"] is True

    code, out, err = await b24sync_resync(core_settings, str(synced.id), "999999999")
    assert (code, out.strip()) == (1, "Sent 1 user(s) again.")
    assert err.strip() == "b24sync resync: no user has id 999999999"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param([], "name the users by exactly one of: ids, --failed, --all", id="none"),
        pytest.param(["1", "--all"], "exactly one of", id="two"),
        pytest.param(["--failed", "--all"], "exactly one of", id="two-flags"),
        pytest.param(["abc"], "not a user id: 'abc'", id="text"),
        pytest.param(["0"], "not a user id: 0 (ids run from 1 to", id="zero"),
        pytest.param(["-5"], "not a user id: -5", id="negative"),
        pytest.param(["--faild"], "not a user id: '--faild'", id="misspelt-option"),
        pytest.param([str(2**63)], "not a user id", id="too-big"),
    ],
)
async def test_the_command_refuses_bad_input_in_one_line(
    core_settings: Settings, args: list[str], message: str
) -> None:
    code, out, err = await b24sync_resync(core_settings, *args)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("b24sync resync: ")
    assert message in err


async def test_the_command_says_when_the_database_cannot_be_used(
    core_settings: Settings,
) -> None:
    unreachable = core_settings.model_copy(
        update={"database_url": "postgresql://postgres@127.0.0.1:9/nowhere"}
    )
    code, out, err = await b24sync_resync(unreachable, "--all")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "b24sync resync: cannot reach PostgreSQL at postgresql://127.0.0.1:9/nowhere "
        "(Connection refused): check DATABASE_URL"
    ]


async def test_the_command_follows_the_users_until_bitrix24_answered(
    core_settings: Settings, committed: Sessions
) -> None:
    first = await create_user(committed, core_settings)
    second = await create_user(committed, core_settings, "Пётр Петров")
    process = await start_resync(core_settings, "--all")

    async def both_sent() -> bool:
        return all([len(await events_of(committed, u.id)) == 2 for u in (first, second)])

    await eventually(both_sent, wait_s=30)
    await publish_all(committed)
    for user_id, reply in ((first.id, success), (second.id, error)):
        *_, latest = await events_of(committed, user_id)
        await answer(committed, core_settings, reply(user_id, 1), latest.id)
    code, out, err = await finished(process)
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "Sent 2 user(s) again."
    assert "Bitrix24: 1 synced, 1 failed" in out
    assert "2/2" in out


async def test_the_command_goes_on_after_a_user_id(
    core_settings: Settings, committed: Sessions
) -> None:
    users = [await create_user(committed, core_settings, f"Пользователь {n}") for n in range(3)]
    code, out, _ = await b24sync_resync(core_settings, "--all", "--after", str(users[0].id))
    assert (code, out.strip()) == (0, "Sent 2 user(s) again.")
    assert [len(await events_of(committed, user.id)) for user in users] == [1, 2, 2]
    code, _, err = await b24sync_resync(core_settings, "--failed", "--after", "5")
    assert (code, err.strip()) == (2, "b24sync resync: --after goes with --all")
