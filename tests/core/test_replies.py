"""Bitrix replies applied to the users' sync state: each reply tied to the event it answers,
the rules on a rolled-back database, and the consumer end to end on the real RabbitMQ."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from b24sync.contracts import ReplyData
from b24sync.core.sync.consumer import ReplyApplier, handle_reply
from b24sync.core.sync.service import Outcome, reply_service
from b24sync.settings import Settings
from tests.conftest import eventually
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
    running_core,
    success,
)
from tests.core.rabbit import publish_raw, queue_depth

Sessions = async_sessionmaker[AsyncSession]


def envelope(data: dict[str, Any]) -> bytes:
    return json.dumps({"pattern": "bitrix.responses", "data": data}).encode()


def bare(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


# The original NestJS Bitrix service's replies (issue 10): no correlation id, no version.
def nestjs_success(user_id: int, action: str = "create_card", lead: int = 456) -> dict[str, Any]:
    return {"status": "success", "action": action, "user_id": user_id, "bitrix_lead_id": lead,
            "attempts": 1}  # fmt: skip


def nestjs_final_error(user_id: int, message: str = "Bitrix24 is unreachable") -> dict[str, Any]:
    return {"status": "error", "error": message, "user_id": user_id, "attempts": 3,
            "final_attempt": True}  # fmt: skip


def seed_missing_phone(user_id: int) -> dict[str, Any]:
    return {"status": "error", "reason": "Missing phone number",
            "user": {"id": user_id, "full_name": "Пользователь без телефона",
                     "stage": "NEW"}}  # fmt: skip


@pytest.fixture
def sessions(rollback_sessionmaker: Sessions) -> Sessions:
    return rollback_sessionmaker


async def sent_user(sessions: Sessions, settings: Settings) -> tuple[int, str]:
    """A new user whose create event went out; its id and the event's id."""
    user = await create_user(sessions, settings)
    await publish_all(sessions)
    [event] = await events_of(sessions, user.id)
    return user.id, event.id


@pytest.mark.parametrize("wrap", [envelope, bare], ids=["envelope", "bare"])
async def test_success_marks_synced(sessions: Sessions, core_settings: Settings, wrap: Any) -> None:
    user_id, event_id = await sent_user(sessions, core_settings)
    assert await handle_reply(
        wrap(success(user_id, 1)), ReplyApplier(sessions, core_settings), correlation_id=event_id
    )
    user = await read_user(sessions, user_id)
    assert (user.sync_status, user.bitrix_lead_id, user.synced_version) == ("synced", 456, 1)
    assert user.sync_attempts == 1
    assert user.synced_at is not None
    [event] = await events_of(sessions, user_id)
    assert event.answer_status == "success"


async def test_transient_error_fails_with_a_retry_time(
    sessions: Sessions, core_settings: Settings
) -> None:
    user_id, event_id = await sent_user(sessions, core_settings)
    reply = error(user_id, 1, reason="HTTP 503", error_code="HTTP_503", retryable=True)
    before = datetime.now(UTC)
    assert await answer(sessions, core_settings, reply, event_id) is Outcome.APPLIED
    user = await read_user(sessions, user_id)
    assert user.sync_status == "failed"
    assert (user.sync_error, user.sync_error_code, user.sync_retryable) == (
        "HTTP 503",
        "HTTP_503",
        True,
    )
    assert user.sync_attempts == 3
    assert user.sync_failed_at is not None
    # About 30 s away (the first delay, with its jitter).
    assert user.next_sync_at is not None
    assert before + timedelta(seconds=23) < user.next_sync_at < before + timedelta(seconds=37)
    [event] = await events_of(sessions, user_id)
    assert (event.answer_status, event.answer_reason) == ("error", "HTTP 503")


