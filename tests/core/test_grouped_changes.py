"""Concurrent updates and moves applied together, on the real PostgreSQL: one statement per
group for users whose rows are known, a read and a write for the others, yet each change gets
its own new version and event, a user named twice in a group changes twice in order, a user
changed between the group's statements is changed again from its new row, and a change that
fails fails only its own caller."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import Executable, text

from b24sync.contracts import Pattern
from b24sync.core.db import OnDriver
from b24sync.core.models import SyncStatus, User
from b24sync.core.users.service import (
    OPTIMISTIC_ROUNDS,
    RecentRows,
    UserChange,
    UserNotFoundError,
    user_service,
)
from b24sync.settings import Settings
from tests.core.helpers import (
    Sessions,
    StoredEvent,
    change_user,
    clash_events_of,
    create_user,
    event_ids,
    events_of,
    first_answer_after_503s,
    grouped_writes,
    move_user,
    proxied_database,
    running_core,
)


async def user_events(sessions: Sessions, user_id: int) -> list[StoredEvent]:
    """The user's events after its create, in seq order."""
    return [event for event in await events_of(sessions, user_id) if event.version > 1]


async def test_concurrent_changes_are_applied_together_each_with_its_own_event(
    core_settings: Settings, write_pool: asyncpg.Pool, committed: Sessions
) -> None:
    users = [await create_user(committed, core_settings, f"User {n}") for n in range(30)]
    groups = grouped_writes(write_pool, core_settings, in_flight=1)

    changed = await asyncio.gather(
        *(
            change_user(groups, core_settings, user.id, full_name=f"Renamed {n}")
            if n % 2
            else move_user(groups, core_settings, user.id, "IN_PROCESS")
            for n, user in enumerate(users)
        )
    )

    assert [user.version for user in changed] == [2] * len(users)
    async with committed() as session:
        # now() is the transaction's start: users changed by one transaction share it.
        transactions = (
            await session.execute(
                text("SELECT count(DISTINCT updated_at) FROM users WHERE version = 2")
            )
        ).scalar_one()
    assert transactions < len(users) / 4
    for n, user in enumerate(users):
        [event] = await user_events(committed, user.id)
        pattern, version, body = event.pattern, event.version, event.body
        assert version == 2
        if n % 2:
            assert pattern == Pattern.USER_UPDATED.value
            assert body["data"]["user"]["full_name"] == f"Renamed {n}"
            assert body["data"]["user"]["stage"] == "NEW"
        else:
            assert pattern == Pattern.USER_MOVED.value
            assert body["data"]["user"]["stage"] == "IN_PROCESS"
            assert body["data"]["user"]["full_name"] == f"User {n}"


async def test_a_user_changed_several_times_in_one_group_changes_in_order(
    core_settings: Settings, write_pool: asyncpg.Pool, committed: Sessions
) -> None:
    user = await create_user(committed, core_settings, "Often")
    other = await create_user(committed, core_settings, "Other")
    groups = grouped_writes(write_pool, core_settings, in_flight=1)

    # The first goes alone; the rest wait for it and go together.
    results = await asyncio.gather(
        change_user(groups, core_settings, other.id, full_name="Other renamed"),
        change_user(groups, core_settings, user.id, full_name="Often 1"),
        change_user(groups, core_settings, user.id, phone="+77009998877"),
        move_user(groups, core_settings, user.id, "CONVERTED"),
        change_user(groups, core_settings, user.id, full_name="Often 1"),  # changes nothing
        change_user(groups, core_settings, user.id, full_name="Often 2"),
    )

    # The change that changes nothing answers with the user as it is once the group is in.
    assert [results[n].version for n in (1, 2, 3, 5)] == [2, 3, 4, 5]
    events = await user_events(committed, user.id)
    assert [(event.pattern, event.version) for event in events] == [
        (Pattern.USER_UPDATED.value, 2),
        (Pattern.USER_UPDATED.value, 3),
        (Pattern.USER_MOVED.value, 4),
        (Pattern.USER_UPDATED.value, 5),
    ]
    last = events[-1].body["data"]["user"]
    assert (last["full_name"], last["phone"], last["stage"]) == (
        "Often 2",
        "+77009998877",
        "CONVERTED",
    )
    # Nothing was confirmed yet: every event carries every field.
    assert events[-1].body["data"]["changed"] == ["full_name", "phone", "stage"]
    async with committed() as session:
        versions = (
            await session.execute(
                text(
                    "SELECT version, full_name_version, phone_version, stage_version"
                    " FROM users WHERE id = :id"
                ),
                {"id": user.id},
            )
        ).one()
    assert tuple(versions) == (5, 5, 3, 4)


