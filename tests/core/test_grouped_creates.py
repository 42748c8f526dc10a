"""Concurrent creates written together, on the real PostgreSQL: one statement and one commit
per group, yet every caller gets its own user, every user its own event, and a row the
database refuses fails only its own caller."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx
import pytest
from sqlalchemy import text

from b24sync.core.models import User
from b24sync.settings import Settings
from tests.core.helpers import (
    Sessions,
    clash_events_of,
    create_user,
    event_ids,
    first_answer_after_503s,
    grouped_writes,
    proxied_database,
    running_core,
)


async def test_concurrent_creates_are_written_together_each_with_its_own_event(
    core_settings: Settings, write_pool: asyncpg.Pool, committed: Sessions
) -> None:
    groups = grouped_writes(write_pool, core_settings, in_flight=1)
    names = [f"User {n}" for n in range(40)]
    users = await asyncio.gather(*(create_user(groups, core_settings, name) for name in names))

    assert [user.full_name for user in users] == names
    assert len({user.id for user in users}) == len(names)
    async with committed() as session:
        stored = dict((await session.execute(text("SELECT id, full_name FROM users"))).all())
        events = (
            await session.execute(text("SELECT user_id, pattern, body FROM outbox_events"))
        ).all()
        # now() is the transaction's start: users written by one statement share it.
        transactions = (
            await session.execute(text("SELECT count(DISTINCT created_at) FROM users"))
        ).scalar_one()
    assert stored == {user.id: user.full_name for user in users}
    assert len(events) == len(names)
    for user_id, pattern, body in events:
        assert pattern == "user_created"
        assert body["data"]["user"]["id"] == user_id
        assert body["data"]["user"]["full_name"] == stored[user_id]
    assert transactions < len(names) / 4


async def test_a_create_alone_is_written_at_once(
    core_settings: Settings, write_pool: asyncpg.Pool, committed: Sessions
) -> None:
    user = await create_user(
        grouped_writes(write_pool, core_settings, in_flight=2), core_settings, "Alone"
    )
    async with committed() as session:
        row = (await session.execute(text("SELECT id, body FROM outbox_events"))).one()
    assert row.body["pattern"] == "user_created"
    assert row.body["data"]["user"] == {
        "id": user.id,
        "full_name": "Alone",
        "phone": "+77001112233",
        "stage": "NEW",
        "version": 1,
        "bitrix_lead_id": None,
    }


async def test_a_row_the_database_refuses_fails_only_its_own_create(
    core_settings: Settings,
    write_pool: asyncpg.Pool,
    committed: Sessions,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await create_user(committed, core_settings, "Existing")
    [taken] = await event_ids(committed)
    clash_events_of("Bad", taken, monkeypatch)
    groups = grouped_writes(write_pool, core_settings, in_flight=1)
    names = ["First", "Second", "Bad", "Third", "Fourth"]
    results = await asyncio.gather(
        *(create_user(groups, core_settings, name) for name in names), return_exceptions=True
    )

    assert isinstance(results[2], asyncpg.UniqueViolationError)
    good = [name for name in names if name != "Bad"]
    assert [result.full_name for result in results if isinstance(result, User)] == good
    async with committed() as session:
        rows = (
            await session.execute(
                text(
                    "SELECT u.full_name FROM users u JOIN outbox_events e ON e.user_id = u.id"
                    " ORDER BY u.id"
                )
            )
        ).scalars()
        users = (await session.execute(text("SELECT count(*) FROM users"))).scalar_one()
    assert sorted(rows) == sorted(["Existing", "First", "Second", "Third", "Fourth"])
    assert users == 5  # and no user without its event


async def test_creates_answer_503_while_the_database_is_unreachable_then_recover(
    core_settings: Settings, committed: Sessions
) -> None:
    proxy, settings = await proxied_database(core_settings)

    async def post(name: str) -> httpx.Response:
        return await http.post("/users", json={"full_name": name, "phone": "+77001112233"})

    async with running_core(settings) as http:
        assert (await post("Before")).status_code == 201
        await proxy.stop()
        during = await asyncio.gather(*(post(f"During {n}") for n in range(5)))
        assert [response.status_code for response in during] == [503] * 5
        assert during[0].json() == {"detail": "Database unavailable, try again"}

        await proxy.start()
        assert (await first_answer_after_503s(lambda: post("After"))).status_code == 201
    await proxy.stop()

    async with committed() as session:
        names = (await session.execute(text("SELECT full_name FROM users ORDER BY id"))).scalars()
        events = (await session.execute(text("SELECT count(*) FROM outbox_events"))).scalar_one()
    assert list(names) == ["Before", "After"]
    assert events == 2
