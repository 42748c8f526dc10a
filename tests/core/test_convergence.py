"""Every user converges on its latest state: events carry every field changed since the version
Bitrix24 confirmed, go out with the lead id known when they leave, transient failures are
retried by Core past the job's window, a success brings waiting retries forward, and in hold
mode updates and moves wait for the lead id. On the real PostgreSQL (rolled back where no
relay runs) and RabbitMQ."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from b24sync.core.outbox.relay import Relay
from b24sync.core.sync.service import Outcome, resync_service, retry_delay_s
from b24sync.settings import Settings
from tests.core.helpers import (
    answer,
    change_user,
    create_user,
    error,
    events_of,
    move_user,
    publish_all,
    read_user,
    rename_user,
    success,
    unpublished,
)
from tests.core.rabbit import drain

Sessions = async_sessionmaker[AsyncSession]
ALL_FIELDS = ["full_name", "phone", "stage"]


@pytest.fixture
def sessions(rollback_sessionmaker: Sessions) -> Sessions:
    return rollback_sessionmaker


async def sql(sessions: Sessions, statement: str, **params: Any) -> None:
    async with sessions() as session, session.begin():
        await session.execute(text(statement), params)


async def synced_user(sessions: Sessions, settings: Settings, lead: int = 456) -> int:
    """A user whose create went out and was written to lead `lead`."""
    user = await create_user(sessions, settings)
    await publish_all(sessions)
    [event] = await events_of(sessions, user.id)
    await answer(sessions, settings, success(user.id, 1, lead=lead), event.id)
    return user.id


async def latest_event_fails(
    sessions: Sessions, settings: Settings, user_id: int, *, retryable: bool = True
) -> None:
    await publish_all(sessions)
    *_, event = await events_of(sessions, user_id)
    user = await read_user(sessions, user_id)
    reply = error(user_id, user.version, reason="HTTP 503", retryable=retryable)
    await answer(sessions, settings, reply, event.id)
    assert (await read_user(sessions, user_id)).sync_status == "failed"


async def retry_due(sessions: Sessions, settings: Settings, *, probe: bool = False) -> int:
    async with sessions() as session, session.begin():
        return await resync_service.retry_due(session, settings, probe=probe)


async def make_due(sessions: Sessions, user_id: int) -> None:
    await sql(
        sessions,
        "UPDATE users SET next_sync_at = now() - interval '1 second' WHERE id = :id",
        id=user_id,
    )


# --- What an event carries ------------------------------------------------------------------


async def test_a_change_carries_only_the_fields_changed_since_the_confirmed_version(
    sessions: Sessions, core_settings: Settings
) -> None:
    user_id = await synced_user(sessions, core_settings)
    await rename_user(sessions, core_settings, user_id, "Иван Петров")
    await change_user(sessions, core_settings, user_id, phone="+77009998877")  # v2 unconfirmed
    create, rename, phone = await events_of(sessions, user_id)
    assert create.body["data"]["changed"] == ALL_FIELDS
    assert rename.body["data"]["changed"] == ["full_name"]
    assert phone.body["data"]["changed"] == ["full_name", "phone"]
    assert [event.version for event in (create, rename, phone)] == [1, 2, 3]


async def test_a_move_after_a_failed_update_carries_the_phone(
    sessions: Sessions, core_settings: Settings
) -> None:
    user_id = await synced_user(sessions, core_settings)
    await change_user(sessions, core_settings, user_id, phone="+77009998877")
    await latest_event_fails(sessions, core_settings, user_id)
    await move_user(sessions, core_settings, user_id, "CONVERTED")
    *_, move = await events_of(sessions, user_id)
    assert move.pattern == "user_moved"
    assert move.body["data"]["changed"] == ["phone", "stage"]
    assert move.body["data"]["user"]["phone"] == "+77009998877"
    # The change starts the user's sync state afresh.
    user = await read_user(sessions, user_id)
    assert (user.sync_status, user.sync_error, user.next_sync_at) == ("pending", None, None)


async def test_events_go_out_with_the_lead_id_known_when_they_leave(
    core_settings: Settings, engine: AsyncEngine, committed: Sessions
) -> None:
    user = await create_user(committed, core_settings)
    await rename_user(committed, core_settings, user.id, "Иван Петров")
    # The create's answer came before the relay sent anything (its event still waits).
    assert await answer(committed, core_settings, success(user.id, 1, lead=77)) is Outcome.APPLIED

    assert await Relay(core_settings, engine).publish_batch() == 2
    messages = await drain(core_settings.rabbitmq_queue, 2)
    assert [m.body["data"]["user"]["bitrix_lead_id"] for m in messages] == [77, 77]
    assert [m.body["data"]["changed"] for m in messages] == [ALL_FIELDS, ALL_FIELDS]
    assert list(messages[1].body["data"]) == ["action", "user", "replyQueue", "changed"]


# --- Core's retries -------------------------------------------------------------------------


async def test_a_due_retry_is_a_new_event_of_the_same_version(
    sessions: Sessions, core_settings: Settings
) -> None:
    user_id = await synced_user(sessions, core_settings)
    await rename_user(sessions, core_settings, user_id, "Иван Петров")
    await latest_event_fails(sessions, core_settings, user_id)
    assert await retry_due(sessions, core_settings) == 0  # its time has not come

    await make_due(sessions, user_id)
    assert await retry_due(sessions, core_settings) == 1
    *_, failed, retry = await events_of(sessions, user_id)
    assert retry.id != failed.id
    assert (retry.pattern, retry.version) == ("user_updated", 2)
    assert retry.body["data"]["action"] == "update_card"
    assert retry.body["data"]["changed"] == ["full_name"]
    assert retry.body["data"]["user"]["bitrix_lead_id"] == 456
    assert "force" not in retry.body["data"]
    user = await read_user(sessions, user_id)
    assert (user.sync_status, user.sync_retries, user.next_sync_at) == ("pending", 1, None)
    assert user.sync_error == "HTTP 503"  # the last failure stays on show meanwhile

    # It fails again: the next wait is twice as long.
    now = datetime.now(UTC)
    await latest_event_fails(sessions, core_settings, user_id)
    again = await read_user(sessions, user_id)
    assert again.next_sync_at is not None
    assert now + timedelta(seconds=47) < again.next_sync_at < now + timedelta(seconds=73)
    await make_due(sessions, user_id)
    assert await retry_due(sessions, core_settings) == 1
    *_, success_event = await events_of(sessions, user_id)
    await answer(sessions, core_settings, success(user_id, 2), success_event.id)
    done = await read_user(sessions, user_id)
    assert (done.sync_status, done.sync_retries, done.sync_error) == ("synced", 0, None)


async def test_a_user_whose_create_failed_is_retried_as_a_create(
    sessions: Sessions, core_settings: Settings
) -> None:
    user = await create_user(sessions, core_settings)
    await latest_event_fails(sessions, core_settings, user.id)
    await make_due(sessions, user.id)
    assert await retry_due(sessions, core_settings) == 1
    _, retry = await events_of(sessions, user.id)
    assert (retry.pattern, retry.version, retry.body["data"]["changed"]) == (
        "user_created",
        1,
        ALL_FIELDS,
    )


async def test_a_permanent_failure_waits_for_a_change(
    sessions: Sessions, core_settings: Settings
) -> None:
    user_id = await synced_user(sessions, core_settings)
    await rename_user(sessions, core_settings, user_id, "Иван Петров")
    await latest_event_fails(sessions, core_settings, user_id, retryable=False)
    user = await read_user(sessions, user_id)
    assert (user.sync_retryable, user.next_sync_at) == (False, None)
    assert await retry_due(sessions, core_settings, probe=True) == 0

    await rename_user(sessions, core_settings, user_id, "Иван Сидоров")
    *_, change = await events_of(sessions, user_id)
    assert change.body["data"]["changed"] == ["full_name"]
    assert (await read_user(sessions, user_id)).sync_status == "pending"


async def test_each_pass_sends_a_bounded_number_earliest_first(
    sessions: Sessions, core_settings: Settings
) -> None:
    settings = core_settings.model_copy(update={"sync_retry_batch": 2})
    ids = [await synced_user(sessions, settings, lead=n + 1) for n in range(3)]
    for n, user_id in enumerate(ids):
        await rename_user(sessions, settings, user_id, f"Renamed {n}")
        await latest_event_fails(sessions, settings, user_id)
        await sql(
            sessions,
            "UPDATE users SET next_sync_at = now() - make_interval(secs => :ago) WHERE id = :id",
            ago=10 - n,
            id=user_id,
        )
    assert await retry_due(sessions, settings) == 2
    assert [(await read_user(sessions, i)).sync_status for i in ids] == [
        "pending",
        "pending",
        "failed",
    ]
    assert await retry_due(sessions, settings) == 1


async def test_a_probe_sends_the_next_waiting_retry_early(
    sessions: Sessions, core_settings: Settings
) -> None:
    first = await synced_user(sessions, core_settings)
    second = await synced_user(sessions, core_settings, lead=457)
    for user_id in (first, second):
        await rename_user(sessions, core_settings, user_id, "Иван Петров")
        await latest_event_fails(sessions, core_settings, user_id)
    await sql(
        sessions,
        "UPDATE users SET next_sync_at = now() + interval '1 hour' WHERE id = :id",
        id=first,
    )
    assert await retry_due(sessions, core_settings) == 0
    assert await retry_due(sessions, core_settings, probe=True) == 1
    states = [(await read_user(sessions, i)).sync_status for i in (first, second)]
    assert states == ["failed", "pending"]  # the one due sooner went


async def test_a_flagged_restatement_is_retried_with_force(
    sessions: Sessions, core_settings: Settings
) -> None:
    user_id = await synced_user(sessions, core_settings)
    async with sessions() as session, session.begin():
        assert await resync_service.resync(session, core_settings, [user_id], force=True) == 1
    await latest_event_fails(sessions, core_settings, user_id)
    await make_due(sessions, user_id)
    assert await retry_due(sessions, core_settings) == 1
    *_, retry = await events_of(sessions, user_id)
    assert retry.body["data"]["force"] is True
    assert retry.body["data"]["changed"] == ALL_FIELDS


def test_the_retry_delay_doubles_up_to_the_cap_with_jitter(core_settings: Settings) -> None:
    for retries, base in [(0, 30), (1, 60), (3, 240), (7, 3600), (40, 3600)]:
        delays = [retry_delay_s(core_settings, retries) for _ in range(50)]
        assert all(base * 0.8 <= delay <= base * 1.2 for delay in delays)
        assert len(set(delays)) > 1


async def test_a_success_brings_forward_the_retries_of_users_that_failed_before_it_left(
    sessions: Sessions, core_settings: Settings
) -> None:
    settings = core_settings.model_copy(update={"sync_retry_batch": 2})
    waiting = [await synced_user(sessions, settings, lead=n + 1) for n in range(4)]
    for user_id in waiting:
        await rename_user(sessions, settings, user_id, "Иван Петров")
        await latest_event_fails(sessions, settings, user_id)
    # Three failed long ago, during the outage; the fourth after the probe below left.
    await sql(sessions, "UPDATE users SET sync_failed_at = now() - interval '5 minutes'")
    await sql(sessions, "UPDATE users SET sync_failed_at = now() WHERE id = :id", id=waiting[3])
    probe = await create_user(sessions, settings)
    await publish_all(sessions)
    [probe_event] = await events_of(sessions, probe.id)
    await sql(
        sessions,
        "UPDATE outbox_events SET published_at = now() - interval '1 minute' WHERE id = :id",
        id=probe_event.id,
    )

    await answer(sessions, settings, success(probe.id, 1), probe_event.id)
    due = await retry_due(sessions, settings)
    assert due == 2  # at most sync_retry_batch per success
    statuses = [(await read_user(sessions, user_id)).sync_status for user_id in waiting]
    assert statuses.count("pending") == 2
    assert statuses[3] == "failed"


async def test_core_retries_until_the_portal_answers_through_the_relay(
    core_settings: Settings, engine: AsyncEngine, committed: Sessions
) -> None:
    settings = core_settings.model_copy(update={"sync_retry_initial_s": 0.01})
    user = await create_user(committed, settings)
    relay = Relay(settings, engine)
    assert await relay.publish_batch() == 1
    [first] = await drain(settings.rabbitmq_queue, 1)
    await answer(committed, settings, error(user.id, 1, retryable=True), first.message_id)

    await make_due(committed, user.id)
    assert await relay.retry_due() == 1
    assert await relay.publish_batch() == 1
    [retry] = await drain(settings.rabbitmq_queue, 1)
    assert retry.message_id != first.message_id
    assert retry.body["data"]["action"] == "create_card"
    await answer(committed, settings, success(user.id, 1), retry.message_id)
    assert (await read_user(committed, user.id)).sync_status == "synced"
    assert await unpublished(committed) == 0


# --- Sending again what got no answer -------------------------------------------------------


async def requeue(sessions: Sessions, engine: AsyncEngine, settings: Settings) -> int:
    await sql(sessions, "UPDATE outbox_events SET published_at = now() - interval '1 hour'"
              " WHERE published_at IS NOT NULL")  # fmt: skip
    return await Relay(settings, engine).resend_unanswered()


async def test_only_a_latest_event_without_an_answer_is_sent_again(
    core_settings: Settings, engine: AsyncEngine, committed: Sessions
) -> None:
    answered = await create_user(committed, core_settings, "Answered with an error")
    await latest_event_fails(committed, core_settings, answered.id)
    unanswered = await create_user(committed, core_settings, "Never answered")
    superseded = await create_user(committed, core_settings, "Changed since")
    await rename_user(committed, core_settings, superseded.id, "Changed again")
    await publish_all(committed)
    *_, latest = await events_of(committed, superseded.id)
    await answer(committed, core_settings, success(superseded.id, 2), latest.id)

    assert await requeue(committed, engine, core_settings) == 1
    async with committed() as session:
        rows = await session.execute(
            text("SELECT user_id FROM outbox_events WHERE published_at IS NULL")
        )
        assert [row.user_id for row in rows] == [unanswered.id]


# --- Hold mode ------------------------------------------------------------------------------


@pytest.fixture
def hold_settings(core_settings: Settings) -> Settings:
    return core_settings.model_copy(update={"hold_until_lead_id": True})


async def test_hold_mode_sends_updates_and_moves_once_the_lead_id_is_known_in_order(
    hold_settings: Settings, engine: AsyncEngine, committed: Sessions
) -> None:
    settings = hold_settings
    relay = Relay(settings, engine)
    user = await create_user(committed, settings)
    await rename_user(committed, settings, user.id, "Иван Петров")
    await move_user(committed, settings, user.id, "CONVERTED")

    assert await relay.publish_batch() == 1
    [create] = await drain(settings.rabbitmq_queue, 1)
    assert create.body["data"]["action"] == "create_card"
    assert await relay.publish_batch() == 0  # the update and the move wait for the lead id
    assert await unpublished(committed) == 2
    # Meanwhile no answer came for the create: it is the one sent again.
    await sql(committed, "UPDATE outbox_events SET published_at = now() - interval '1 hour'"
              " WHERE published_at IS NOT NULL")  # fmt: skip
    assert await relay.resend_unanswered() == 1
    assert await relay.publish_batch() == 1
    [again] = await drain(settings.rabbitmq_queue, 1)
    assert again.message_id == create.message_id

    await answer(committed, settings, success(user.id, 1, lead=77), create.message_id)
    assert await relay.publish_batch() == 2
    held = await drain(settings.rabbitmq_queue, 2)
    assert [m.body["data"]["action"] for m in held] == ["update_card", "move_card"]
    assert [m.body["data"]["user"]["bitrix_lead_id"] for m in held] == [77, 77]
    assert [m.body["data"]["user"]["version"] for m in held] == [2, 3]
    for message in held:
        await answer(committed, settings, success(user.id, message.body["data"]["user"]["version"],
                                                  lead=77), message.message_id)  # fmt: skip
    final = await read_user(committed, user.id)
    assert (final.sync_status, final.synced_version) == ("synced", 3)
    assert await relay.publish_batch() == 0


async def test_hold_mode_retries_a_failed_create_in_place_of_the_held_changes(
    hold_settings: Settings, engine: AsyncEngine, committed: Sessions
) -> None:
    settings = hold_settings
    relay = Relay(settings, engine)
    user = await create_user(committed, settings)
    await change_user(committed, settings, user.id, phone="+77009998877")
    assert await relay.publish_batch() == 1
    [create] = await drain(settings.rabbitmq_queue, 1)
    # The create failed: the held update cannot go without the lead id, so the user fails.
    await answer(committed, settings, error(user.id, 1, retryable=True), create.message_id)
    failed = await read_user(committed, user.id)
    assert (failed.sync_status, failed.version) == ("failed", 2)

    await make_due(committed, user.id)
    assert await relay.retry_due() == 1
    assert await relay.publish_batch() == 1
    [retry] = await drain(settings.rabbitmq_queue, 1)
    assert retry.body["data"]["action"] == "create_card"
    assert retry.body["data"]["user"]["version"] == 2
    assert retry.body["data"]["user"]["phone"] == "+77009998877"
    statuses = [event.answer_status for event in await events_of(committed, user.id)]
    assert statuses == ["error", "superseded", None]

    await answer(committed, settings, success(user.id, 2, lead=5), retry.message_id)
    assert await relay.publish_batch() == 0  # the held update is never sent
    assert (await read_user(committed, user.id)).sync_status == "synced"


async def test_hold_mode_sends_a_change_after_a_failed_create_as_a_create(
    sessions: Sessions, hold_settings: Settings
) -> None:
    user = await create_user(sessions, hold_settings)
    await latest_event_fails(sessions, hold_settings, user.id, retryable=False)
    await move_user(sessions, hold_settings, user.id, "IN_PROCESS")
    _, change = await events_of(sessions, user.id)
    assert (change.pattern, change.version) == ("user_created", 2)
    assert change.body["data"]["changed"] == ALL_FIELDS
    assert change.body["data"]["user"]["stage"] == "IN_PROCESS"


async def test_without_hold_mode_an_update_goes_out_before_the_lead_id_is_known(
    core_settings: Settings, engine: AsyncEngine, committed: Sessions
) -> None:
    user = await create_user(committed, core_settings)
    await rename_user(committed, core_settings, user.id, "Иван Петров")
    assert await Relay(core_settings, engine).publish_batch() == 2
    messages = await drain(core_settings.rabbitmq_queue, 2)
    assert [m.body["data"]["user"]["bitrix_lead_id"] for m in messages] == [None, None]
