"""The transactional outbox against the real PostgreSQL and RabbitMQ: every committed change
reaches the queue in the contract's shape, in order, at least once — also across broker
outages, several relays and a Core killed mid-batch."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
from asyncio.subprocess import PIPE, STDOUT
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from uuid import UUID, uuid4

import aio_pika
import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from b24sync.contracts import Event, Pattern, ReplyData
from b24sync.core.models import OutboxEvent, User
from b24sync.core.outbox.process import PROCESS_NAME as RELAY_PROCESS_NAME
from b24sync.core.outbox.relay import Relay, waves, wire_body
from b24sync.core.outbox.repository import (
    RELAY_LOCK_KEY,
    PendingEvent,
    claim_batch,
    relay_transaction,
    requeue_unanswered,
    unmark_published,
)
from b24sync.core.outbox.service import EventDraft, NewUserState, build_event, outbox_service
from b24sync.core.sync.service import reply_service
from b24sync.core.users.schemas import UserCreate
from b24sync.core.users.service import user_service
from b24sync.settings import Settings
from tests.conftest import eventually
from tests.core.helpers import (
    Sessions,
    all_published,
    create_user,
    event_ids,
    move_user,
    rename_user,
    running_core,
    unpublished,
)
from tests.core.rabbit import Received, TcpProxy, drain, publish_raw, queue_depth
from tests.processes import B24SYNC, service_environment


def versions_by_user(messages: list[Received]) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = defaultdict(list)
    for message in messages:
        user = message.body["data"]["user"]
        seen[user["id"]].append(user["version"])
    return seen


def test_waves_keep_each_users_events_apart_and_in_order() -> None:
    events = [PendingEvent(uuid4(), seq, user, {}) for seq, user in enumerate([1, 2, 1, 3, 1, 2])]
    grouped = waves(events)
    assert [[(e.seq, e.user_id) for e in wave] for wave in grouped] == [
        [(0, 1), (1, 2), (3, 3)],
        [(2, 1), (5, 2)],
        [(4, 1)],
    ]


def test_an_event_is_laid_out_as_the_contract_reads_it_and_leaves_in_that_order() -> None:
    body = build_event(
        NewUserState("Иван Иванов", "+77001112233", "NEW"), Pattern.USER_CREATED, "q"
    )
    assert json.dumps(Event.model_validate(body).wire()) == json.dumps(body)
    # As jsonb returns it (its own key order), with the lead id learnt since.
    data = {key: body["data"][key] for key in sorted(body["data"])}
    stored = {
        "data": {**data, "user": dict(sorted(data["user"].items()))},
        "pattern": "user_created",
    }
    sent = wire_body(stored, 42)
    user = {**body["data"]["user"], "bitrix_lead_id": 42}
    expected = {"pattern": "user_created", "data": {**body["data"], "user": user}}
    assert json.dumps(sent) == json.dumps(expected)
    assert list(sent["data"]) == ["action", "user", "replyQueue", "changed"]
    assert list(sent["data"]["user"]) == [
        "id", "full_name", "phone", "stage", "bitrix_lead_id", "version"
    ]  # fmt: skip


async def test_the_batch_is_read_only_by_the_relay_that_gets_the_lock(
    core_settings: Settings, engine: AsyncEngine, committed: Sessions
) -> None:
    users = [await create_user(committed, core_settings, f"Batch {n}") for n in range(3)]
    await rename_user(committed, core_settings, users[0].id, "Batch 0 renamed")
    pending = await event_ids(committed)

    async with engine.connect() as other, other.begin():
        await other.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": RELAY_LOCK_KEY})
        async with relay_transaction(engine) as transaction:
            assert await claim_batch(transaction, 10) == []

    async with relay_transaction(engine) as transaction:
        events = await claim_batch(transaction, 10)
        assert [str(event.id) for event in events] == pending
        assert [event.user_id for event in events] == [user.id for user in users] + [users[0].id]
        assert [event.seq for event in events] == sorted(event.seq for event in events)
        assert events[-1].body["data"]["user"]["full_name"] == "Batch 0 renamed"


async def test_a_claimed_batch_is_published_only_when_its_transaction_commits(
    core_settings: Settings, engine: AsyncEngine, committed: Sessions
) -> None:
    for n in range(3):
        await create_user(committed, core_settings, f"Claimed {n}")

    async def published() -> list[bool]:
        async with committed() as session:
            rows = await session.execute(
                text("SELECT published_at IS NOT NULL FROM outbox_events ORDER BY seq")
            )
            return list(rows.scalars())

    claimed = []
    with contextlib.suppress(RuntimeError):  # the broker failed the whole batch
        async with relay_transaction(engine) as transaction:
            claimed = await claim_batch(transaction, 10)
            raise RuntimeError("not confirmed")
    assert len(claimed) == 3
    assert await published() == [False, False, False]

    async with relay_transaction(engine) as transaction:
        events = await claim_batch(transaction, 10)
        await unmark_published(transaction, [events[2].id])  # the first two confirmed
    assert await published() == [True, True, False]
    async with relay_transaction(engine) as transaction:
        assert [event.id for event in await claim_batch(transaction, 10)] == [events[2].id]


async def test_committed_changes_reach_the_queue_in_contract_shape(
    running_app: httpx.AsyncClient,
    core_settings: Settings,
    committed: Sessions,
    capfd: pytest.CaptureFixture[str],
) -> None:
    created = await running_app.post(
        "/users", json={"full_name": "Иван Иванов", "phone": "+77001112233", "stage": "NEW"}
    )
    user_id = created.json()["id"]
    await running_app.patch(
        f"/users/{user_id}",
        json={"full_name": "Иван Петров", "phone": "+77001112233", "stage": "IN_PROCESS"},
    )
    await running_app.post(f"/users/{user_id}/move", json={"stage": "CONVERTED"})

    messages = await drain(core_settings.rabbitmq_queue, 3)
    reply_queue = core_settings.rabbitmq_reply_queue
    user = {"id": user_id, "full_name": "Иван Иванов", "phone": "+77001112233", "stage": "NEW"}
    expected = [
        ("user_created", "create_card", {**user, "version": 1}),
        ("user_updated", "update_card", {**user, "full_name": "Иван Петров",
                                         "stage": "IN_PROCESS", "version": 2}),
        ("user_moved", "move_card", {**user, "full_name": "Иван Петров",
                                     "stage": "CONVERTED", "version": 3}),
    ]  # fmt: skip
    assert [m.body for m in messages] == [
        {
            "pattern": pattern,
            "data": {
                "action": action,
                "user": {**payload, "bitrix_lead_id": None},
                "replyQueue": reply_queue,
                # Nothing confirmed by Bitrix24 yet: every event carries every field.
                "changed": ["full_name", "phone", "stage"],
            },
        }
        for pattern, action, payload in expected
    ]
    assert all(m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT for m in messages)
    assert all(m.content_type == "application/json" for m in messages)
    assert [m.message_id for m in messages] == await event_ids(committed)
    await eventually(lambda: all_published(committed))
    logged = capfd.readouterr().out
    assert "[Core] Connected to RabbitMQ successfully" in logged
    assert '[Core] About to emit message to BITRIX_SERVICE: {"pattern": "user_created"' in logged
    assert logged.count("[Core] Message emitted successfully") >= 3


async def test_events_of_each_user_leave_in_commit_order(
    running_app: httpx.AsyncClient, core_settings: Settings, committed: Sessions
) -> None:
    users = [await create_user(committed, core_settings, f"User {n}") for n in range(5)]

    async def churn(user: User) -> None:
        for step in range(6):
            await rename_user(committed, core_settings, user.id, f"User {user.id} step {step}")
            await move_user(committed, core_settings, user.id, ["JUNK", "NEW"][step % 2])

    await asyncio.gather(*(churn(user) for user in users))

    messages = await drain(core_settings.rabbitmq_queue, 5 * 13)
    assert versions_by_user(messages) == {user.id: list(range(1, 14)) for user in users}


async def test_broker_down_keeps_writes_and_events_flow_when_back(
    core_settings: Settings, committed: Sessions
) -> None:
    proxy = TcpProxy()  # not listening yet: RabbitMQ is "down"
    settings = core_settings.model_copy(update={"rabbitmq_url": proxy.amqp_url})
    async with running_core(settings) as http:
        ready = await http.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"] == {"postgresql": "ok", "rabbitmq": "unreachable"}
        for n in range(3):
            response = await http.post(
                "/users", json={"full_name": f"Offline {n}", "phone": "+77001112233"}
            )
            assert response.status_code == 201
        assert await unpublished(committed) == 3

        await proxy.start()
        first = await drain(settings.rabbitmq_queue, 3)
        # Order is kept per user; these are three users.
        assert sorted(m.body["data"]["user"]["full_name"] for m in first) == [
            "Offline 0",
            "Offline 1",
            "Offline 2",
        ]

        # The connection drops while Core runs; a write in the gap goes out after reconnect.
        await proxy.stop()
        response = await http.post("/users", json={"full_name": "Gap", "phone": "+77001112233"})
        assert response.status_code == 201
        await proxy.start()
        second = await drain(settings.rabbitmq_queue, 1)
        assert [m.body["data"]["user"]["full_name"] for m in second] == ["Gap"]

        # The reply consumer came back with the connection too.
        user_id = response.json()["id"]
        reply = {"status": "success", "action": "create_card", "bitrix_lead_id": 77,
                 "user": {"id": user_id, "version": 1}}  # fmt: skip
        await publish_raw(settings.rabbitmq_reply_queue, json.dumps(reply))

        async def synced() -> bool:
            state = (await http.get(f"/users/{user_id}")).json()
            return bool(state["sync"]["status"] == "synced")

        await eventually(synced)
        user = (await http.get(f"/users/{user_id}")).json()
        assert user["bitrix_lead_id"] == 77
        assert user["sync"]["status"] == "synced"
        await eventually(lambda: all_published(committed))
    await proxy.stop()


async def test_two_relays_keep_per_user_order(
    core_settings: Settings, engine: AsyncEngine, committed: Sessions
) -> None:
    settings = core_settings.model_copy(update={"outbox_batch_size": 7})
    relays = [asyncio.create_task(Relay(settings, engine).run()) for _ in range(2)]
    try:
        users = [await create_user(committed, settings, f"Pair {n}") for n in range(6)]

        async def churn(user: User) -> None:
            for step in range(8):
                await rename_user(committed, settings, user.id, f"Pair {user.id}.{step}")

        await asyncio.gather(*(churn(user) for user in users))
        messages = await drain(settings.rabbitmq_queue, 6 * 9)
    finally:
        for relay in relays:
            relay.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
    assert versions_by_user(messages) == {user.id: list(range(1, 10)) for user in users}
    assert len({m.message_id for m in messages}) == len(messages)


async def _published_after_creation(committed: Sessions, user_ids: list[int]) -> list[float]:
    """Seconds from each user's event being written to its publication, in the order given."""
    async with committed() as session:
        rows = await session.execute(
            text(
                "SELECT user_id, extract(epoch FROM published_at - created_at)"
                " FROM outbox_events WHERE user_id = ANY(:ids)"
            ),
            {"ids": user_ids},
        )
        waited = {user_id: float(seconds) for user_id, seconds in rows}
    return [waited[user_id] for user_id in user_ids]