@pytest.mark.parametrize(
    ("reply", "retryable"),
    [
        pytest.param({"retryable": False, "error_code": "ACCESS_DENIED"}, False, id="said-no"),
        pytest.param({"reason": "Missing phone number"}, False, id="seed-validation"),
        pytest.param({"reason": "connect ECONNREFUSED"}, True, id="unsaid-other"),
    ],
)
async def test_errors_are_classified(
    sessions: Sessions, core_settings: Settings, reply: dict[str, Any], retryable: bool
) -> None:
    user_id, event_id = await sent_user(sessions, core_settings)
    await answer(sessions, core_settings, error(user_id, 1, **reply), event_id)
    user = await read_user(sessions, user_id)
    assert (user.sync_status, user.sync_retryable) == ("failed", retryable)
    assert (user.next_sync_at is not None) is retryable


async def test_error_reason_with_nul_is_stored_without_it(
    sessions: Sessions, core_settings: Settings
) -> None:
    user_id, event_id = await sent_user(sessions, core_settings)
    await answer(sessions, core_settings, error(user_id, 1, reason="Bad\x00 answer"), event_id)
    user = await read_user(sessions, user_id)
    assert (user.sync_status, user.sync_error) == ("failed", "Bad answer")


async def test_the_same_reply_again_changes_nothing(
    sessions: Sessions, core_settings: Settings
) -> None:
    user_id, event_id = await sent_user(sessions, core_settings)
    await answer(sessions, core_settings, error(user_id, 1), event_id)
    failed = await read_user(sessions, user_id)
    # The retry is not pushed back, nor counted twice.
    assert await answer(sessions, core_settings, error(user_id, 1), event_id) is Outcome.DUPLICATE
    again = await read_user(sessions, user_id)
    assert (again.next_sync_at, again.sync_failed_at) == (
        failed.next_sync_at,
        failed.sync_failed_at,
    )

    # The job ran again (the event was sent again) and this time got through.
    assert await answer(sessions, core_settings, success(user_id, 1), event_id) is Outcome.APPLIED
    synced = await read_user(sessions, user_id)
    assert synced.sync_status == "synced"
    # A success is never overwritten, and nothing is learnt twice.
    assert await answer(sessions, core_settings, success(user_id, 1), event_id) is Outcome.DUPLICATE
    assert await answer(sessions, core_settings, error(user_id, 1), event_id) is Outcome.DUPLICATE
    assert (await read_user(sessions, user_id)).sync_status == "synced"


async def test_an_older_events_success_stores_the_lead_but_never_the_newer_version(
    sessions: Sessions, core_settings: Settings
) -> None:
    user = await create_user(sessions, core_settings)
    await rename_user(sessions, core_settings, user.id, "Иван Петров")
    await move_user(sessions, core_settings, user.id, "CONVERTED")  # now at version 3
    await publish_all(sessions)
    create, update, move = await events_of(sessions, user.id)

    # The reply of version 1's event, even naming version 3 in its echo.
    forged_echo = success(user.id, 3, lead=777)
    assert await answer(sessions, core_settings, forged_echo, create.id) is Outcome.APPLIED
    after = await read_user(sessions, user.id)
    assert (after.bitrix_lead_id, after.synced_version, after.sync_status) == (777, 1, "pending")

    await answer(sessions, core_settings, success(user.id, 3, lead=777), move.id)
    assert (await read_user(sessions, user.id)).sync_status == "synced"
    # A late reply about version 2 (error or success) cannot undo version 3's success.
    await answer(sessions, core_settings, error(user.id, 2), update.id)
    await answer(sessions, core_settings, success(user.id, 2, lead=999), update.id)
    final = await read_user(sessions, user.id)
    assert (final.sync_status, final.synced_version, final.bitrix_lead_id) == ("synced", 3, 777)


async def test_an_error_about_an_older_version_changes_nothing(
    sessions: Sessions, core_settings: Settings
) -> None:
    user = await create_user(sessions, core_settings)
    await rename_user(sessions, core_settings, user.id, "Иван Петров")
    await publish_all(sessions)
    create, _ = await events_of(sessions, user.id)
    assert await answer(sessions, core_settings, error(user.id, 1), create.id) is Outcome.UNCHANGED
    after = await read_user(sessions, user.id)
    assert (after.sync_status, after.sync_error, after.next_sync_at) == ("pending", None, None)