async def test_an_unknown_user_fails_only_its_own_change(
    core_settings: Settings, write_pool: asyncpg.Pool, committed: Sessions
) -> None:
    users = [await create_user(committed, core_settings, f"User {n}") for n in range(4)]
    groups = grouped_writes(write_pool, core_settings, in_flight=1)
    missing = users[-1].id + 1000

    results = await asyncio.gather(
        *(move_user(groups, core_settings, user.id, "IN_PROCESS") for user in users[:2]),
        move_user(groups, core_settings, missing, "IN_PROCESS"),
        *(move_user(groups, core_settings, user.id, "IN_PROCESS") for user in users[2:]),
        return_exceptions=True,
    )

    assert isinstance(results[2], UserNotFoundError)
    assert [r.stage for r in results if isinstance(r, User)] == ["IN_PROCESS"] * 4
    for user in users:
        assert len(await user_events(committed, user.id)) == 1


async def test_a_change_the_database_refuses_fails_only_its_own_request(
    core_settings: Settings,
    write_pool: asyncpg.Pool,
    committed: Sessions,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    users = [await create_user(committed, core_settings, f"User {n}") for n in range(5)]
    [taken, *_] = await event_ids(committed)
    clash_events_of("Bad", taken, monkeypatch)
    groups = grouped_writes(write_pool, core_settings, in_flight=1)
    names = ["First", "Second", "Bad", "Third", "Fourth"]
    results = await asyncio.gather(
        *(
            change_user(groups, core_settings, user.id, full_name=name)
            for user, name in zip(users, names, strict=True)
        ),
        return_exceptions=True,
    )

    assert isinstance(results[2], asyncpg.UniqueViolationError)
    good = [name for name in names if name != "Bad"]
    assert [result.full_name for result in results if isinstance(result, User)] == good
    async with committed() as session:
        names_now = (
            await session.execute(text("SELECT full_name FROM users ORDER BY id"))
        ).scalars()
    assert list(names_now) == ["First", "Second", "User 2", "Third", "Fourth"]
    assert len(await user_events(committed, users[2].id)) == 0


async def test_in_hold_mode_a_change_after_a_failed_create_goes_as_a_create(
    core_settings: Settings, write_pool: asyncpg.Pool, committed: Sessions
) -> None:
    settings = core_settings.model_copy(update={"hold_until_lead_id": True})
    failed = await create_user(committed, settings, "Failed")
    fine = await create_user(committed, settings, "Fine")
    async with committed() as session, session.begin():
        await session.execute(
            text("UPDATE users SET sync_status = :failed WHERE id = :id"),
            {"failed": SyncStatus.FAILED.value, "id": failed.id},
        )
    groups = grouped_writes(write_pool, settings, in_flight=1)

    await asyncio.gather(
        move_user(groups, settings, fine.id, "IN_PROCESS"),  # alone, first
        move_user(groups, settings, fine.id, "CONVERTED"),
        change_user(groups, settings, failed.id, full_name="Failed again"),
        move_user(groups, settings, failed.id, "CONVERTED"),
    )

    failed_events = await user_events(committed, failed.id)
    assert [(event.pattern, event.version) for event in failed_events] == [
        (Pattern.USER_CREATED.value, 2),
        (Pattern.USER_MOVED.value, 3),
    ]
    assert failed_events[0].body["data"]["changed"] == ["full_name", "phone", "stage"]
    assert [event.pattern for event in await user_events(committed, fine.id)] == [
        Pattern.USER_MOVED.value,
        Pattern.USER_MOVED.value,
    ]


async def test_changes_answer_503_while_the_database_is_unreachable_then_recover(
    core_settings: Settings, committed: Sessions
) -> None:
    user = await create_user(committed, core_settings, "Mover")
    proxy, settings = await proxied_database(core_settings)

    async def post(stage: str) -> httpx.Response:
        return await http.post(f"/users/{user.id}/move", json={"stage": stage})

    async with running_core(settings) as http:
        assert (await post("IN_PROCESS")).status_code == 200
        await proxy.stop()
        during = await asyncio.gather(*(post("CONVERTED") for _ in range(5)))
        assert [response.status_code for response in during] == [503] * 5

        await proxy.start()
        after = await first_answer_after_503s(lambda: post("CONVERTED"))
        assert (after.status_code, after.json()["stage"]) == (200, "CONVERTED")
    await proxy.stop()

    assert [event.pattern for event in await user_events(committed, user.id)] == [
        Pattern.USER_MOVED.value,
        Pattern.USER_MOVED.value,
    ]


async def reply_recorded(
    sessions: Sessions, user_id: int, lead_id: int, synced_version: int
) -> None:
    """What the success of a user's create records, once: its lead and the version confirmed."""
    async with sessions() as session, session.begin():
        await session.execute(
            text(
                "UPDATE users SET bitrix_lead_id = :lead_id, synced_version = :synced_version,"
                " sync_status = :synced WHERE id = :id AND bitrix_lead_id IS NULL"
            ),
            {
                "lead_id": lead_id,
                "synced_version": synced_version,
                "synced": SyncStatus.SYNCED.value,
                "id": user_id,
            },
        )


@dataclass
class CountedStatements:
    """A group's statements on a driver connection, counted, with another writer's statement
    run right after each that takes no lock: the user changes between the group's statements."""

    statements: OnDriver
    between: Callable[[], Awaitable[None]] | None = None
    sent: int = 0
    unlocked: int = 0

    async def rows(
        self, statement: Executable, parameters: Mapping[str, Any]
    ) -> Sequence[Mapping[Any, Any]]:
        rows = await self.statements.rows(statement, parameters)
        self.sent += 1
        if not self.statements.connection.is_in_transaction():
            self.unlocked += 1
            if self.between is not None:
                await self.between()
        return rows

    def transaction(self) -> Any:
        return self.statements.transaction()


async def test_a_user_changed_between_read_and_write_is_changed_again_from_its_new_row(
    core_settings: Settings, write_pool: asyncpg.Pool, committed: Sessions
) -> None:
    contested = await create_user(committed, core_settings, "Contested")
    calm = await create_user(committed, core_settings, "Calm")

    async def reply_lands() -> None:
        await reply_recorded(committed, contested.id, lead_id=501, synced_version=1)

    async with write_pool.acquire() as driver:
        statements = CountedStatements(OnDriver(driver), reply_lands)
        changed = await user_service.apply_changes(
            statements,
            core_settings,
            [
                UserChange(contested.id, {"full_name": "Contested 2"}, Pattern.USER_UPDATED),
                UserChange(calm.id, {"full_name": "Calm 2"}, Pattern.USER_UPDATED),
            ],
        )

    # Read both; wrote the calm one and read the reply's row; wrote the contested one.
    assert statements.unlocked == 3
    assert [(user.full_name, user.version) for user in changed if user] == [
        ("Contested 2", 2),
        ("Calm 2", 2),
    ]
    assert changed[0] is not None
    assert changed[0].bitrix_lead_id == 501
    [event] = await user_events(committed, contested.id)
    # Built from the row the reply left: only the rename is news to Bitrix24.
    assert event.body["data"]["changed"] == ["full_name"]
    assert event.body["data"]["user"]["bitrix_lead_id"] == 501
    assert len(await user_events(committed, calm.id)) == 1


async def test_a_user_changed_every_time_between_read_and_write_is_changed_under_a_lock(
    core_settings: Settings, write_pool: asyncpg.Pool, committed: Sessions
) -> None:
    user = await create_user(committed, core_settings, "Busy")

    async def another_write() -> None:
        async with committed() as session, session.begin():
            await session.execute(
                text("UPDATE users SET sync_attempts = sync_attempts + 1 WHERE id = :id"),
                {"id": user.id},
            )

    async with write_pool.acquire() as driver:
        statements = CountedStatements(OnDriver(driver), another_write)
        (changed,) = await user_service.apply_changes(
            statements,
            core_settings,
            [UserChange(user.id, {"stage": "CONVERTED"}, Pattern.USER_MOVED)],
        )

    assert (statements.unlocked, statements.sent) == (OPTIMISTIC_ROUNDS, OPTIMISTIC_ROUNDS + 2)
    assert changed is not None
    assert (changed.stage, changed.version) == ("CONVERTED", 2)
    [event] = await user_events(committed, user.id)
    assert (event.pattern, event.version) == (Pattern.USER_MOVED.value, 2)


async def change_known(
    write_pool: asyncpg.Pool,
    settings: Settings,
    known: RecentRows,
    changes: list[UserChange],
) -> tuple[Sequence[User | None], int]:
    """The changes applied as a group of the app applies them, with the rows `known`; and the
    number of statements it took."""
    async with write_pool.acquire() as driver:
        statements = CountedStatements(OnDriver(driver))
        changed = await user_service.apply_changes(statements, settings, changes, known)
    return changed, statements.sent


async def test_a_user_whose_row_is_known_is_changed_in_one_statement(
    core_settings: Settings, write_pool: asyncpg.Pool, committed: Sessions
) -> None:
    users = [await create_user(committed, core_settings, f"Known {n}") for n in range(3)]
    known = RecentRows(size=10)

    def renames(round_: int) -> list[UserChange]:
        return [
            UserChange(user.id, {"full_name": f"Known {n} ({round_})"}, Pattern.USER_UPDATED)
            for n, user in enumerate(users)
        ]

    _, first = await change_known(write_pool, core_settings, known, renames(1))
    changed, second = await change_known(write_pool, core_settings, known, renames(2))

    assert (first, second) == (2, 1)  # a read and a write, then the write alone
    assert [(user.full_name, user.version) for user in changed if user] == [
        (f"Known {n} (2)", 3) for n in range(3)
    ]
    for user in users:
        events = await user_events(committed, user.id)
        assert [event.version for event in events] == [2, 3]
        assert events[-1].body["data"]["user"]["full_name"].endswith("(2)")


async def test_a_known_row_written_since_is_read_again_not_written_over(
    core_settings: Settings, write_pool: asyncpg.Pool, committed: Sessions
) -> None:
    user = await create_user(committed, core_settings, "Replied")
    known = RecentRows(size=10)
    await change_known(
        write_pool,
        core_settings,
        known,
        [UserChange(user.id, {"full_name": "Replied 2"}, Pattern.USER_UPDATED)],
    )
    # A reply, and another process's move: the row known is out of date.
    await reply_recorded(committed, user.id, lead_id=502, synced_version=2)
    async with committed() as session, session.begin():
        moved = "UPDATE users SET stage = 'CONVERTED', stage_version = 3, version = 3"
        await session.execute(text(moved + " WHERE id = :id"), {"id": user.id})

    # To the known row this move changes nothing; to the row as it is, it does.
    (moved,), sent = await change_known(
        write_pool,
        core_settings,
        known,
        [UserChange(user.id, {"stage": "NEW"}, Pattern.USER_MOVED)],
    )

    assert sent == 2  # the write missed and read the row; then the write from it
    assert moved is not None
    assert (moved.stage, moved.version, moved.bitrix_lead_id) == ("NEW", 4, 502)
    events = await user_events(committed, user.id)
    assert [(event.pattern, event.version) for event in events] == [
        (Pattern.USER_UPDATED.value, 2),
        (Pattern.USER_MOVED.value, 4),
    ]
    assert events[-1].body["data"]["changed"] == ["stage"]


async def test_a_change_to_nothing_new_on_a_known_row_answers_without_a_write(
    core_settings: Settings, write_pool: asyncpg.Pool, committed: Sessions
) -> None:
    user = await create_user(committed, core_settings, "Still")
    known = RecentRows(size=10)
    move = [UserChange(user.id, {"stage": "IN_PROCESS"}, Pattern.USER_MOVED)]
    await change_known(write_pool, core_settings, known, move)

    (again,), sent = await change_known(write_pool, core_settings, known, move)

    assert sent == 1  # the row known is the row as it is
    assert again is not None
    assert (again.stage, again.version) == ("IN_PROCESS", 2)
    assert len(await user_events(committed, user.id)) == 1


def test_recent_rows_keep_the_newest_up_to_their_size_and_age() -> None:
    rows = RecentRows(size=2, max_age_s=60.0)
    rows.put({1: {"id": 1}, 2: {"id": 2}})
    rows.put({1: {"id": 1, "seen": 2}, 3: {"id": 3}})  # 1 is newer than 2 now

    assert rows.get([1, 2, 3]) == {1: {"id": 1, "seen": 2}, 3: {"id": 3}}
    aged = RecentRows(size=2, max_age_s=0.0)
    aged.put({1: {"id": 1}})
    assert aged.get([1]) == {}


async def test_the_groups_plan_each_statement_once_per_connection_looking_users_up_by_key(
    core_settings: Settings, write_pool: asyncpg.Pool, committed: Sessions
) -> None:
    """PostgreSQL's generic plan, made at a connection's first run of a statement, while the
    users table is nearly empty, and used for every run after it: never planned again per run,
    never a scan of the whole table."""
    groups = grouped_writes(write_pool, core_settings, in_flight=1)
    users = [await create_user(groups, core_settings, f"User {n}") for n in range(3)]
    for n in range(9):
        await change_user(groups, core_settings, users[n % 3].id, full_name=f"Renamed {n}")

    connections = [await write_pool.acquire() for _ in range(write_pool.get_max_size())]
    try:
        plans: dict[str, tuple[int, int, str]] = {}
        for connection in connections:
            for prepared in await connection.fetch(
                "SELECT name, statement, parameter_types, generic_plans, custom_plans"
                " FROM pg_prepared_statements WHERE statement LIKE $1 AND statement NOT LIKE $2",
                "%INSERT INTO outbox_events%",
                "%pg_prepared_statements%",  # this very query
            ):
                nulls = ", ".join(["NULL"] * len(prepared["parameter_types"]))
                plan = await connection.fetch(f"EXPLAIN EXECUTE {prepared['name']}({nulls})")
                kind = "change" if "UPDATE users" in prepared["statement"] else "create"
                plans[kind] = (
                    prepared["generic_plans"],
                    prepared["custom_plans"],
                    "\n".join(line[0] for line in plan),
                )
    finally:
        for connection in connections:
            await write_pool.release(connection)

    assert set(plans) == {"create", "change"}
    assert plans["create"][:2] == (3, 0)
    # A user not known yet is read by a first run, then written by a second.
    assert plans["change"][:2] == (9 + len(users), 0)
    assert "users_pkey" in plans["change"][2]
    for _, _, plan in plans.values():
        assert "Seq Scan" not in plan, plan