def _gap_settings(core_settings: Settings) -> Settings:
    """A relay that waits up to 2 s for company after a batch (2 ms per event of it), and
    polls only every 30 s: what it publishes sooner, it was woken for or read after a gap."""
    return core_settings.model_copy(
        update={"outbox_batch_gap_ms": 2000, "outbox_batch_size": 500, "outbox_poll_interval_s": 30}
    )


async def _burst(committed: Sessions, settings: Settings, count: int) -> None:
    """`count` users and their events in one transaction: one batch for the relay."""
    async with committed() as session, session.begin():
        data = UserCreate(full_name="Burst", phone="+77001112233")
        new = [user_service.new_user(settings, data) for _ in range(count)]
        await user_service.create_many(session, new)


async def test_a_trickle_leaves_at_once_and_a_large_batch_makes_the_next_wait_for_company(
    core_settings: Settings, engine: AsyncEngine, committed: Sessions
) -> None:
    settings = _gap_settings(core_settings)
    relay = asyncio.create_task(Relay(settings, engine).run())
    try:
        # A trickle: each event leaves on its own, within milliseconds, though the setting
        # would allow a wait of up to 2 s.
        trickle = []
        for n in range(3):
            trickle.append((await create_user(committed, settings, f"Trickle {n}")).id)
            await drain(settings.rabbitmq_queue, 1)
            await asyncio.sleep(0.05)
        # 400 events in one batch: the next batch begins no sooner than 0.8 s after it.
        await _burst(committed, settings, 400)
        await eventually(lambda: all_published(committed))
        after = [(await create_user(committed, settings, "After 1")).id]
        await asyncio.sleep(0.1)
        after.append((await create_user(committed, settings, "After 2")).id)
        await drain(settings.rabbitmq_queue, 402)
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
    assert max(await _published_after_creation(committed, trickle)) < 0.25
    first, second = await _published_after_creation(committed, after)
    # Both waited out the gap and left in one batch: the first 0.1 s longer than the second.
    assert second > 0.1
    assert 0.05 < first - second < 0.15