async def test_skipped_never_marks_synced(sessions: Sessions, core_settings: Settings) -> None:
    user_id, event_id = await sent_user(sessions, core_settings)
    skipped = success(user_id, 1, skipped=True, reason="superseded by version 2")
    assert await answer(sessions, core_settings, skipped, event_id) is Outcome.APPLIED
    user = await read_user(sessions, user_id)
    # The lead id it names may fill the unknown one; the version stays unconfirmed.
    assert (user.sync_status, user.synced_version, user.bitrix_lead_id) == ("pending", None, 456)
    [event] = await events_of(sessions, user_id)
    assert event.answer_status == "skipped"


async def test_a_version_core_never_had_makes_it_restate_the_user_with_force(
    sessions: Sessions, core_settings: Settings
) -> None:
    user = await create_user(sessions, core_settings)
    await answer(sessions, core_settings, success(user.id, 1))  # synced, lead 456
    await change_user(sessions, core_settings, user.id, phone="+77009998877")
    await publish_all(sessions)
    _, update = await events_of(sessions, user.id)

    # A forged event made the Bitrix service apply "version 1000": ours is skipped as older.
    skipped = success(user.id, 2, skipped=True, applied_version=1000,
                      reason="version 2 is older than the applied version 1000")  # fmt: skip
    assert await answer(sessions, core_settings, skipped, update.id) is Outcome.RESTATED
    *_, restate = await events_of(sessions, user.id)
    assert restate.pattern == "user_updated"
    assert restate.version == 2
    assert restate.body["data"]["force"] is True
    assert restate.body["data"]["changed"] == ["full_name", "phone", "stage"]
    restated = await read_user(sessions, user.id)
    assert (restated.sync_status, restated.sync_force) == ("pending", True)

    # Another such skip while the restatement is on its way sends nothing more.
    await publish_all(sessions)
    events = len(await events_of(sessions, user.id))
    assert await answer(sessions, core_settings, skipped, restate.id) is Outcome.UNCHANGED
    assert len(await events_of(sessions, user.id)) == events
    await answer(sessions, core_settings, success(user.id, 2), restate.id)
    done = await read_user(sessions, user.id)
    assert (done.sync_status, done.sync_force) == ("synced", False)


async def test_a_reply_tied_to_no_event_never_syncs_nor_replaces_a_known_lead(
    sessions: Sessions, core_settings: Settings
) -> None:
    user = await create_user(sessions, core_settings)  # its event never went out
    assert await answer(sessions, core_settings, success(user.id, 1, lead=11)) is Outcome.APPLIED
    filled = await read_user(sessions, user.id)
    assert (filled.bitrix_lead_id, filled.sync_status, filled.synced_version) == (
        11,
        "pending",
        None,
    )

    untied = await answer(sessions, core_settings, success(user.id, 1, lead=22))
    assert untied is Outcome.UNTIED
    assert (await answer(sessions, core_settings, error(user.id, 1))) is Outcome.UNTIED
    after = await read_user(sessions, user.id)
    assert (after.bitrix_lead_id, after.sync_status) == (11, "pending")


async def test_an_unknown_correlation_id_falls_back_to_the_versionless_rule(
    sessions: Sessions, core_settings: Settings
) -> None:
    user_id, _ = await sent_user(sessions, core_settings)
    other_id, other_event = await sent_user(sessions, core_settings)
    # Another user's event id, then one that is not an id at all.
    await answer(sessions, core_settings, error(user_id, 1), other_event)
    assert (await read_user(sessions, user_id)).sync_status == "failed"
    assert (await read_user(sessions, other_id)).sync_status == "pending"
    await answer(sessions, core_settings, success(other_id, 1), "not-a-uuid")
    assert (await read_user(sessions, other_id)).sync_status == "synced"