async def _relay_listens(committed: Sessions) -> bool | None:
    """Whether the relay's LISTEN connection listens, by the last statement PostgreSQL saw on
    it (None: there is no such connection)."""
    async with committed() as session:
        last = await session.scalar(
            text(
                "SELECT query FROM pg_stat_activity WHERE datname = current_database()"
                " AND state = 'idle' AND query ~ '^(UN)?LISTEN '"
            )
        )
    return None if last is None else last.startswith("LISTEN")


async def _relay_listening(committed: Sessions, listening: bool) -> bool:
    return await _relay_listens(committed) is listening


@pytest.mark.parametrize("cut", [False, True], ids=["", "its connection cut meanwhile"])
async def test_under_load_the_relay_does_not_listen_and_listens_again_when_the_load_ends(
    core_settings: Settings, engine: AsyncEngine, committed: Sessions, cut: bool
) -> None:
    settings = _gap_settings(core_settings)
    relay = asyncio.create_task(Relay(settings, engine).run())
    try:
        await eventually(lambda: _relay_listening(committed, True))
        # 400 events in one batch: the relay waits 0.8 s for company, not listening meanwhile.
        await _burst(committed, settings, 400)
        await eventually(lambda: all_published(committed))
        await eventually(lambda: _relay_listening(committed, False), wait_s=0.5)
        if cut:
            async with committed() as session:
                cut_off = await session.scalar(
                    text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND query ~ '^UNLISTEN '"
                    )
                )
            assert cut_off == 1
        # Written while it does not listen: read by the batch after the gap, not the poll's.
        during = [(await create_user(committed, settings, "During the gap")).id]
        await drain(settings.rabbitmq_queue, 401)
        # That batch was a lone event: the load is over, and the relay listens again (on a
        # connection opened anew, if it was cut).
        await eventually(lambda: _relay_listening(committed, True))
        after = [(await create_user(committed, settings, "After")).id]
        await drain(settings.rabbitmq_queue, 1)
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
    assert max(await _published_after_creation(committed, during)) < 0.9
    assert max(await _published_after_creation(committed, after)) < 0.25


async def test_core_killed_mid_batch_loses_nothing(
    core_settings: Settings, engine: AsyncEngine, committed: Sessions, tmp_path: Path
) -> None:
    users, versions = 1000, 3
    total = users * versions
    async with committed() as session, session.begin():
        rows = await session.execute(
            text(
                "INSERT INTO users (full_name, phone, stage)"
                " SELECT 'Bulk ' || n, '+77001112233', 'NEW' FROM generate_series(1, :n) AS n"
                " RETURNING id, full_name, phone, stage, version, bitrix_lead_id, sync_force"
            ),
            {"n": users},
        )
        events = []
        for row in rows:
            for version in range(1, versions + 1):
                user = User(**{**row._asdict(), "version": version})
                pattern = Pattern.USER_CREATED if version == 1 else Pattern.USER_UPDATED
                body = build_event(user, pattern, core_settings.rabbitmq_reply_queue)
                events.append({"id": uuid4(), "user_id": user.id, "pattern": pattern.value,
                               "version": version, "body": body})  # fmt: skip
        await session.execute(OutboxEvent.__table__.insert(), events)
    all_ids = set(await event_ids(committed))

    # One batch for everything, sent in three waves (one event per user each). Its commit is
    # held back (`commit_held`) until Core is dead: every message is out and confirmed, and
    # none is marked published.
    env = service_environment(core_settings, OUTBOX_BATCH_SIZE=str(total * 2))
    async with commit_held(engine) as waiting_on_commit:
        core = await asyncio.create_subprocess_exec(B24SYNC, "core", env=env, cwd=tmp_path)
        try:
            await eventually(waiting_on_commit, wait_s=60)
        finally:
            core.send_signal(signal.SIGKILL)
            await core.wait()
    assert await queue_depth(core_settings.rabbitmq_queue) == total
    assert await unpublished(committed) == total  # the batch never committed

    relay = asyncio.create_task(Relay(core_settings, engine).run())
    try:
        messages = await drain(core_settings.rabbitmq_queue, 2 * total)
        await eventually(lambda: all_published(committed))
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
    assert {m.message_id for m in messages} == all_ids
    assert len(messages) == 2 * total  # each event twice, with its message_id both times