async def test_a_reply_about_a_future_version_is_ignored(
    sessions: Sessions, core_settings: Settings
) -> None:
    user = await create_user(sessions, core_settings)
    reply = success(user.id, 5)
    assert await answer(sessions, core_settings, reply) is Outcome.FUTURE_VERSION
    after = await read_user(sessions, user.id)
    assert (after.bitrix_lead_id, after.sync_status) == (None, "pending")


# --- The original NestJS Bitrix service's replies: tied by the versionless rule -------------


async def test_nestjs_success_without_user_ties_to_the_oldest_unanswered_create(
    sessions: Sessions, core_settings: Settings
) -> None:
    user = await create_user(sessions, core_settings)
    await rename_user(sessions, core_settings, user.id, "Иван Петров")
    await publish_all(sessions)

    assert await handle_reply(
        envelope(nestjs_success(user.id)), ReplyApplier(sessions, core_settings)
    )
    after = await read_user(sessions, user.id)
    # The create's answer: the lead id, version 1 written; version 2 still on its way.
    assert (after.bitrix_lead_id, after.synced_version, after.sync_status) == (456, 1, "pending")

    assert await handle_reply(
        envelope(nestjs_success(user.id, action="update_card")),
        ReplyApplier(sessions, core_settings),
    )
    synced = await read_user(sessions, user.id)
    assert (synced.synced_version, synced.sync_status) == (2, "synced")
    assert [event.answer_status for event in await events_of(sessions, user.id)] == [
        "success",
        "success",
    ]


async def test_the_seeds_success_without_a_version_never_syncs_a_newer_change(
    sessions: Sessions, core_settings: Settings
) -> None:
    user = await create_user(sessions, core_settings)
    await rename_user(sessions, core_settings, user.id, "Иван Петров")
    await publish_all(sessions)
    # The seed's own reply: the user echoed without a version, no user_id, no attempts.
    seed_reply = {"status": "success", "action": "create_card", "bitrix_lead_id": 456,
                  "user": {"id": user.id, "full_name": "Иван Иванов",
                           "phone": "+77001112233", "stage": "NEW"}}  # fmt: skip
    assert await handle_reply(bare(seed_reply), ReplyApplier(sessions, core_settings))
    after = await read_user(sessions, user.id)
    assert (after.synced_version, after.sync_status) == (1, "pending")
    assert after.full_name == "Иван Петров"  # a reply never changes the user's own data


async def test_nestjs_final_error_is_read_from_error_and_ties_without_an_action(
    sessions: Sessions, core_settings: Settings
) -> None:
    user_id, _ = await sent_user(sessions, core_settings)
    assert await handle_reply(
        envelope(nestjs_final_error(user_id)), ReplyApplier(sessions, core_settings)
    )
    user = await read_user(sessions, user_id)
    assert (user.sync_status, user.sync_error) == ("failed", "Bitrix24 is unreachable")
    # Their service does not say; anything but their validation error is worth a retry.
    assert (user.sync_retryable, user.sync_attempts) == (True, 3)
    assert user.next_sync_at is not None


async def test_seeds_missing_phone_error_is_permanent(
    sessions: Sessions, core_settings: Settings
) -> None:
    user_id, _ = await sent_user(sessions, core_settings)
    assert await handle_reply(
        bare(seed_missing_phone(user_id)), ReplyApplier(sessions, core_settings)
    )
    user = await read_user(sessions, user_id)
    assert (user.sync_status, user.sync_error) == ("failed", "Missing phone number")
    assert (user.sync_retryable, user.next_sync_at) == (False, None)


async def test_a_versionless_reply_with_no_event_left_is_untied(
    sessions: Sessions, core_settings: Settings
) -> None:
    user_id, event_id = await sent_user(sessions, core_settings)
    await answer(sessions, core_settings, success(user_id, 1, lead=5), event_id)
    assert await answer(sessions, core_settings, nestjs_success(user_id, lead=6)) is Outcome.UNTIED
    assert (await read_user(sessions, user_id)).bitrix_lead_id == 5