# The advisory lock key `commit_held` holds (the relay's own is RELAY_LOCK_KEY).
_COMMIT_GATE_KEY = 0x6232_3473


@contextlib.asynccontextmanager
async def commit_held(engine: AsyncEngine) -> AsyncIterator[Callable[[], Awaitable[bool]]]:
    """Holds back the commit of any transaction that marks outbox events published: a deferred
    trigger waits at commit for an advisory lock held here. Yields a check that a commit is
    waiting. On exit the waiting transaction is ended without committing, then the trigger is
    dropped."""
    async with engine.connect() as gate:
        await gate.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _COMMIT_GATE_KEY})
        await gate.execute(text(f"""
            CREATE FUNCTION wait_for_commit_gate() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_advisory_xact_lock({_COMMIT_GATE_KEY}); RETURN NULL; END $$
        """))  # fmt: skip
        await gate.execute(text(
            "CREATE CONSTRAINT TRIGGER commit_gate AFTER UPDATE ON outbox_events"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION wait_for_commit_gate()"
        ))  # fmt: skip
        await gate.commit()
        waiting = text(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND objid = :key AND database = (SELECT oid FROM pg_database"
            " WHERE datname = current_database())"
        )

        async def waiting_on_commit() -> bool:
            return bool((await gate.execute(waiting, {"key": _COMMIT_GATE_KEY})).all())

        try:
            yield waiting_on_commit
        finally:
            # Ended before the lock is let go: a backend whose client died would still commit.
            for (pid,) in (await gate.execute(waiting, {"key": _COMMIT_GATE_KEY})).all():
                await gate.execute(text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": pid})
            await gate.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _COMMIT_GATE_KEY})
            await gate.execute(text("DROP TRIGGER commit_gate ON outbox_events"))
            await gate.execute(text("DROP FUNCTION wait_for_commit_gate()"))
            await gate.commit()