async def test_a_reply_faster_than_the_relays_commit_still_ties_to_its_event(
    core_settings: Settings, engine: AsyncEngine, committed: Sessions
) -> None:
    user = await create_user(committed, core_settings)
    async with engine.connect() as relay:
        # The relay holds the event it is publishing until it commits it as published.
        publishing = await relay.begin()
        await relay.execute(
            text("SELECT id FROM outbox_events WHERE user_id = :id FOR UPDATE"), {"id": user.id}
        )
        reply = asyncio.create_task(answer(committed, core_settings, nestjs_success(user.id)))

        async def reply_waits() -> bool:  # read from outside: a transaction sees one snapshot
            async with committed() as session:
                waiting = await session.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
                return bool(waiting.scalar_one())

        await eventually(reply_waits)
        await relay.execute(
            text("UPDATE outbox_events SET published_at = now() WHERE user_id = :id"),
            {"id": user.id},
        )
        await publishing.commit()
    assert await reply is Outcome.APPLIED
    synced = await read_user(committed, user.id)
    assert (synced.sync_status, synced.bitrix_lead_id) == ("synced", 456)


# --- The consumer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'{"status": "maybe", "user": {"id": 1}}', id="bad-status"),
        pytest.param(b'{"status": "success"}', id="no-user"),
        pytest.param(b'{"pattern": "bitrix.responses", "data": {"user": {"id": "x"}}}', id="env"),
        pytest.param(b'{"status": "success", "user": {"id": 1, "version": 0}}', id="version-0"),
        pytest.param(b'{"status": "success", "user": {"id": 1}, "user_id": 2}', id="two-users"),
    ],
)
async def test_malformed_reply_is_dropped(
    sessions: Sessions, core_settings: Settings, body: bytes, capfd: pytest.CaptureFixture[str]
) -> None:
    assert await handle_reply(body, ReplyApplier(sessions, core_settings)) is True
    assert "[Core] Malformed reply dropped" in capfd.readouterr().out


async def test_reply_for_unknown_user_is_dropped(
    sessions: Sessions, core_settings: Settings, capfd: pytest.CaptureFixture[str]
) -> None:
    assert (
        await handle_reply(envelope(success(987654321, 1)), ReplyApplier(sessions, core_settings))
        is True
    )
    logged = capfd.readouterr().out
    assert "[Core] Bitrix Response Received: " in logged
    assert "outcome=unknown_user" in logged


async def test_consumer_ties_replies_by_correlation_id_and_acks_everything(
    core_settings: Settings, committed: Sessions
) -> None:
    user = await create_user(committed, core_settings)
    await rename_user(committed, core_settings, user.id, "Иван Петров")
    await publish_all(committed)
    create, update = await events_of(committed, user.id)
    queue = core_settings.rabbitmq_reply_queue
    async with running_core(core_settings) as http:
        await publish_raw(queue, b"garbage that is not json")
        await publish_raw(queue, envelope(success(123456789, 1)))  # unknown user
        # The update's reply first, then the create's, which names version 2 in its echo: the
        # correlation id says which event each answers.
        await publish_raw(queue, envelope(success(user.id, 2, lead=4242)), correlation_id=update.id)
        await publish_raw(queue, envelope(success(user.id, 2, lead=1)), correlation_id=create.id)

        async def answered() -> bool:
            events = await events_of(committed, user.id)
            return all(event.answer_status == "success" for event in events)

        await eventually(answered)
        body = (await http.get(f"/users/{user.id}")).json()
        assert body["bitrix_lead_id"] == 4242
        assert body["sync"]["status"] == "synced"
        assert body["sync"]["synced_version"] == 2
    # After Core disconnected, anything left unacknowledged would be back on the queue.
    assert await queue_depth(queue) == 0


async def test_consumer_survives_a_huge_lead_id(
    core_settings: Settings, committed: Sessions
) -> None:
    user = await create_user(committed, core_settings)
    await publish_all(committed)
    async with running_core(core_settings) as http:
        await publish_raw(core_settings.rabbitmq_reply_queue,
                          envelope(success(user.id, 1, lead=10**30)))  # fmt: skip
        await publish_raw(core_settings.rabbitmq_reply_queue, envelope(success(user.id, 1)))

        async def synced() -> bool:
            body = (await http.get(f"/users/{user.id}")).json()
            return bool(body["sync"]["status"] == "synced")

        await eventually(synced)
        assert (await http.get(f"/users/{user.id}")).json()["bitrix_lead_id"] == 456
    assert await queue_depth(core_settings.rabbitmq_reply_queue) == 0


async def test_replies_arriving_together_are_each_applied_once(
    committed: Sessions, core_settings: Settings
) -> None:
    """Applied in groups of several to a transaction, in any order of arrival: every user ends
    synced with its own lead id, and each reply is answered for itself (one of them names no
    user Core has, the others' group still commits)."""
    sent = [await sent_user(committed, core_settings) for _ in range(30)]
    applier = ReplyApplier(committed, core_settings)
    replies = [
        handle_reply(
            envelope(success(user_id, 1, lead=5000 + user_id)),
            applier,
            correlation_id=event_id,
        )
        for user_id, event_id in reversed(sent)
    ]
    replies.append(handle_reply(envelope(success(987654321, 1)), applier))
    assert await asyncio.gather(*replies) == [True] * 31
    for user_id, _ in sent:
        user = await read_user(committed, user_id)
        assert (user.sync_status, user.bitrix_lead_id, user.synced_version) == (
            "synced",
            5000 + user_id,
            1,
        )


async def sent_and_renamed_user(sessions: Sessions, settings: Settings) -> tuple[int, str, str]:
    """A new user, then renamed, both events gone out; its id, the create's and the update's."""
    user_id, create_id = await sent_user(sessions, settings)
    await rename_user(sessions, settings, user_id, "Пётр Петров")
    await publish_all(sessions)
    return user_id, create_id, (await events_of(sessions, user_id))[1].id


async def apply_together(
    sessions: Sessions, settings: Settings, replies: list[tuple[dict[str, Any], str]]
) -> list[Outcome]:
    """The replies (`data` objects, each with its correlation id) applied as one group."""
    async with sessions() as session, session.begin():
        return await reply_service.apply_many(
            session,
            settings,
            [(ReplyData.model_validate(data), event_id) for data, event_id in replies],
        )


# The other user's reply among the first user's: before the re-reads, or after them (reading
# a user again must not lose what was read of the others).
@pytest.mark.parametrize("other_at", [1, 3], ids=["between", "after"])
async def test_replies_of_one_user_in_one_group_each_see_what_the_one_before_taught(
    sessions: Sessions, core_settings: Settings, other_at: int
) -> None:
    """The create's success, the update's, then a late error about the update, applied in one
    transaction: each reply of the user is read after what the one before wrote."""
    user_id, create_id, update_id = await sent_and_renamed_user(sessions, core_settings)
    other_id, other_event = await sent_user(sessions, core_settings)
    replies = [
        (success(user_id, 1, lead=77), create_id),
        (success(user_id, 2, lead=77), update_id),
        # A late error about the same update: it was answered, nothing changes.
        (error(user_id, 2), update_id),
    ]
    replies.insert(other_at, (success(other_id, 1, lead=78), other_event))

    outcomes = await apply_together(sessions, core_settings, replies)

    expected = [Outcome.APPLIED, Outcome.APPLIED, Outcome.DUPLICATE]
    expected.insert(other_at, Outcome.APPLIED)
    assert outcomes == expected
    user = await read_user(sessions, user_id)
    assert (user.sync_status, user.bitrix_lead_id, user.synced_version) == ("synced", 77, 2)
    assert [event.answer_status for event in await events_of(sessions, user_id)] == [
        "success",
        "success",
    ]
    assert (await read_user(sessions, other_id)).bitrix_lead_id == 78