def _relay_processes(parent: int) -> list[int]:
    """The parent's children that run the relay, by the name the relay gives its process
    (multiprocessing's resource tracker is a child too)."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    return [
        int(pid)
        for pid in children
        if Path(f"/proc/{pid}/comm").read_text().strip() == RELAY_PROCESS_NAME
    ]


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has finished running


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
async def test_relay_in_a_process_of_its_own(
    core_settings: Settings, committed: Sessions, tmp_path: Path, stop: signal.Signals
) -> None:
    env = service_environment(core_settings, OUTBOX_RELAY_PROCESS="true")
    core = await asyncio.create_subprocess_exec(B24SYNC, "core", env=env, cwd=tmp_path)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{core_settings.port}") as http:
            for _ in range(400):
                assert core.returncode is None, "Core exited while starting"
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            created = await http.post(
                "/users", json={"full_name": "Иван Иванов", "phone": "+77001112233"}
            )
        assert created.status_code == 201
        messages = await drain(core_settings.rabbitmq_queue, 1)
        assert [m.body["data"]["user"]["id"] for m in messages] == [created.json()["id"]]
        await eventually(lambda: all_published(committed))
        relays = _relay_processes(core.pid)
        assert len(relays) == 1
    finally:
        core.send_signal(stop)
        await asyncio.wait_for(core.wait(), 60)
    assert core.returncode == (0 if stop == signal.SIGTERM else -signal.SIGKILL)

    async def relay_gone() -> bool:  # the relay dies with Core, killed or stopped
        return not _running(relays[0])

    await eventually(relay_gone, wait_s=5)
    assert not _running(relays[0])


async def test_core_refuses_to_start_on_unmigrated_database(
    core_settings: Settings, tmp_path: Path
) -> None:
    empty = make_url(core_settings.database_url).set(database="postgres")
    env = {**os.environ, "DATABASE_URL": empty.render_as_string(hide_password=False),
           "PORT": str(core_settings.port)}  # fmt: skip
    core = await asyncio.create_subprocess_exec(
        B24SYNC, "core", env=env, cwd=tmp_path, stdout=PIPE, stderr=STDOUT
    )
    output, _ = await asyncio.wait_for(core.communicate(), 60)
    assert core.returncode == 1
    assert "run `b24sync migrate` first" in output.decode()


async def test_readyz_when_everything_is_up(running_app: httpx.AsyncClient) -> None:

    async def ready() -> bool:  # the broker connects in the background right after startup
        return (await running_app.get("/readyz")).status_code == 200

    await eventually(ready, wait_s=5)
    response = await running_app.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "checks": {"postgresql": "ok", "rabbitmq": "ok"}}


async def test_a_user_is_never_created_without_its_event(
    core_settings: Settings, committed: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await create_user(committed, core_settings, "First")
    [taken] = await event_ids(committed)
    draft = outbox_service.draft

    def reused_id(user: User, pattern: Pattern, reply_queue: str) -> EventDraft:
        return dataclasses.replace(draft(user, pattern, reply_queue), id=UUID(taken))

    # The event's insert fails (its id exists): the user's insert must not stay either.
    monkeypatch.setattr(outbox_service, "draft", reused_id)
    with pytest.raises(asyncpg.UniqueViolationError):
        await create_user(committed, core_settings, "Second")
    async with committed() as session:
        names = (await session.execute(text("SELECT full_name FROM users"))).scalars().all()
    assert names == [first.full_name]
    assert await event_ids(committed) == [taken]


async def answer_success(sessions: Sessions, settings: Settings, user: User) -> None:
    reply = ReplyData.model_validate(
        {
            "status": "success",
            "bitrix_lead_id": 5,
            "user": {"id": user.id, "version": user.version},
        }
    )
    async with sessions() as session, session.begin():
        await reply_service.apply(session, settings, reply)


async def test_a_change_left_without_an_answer_is_sent_again(
    core_settings: Settings, engine: AsyncEngine, committed: Sessions
) -> None:
    settings = core_settings.model_copy(update={"sync_resend_after_s": 2.0})
    relay = asyncio.create_task(Relay(settings, engine).run())
    try:
        answered = await create_user(committed, settings, "Answered")
        lost = await create_user(committed, settings, "Lost")
        first = await drain(settings.rabbitmq_queue, 2)
        await answer_success(committed, settings, answered)
        # Nothing answers for "Lost" (its job gone with Redis's data, say): it comes again.
        again = await drain(settings.rabbitmq_queue, 1, timeout_s=15)
        await eventually(lambda: all_published(committed))
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)

    lost_first = next(m for m in first if m.body["data"]["user"]["id"] == lost.id)
    assert [m.message_id for m in again] == [lost_first.message_id]
    assert again[0].body == lost_first.body
    async with committed() as session:
        resends = dict(
            (await session.execute(text("SELECT user_id, resends FROM outbox_events"))).all()
        )
    assert resends[answered.id] == 0
    assert resends[lost.id] >= 1


async def test_resends_wait_longer_each_time_and_only_for_the_latest_event(
    core_settings: Settings, engine: AsyncEngine, committed: Sessions
) -> None:
    user = await create_user(committed, core_settings, "Waiting")
    user = await rename_user(committed, core_settings, user.id, "Waiting longer")
    [older, latest] = await event_ids(committed)

    async def published_ago(seconds: int, resends: int) -> int:
        async with committed() as session, session.begin():
            await session.execute(
                text(
                    "UPDATE outbox_events SET resends = :resends, published_at = now()"
                    " - make_interval(secs => :seconds)"
                ),
                {"resends": resends, "seconds": seconds},
            )
        async with relay_transaction(engine) as transaction:
            return await requeue_unanswered(transaction, after_s=100, limit=10)

    assert await published_ago(50, resends=0) == 0  # not yet
    assert await published_ago(150, resends=1) == 0  # the second resend waits 200 s
    assert await published_ago(150, resends=0) == 1
    async with committed() as session:
        rows = (
            await session.execute(text("SELECT id, resends, published_at FROM outbox_events"))
        ).all()
    state = {str(row.id): (row.resends, row.published_at is None) for row in rows}
    assert state == {older: (0, False), latest: (1, True)}

    await answer_success(committed, core_settings, user)  # synced: nothing left to send again
    assert await published_ago(1000, resends=0) == 0


async def test_every_unanswered_change_is_queued_again_in_one_pass(
    core_settings: Settings, engine: AsyncEngine, committed: Sessions
) -> None:
    settings = core_settings.model_copy(
        update={"outbox_batch_size": 10, "sync_resend_after_s": 100}
    )
    for n in range(25):
        await create_user(committed, settings, f"Unanswered {n}")
    async with committed() as session, session.begin():
        await session.execute(
            text("UPDATE outbox_events SET published_at = now() - interval '1 hour'")
        )

    assert await Relay(settings, engine).resend_unanswered() == 25  # three chunks
    assert await unpublished(committed) == 25
