"""One lead per user and one final reply per event, whatever the order, duplicates and failures."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractQueue
from bullmq import Queue
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from b24sync.bitrix.jobs import JOB_NAME, JobPayload, QueuedEvent, job_options
from b24sync.bitrix.main import BitrixService, key_prefix
from b24sync.bitrix.marks import EventMarks
from b24sync.bitrix.state import UserLeases, UserState
from b24sync.contracts.messages import Event
from b24sync.settings import Settings
from tests.conftest import eventually

from .conftest import Admin, Bus, ServiceFactory, event


async def test_update_before_create_creates_the_lead_once(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    queue = settings.rabbitmq_reply_queue
    await bus.publish(event("update_card", 7, reply_queue=queue, full_name="Иван Петров"))
    first = await bus.reply()
    await bus.publish(event("create_card", 7, reply_queue=queue, full_name="Иван Петров"))
    second = await bus.reply()

    (lead,) = await admin.leads()
    assert first["data"]["status"] == second["data"]["status"] == "success"
    assert first["data"]["bitrix_lead_id"] == second["data"]["bitrix_lead_id"] == int(lead["ID"])
    # The upsert wrote every field, not just the changed ones.
    assert (lead["TITLE"], lead["STATUS_ID"], lead["ORIGIN_ID"]) == ("Иван Петров", "NEW", "7")
    assert [p["VALUE"] for p in lead["PHONE"]] == ["+77001112233"]


async def test_move_before_create_creates_the_lead(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    await bus.publish(
        event("move_card", 8, reply_queue=settings.rabbitmq_reply_queue, stage="CONVERTED")
    )
    reply = await bus.reply()
    (lead,) = await admin.leads()
    assert reply["data"]["bitrix_lead_id"] == int(lead["ID"])
    assert (lead["STATUS_ID"], lead["TITLE"]) == ("CONVERTED", "Иван Иванов")


async def test_a_duplicate_message_id_makes_one_job(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    body = event("create_card", 11, reply_queue=settings.rabbitmq_reply_queue)
    # The job is still being worked on when its message comes again.
    await admin.script(method="crm.lead.list", kind="timeout_after_write", delay_s=1)
    await bus.publish(body, message_id="evt-11")
    await bus.publish(body, message_id="evt-11")
    reply = await bus.reply()
    assert reply["data"]["status"] == "success"
    await bus.assert_no_reply(within=1.0)
    assert len(await admin.leads()) == 1
    assert (await admin.stats())["by_method"]["crm.lead.add"] == {"ok": 1}


async def test_a_redelivery_without_message_id_does_not_make_a_second_job(
    start_service: ServiceFactory,
    portal: object,
    bus: Bus,
    admin: Admin,
    settings: Settings,
    fast_settings: Settings,
    redis_client: Redis,
) -> None:
    """A consumer added the job and died before the ack: RabbitMQ redelivers the message."""
    body = event("create_card", 12, reply_queue=settings.rabbitmq_reply_queue)
    raw = json.dumps(body, ensure_ascii=False).encode()
    await bus.publish(raw)
    queue = Queue(
        settings.bullmq_queue,
        {
            "connection": settings.redis_url,
            "prefix": settings.bullmq_prefix,
            "defaultJobOptions": job_options(fast_settings),
        },
    )
    # The dead consumer marked the event for its job and added the job. Delayed, so that the
    # job still waits when the redelivery comes, however soon the service's worker starts.
    key = hashlib.sha256(raw).hexdigest()
    payload = JobPayload(events=[QueuedEvent(event=Event.model_validate(body), key=key)])
    assert (
        await EventMarks(redis_client, f"{key_prefix(settings)}:events").mark("dead", [key]) == {}
    )
    await queue.add(JOB_NAME, payload.wire(), {"jobId": "dead", "delay": 1500})
    await queue.close()
    # The dead consumer's delivery: taken, never acknowledged, so it comes back redelivered.
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        events = await channel.get_queue(settings.rabbitmq_queue)
        taken = await events.get(timeout=5)
        assert taken is not None
    await start_service()

    reply = await bus.reply()
    assert reply["data"]["status"] == "success"
    await bus.assert_no_reply(within=1.0)
    assert len(await admin.leads()) == 1
    assert await bus.pending_events() == 0


async def test_a_job_answers_each_event_once_and_keeps_only_those_not_done(
    start_service: ServiceFactory,
    portal: object,
    bus: Bus,
    admin: Admin,
    settings: Settings,
    redis_client: Redis,
) -> None:
    """A job of two events, the second one's user being written by another process."""
    other = UserLeases(redis_client, key_prefix(settings), owner="other", ttl_ms=1500)
    assert await other.take([42]) == {42: UserState(None, None)}
    keys = ["evt-41", "evt-42"]
    events = [
        QueuedEvent(
            event=Event.model_validate(
                event("create_card", user_id, reply_queue=settings.rabbitmq_reply_queue)
            ),
            message_id=key,
            key=key,
        )
        for user_id, key in zip((41, 42), keys, strict=True)
    ]
    marks = EventMarks(redis_client, f"{key_prefix(settings)}:events")
    assert await marks.mark("pair", keys) == {}
    queue = Queue(
        settings.bullmq_queue, {"connection": settings.redis_url, "prefix": settings.bullmq_prefix}
    )
    await queue.add(JOB_NAME, JobPayload(events=events).wire(), {"jobId": "pair"})
    await queue.close()
    await start_service(user_busy_delay_ms=200)

    # The first is answered at once; the job keeps only the second, until the lease runs out.
    assert (await bus.reply_message()).correlation_id == "evt-41"
    assert (await bus.reply_message(wait_s=10)).correlation_id == "evt-42"
    await bus.assert_no_reply(within=1.0)
    assert sorted(lead["ORIGIN_ID"] for lead in await admin.leads()) == ["41", "42"]
    # Both answered: were they to come again, they would run again.
    assert await marks.mark("again", keys) == {}


async def test_a_fresh_message_with_an_old_body_is_a_new_event(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    """Without message ids, a user renamed A -> B -> A sends the same body twice."""
    queue = settings.rabbitmq_reply_queue
    await bus.publish(event("create_card", 13, reply_queue=queue, full_name="Анна А"))
    name_a = event("update_card", 13, reply_queue=queue, full_name="Анна А")
    for body in (name_a, event("update_card", 13, reply_queue=queue, full_name="Анна Б"), name_a):
        await bus.publish(body)
    assert [r["data"]["status"] for r in await bus.replies(4)] == ["success"] * 4
    (lead,) = await admin.leads()
    assert lead["TITLE"] == "Анна А"


async def test_stale_events_are_skipped_and_never_overwrite(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings, redis_client: Redis
) -> None:
    queue = settings.rabbitmq_reply_queue
    await bus.publish(event("create_card", 21, reply_queue=queue, version=1))
    created = await bus.reply()
    await bus.publish(event("update_card", 21, reply_queue=queue, version=3, full_name="Три Три"))
    newer = await bus.reply()
    await bus.publish(event("update_card", 21, reply_queue=queue, version=2, full_name="Два Два"))
    older = (await bus.reply())["data"]

    assert "skipped" not in newer["data"]
    assert (older["status"], older["skipped"], older["applied_version"]) == ("success", True, 3)
    assert older["reason"] == "version 2 is older than the applied version 3; nothing changed"
    assert older["bitrix_lead_id"] == created["data"]["bitrix_lead_id"]
    (lead,) = await admin.leads()
    assert lead["TITLE"] == "Три Три"

    # Redis lost what was applied: the portal look-up still finds the lead, the event is applied.
    await redis_client.delete(f"{service.key_prefix}:user:21")
    await bus.publish(event("update_card", 21, reply_queue=queue, version=2, full_name="Два Два"))
    reply = await bus.reply()
    assert "skipped" not in reply["data"]
    (lead,) = await admin.leads()
    assert (int(lead["ID"]), lead["TITLE"]) == (reply["data"]["bitrix_lead_id"], "Два Два")


async def test_many_events_of_one_user_on_two_services_end_in_the_newest(
    start_service: ServiceFactory, portal: object, bus: Bus, admin: Admin, settings: Settings
) -> None:
    await start_service()
    await start_service()
    queue = settings.rabbitmq_reply_queue
    await bus.publish(event("create_card", 31, reply_queue=queue, version=1))
    for version in range(2, 11):
        await bus.publish(
            event(
                "update_card", 31, reply_queue=queue, version=version, full_name=f"Версия {version}"
            )
        )
    for user_id in range(40, 45):
        await bus.publish(event("create_card", user_id, reply_queue=queue))
    replies = await bus.replies(15)

    assert {r["data"]["status"] for r in replies} == {"success"}
    leads = await admin.leads()
    assert sorted(lead["ORIGIN_ID"] for lead in leads) == ["31", "40", "41", "42", "43", "44"]
    (lead,) = [lead for lead in leads if lead["ORIGIN_ID"] == "31"]
    assert lead["TITLE"] == "Версия 10"


async def test_a_permanent_error_is_answered_at_once_with_its_code(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    await admin.fail(
        "crm.lead.add",
        status=403,
        error="insufficient_scope",
        description="The request requires higher privileges than provided by the webhook token",
    )
    await bus.publish(event("create_card", 51, reply_queue=settings.rabbitmq_reply_queue))
    reply = (await bus.reply())["data"]

    assert (reply["status"], reply["retryable"]) == ("error", False)
    assert reply["error_code"] == "insufficient_scope"
    assert reply["reason"] == (
        "crm.lead.add: insufficient_scope: The request requires higher privileges than provided "
        "by the webhook token"
    )
    assert reply["attempts"] == 1
    await bus.assert_no_reply(within=0.5)
    assert (await admin.stats())["by_method"]["crm.lead.add"] == {"insufficient_scope": 1}


async def test_a_crm_error_without_code_keeps_the_empty_code(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    await admin.fail(
        "crm.lead.add",
        status=400,
        error="",
        description="Access denied.",
    )
    await bus.publish(event("create_card", 52, reply_queue=settings.rabbitmq_reply_queue))
    reply = (await bus.reply())["data"]
    assert (reply["status"], reply["error_code"], reply["attempts"]) == ("error", "", 1)
    assert reply["reason"] == "crm.lead.add: Access denied."


async def test_an_update_of_a_deleted_lead_recreates_it(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    queue = settings.rabbitmq_reply_queue
    await bus.publish(event("create_card", 53, reply_queue=queue))
    old_id = (await bus.reply())["data"]["bitrix_lead_id"]
    await admin.rest("crm.lead.delete", {"id": old_id})

    await bus.publish(
        event("update_card", 53, reply_queue=queue, full_name="Новый Лид", bitrix_lead_id=old_id)
    )
    reply = (await bus.reply())["data"]
    (lead,) = await admin.leads()
    assert reply["status"] == "success"
    assert reply["bitrix_lead_id"] == int(lead["ID"]) != old_id
    assert lead["TITLE"] == "Новый Лид"


async def test_transient_errors_are_retried(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    await admin.script(method="crm.lead.add", times=2, kind="html", status=502)
    await bus.publish(event("create_card", 61, reply_queue=settings.rabbitmq_reply_queue))
    reply = (await bus.reply())["data"]
    assert (reply["status"], reply["attempts"]) == ("success", 3)
    await bus.assert_no_reply(within=0.5)
    assert len(await admin.leads()) == 1


async def test_the_error_reply_comes_after_the_last_attempt(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    await admin.fail(
        "crm.lead.list",
        status=500,
        error="INTERNAL_SERVER_ERROR",
        description="Internal server error",
        times=3,
    )
    await bus.publish(event("create_card", 62, reply_queue=settings.rabbitmq_reply_queue))
    reply = (await bus.reply())["data"]
    assert (reply["status"], reply["attempts"], reply["retryable"]) == ("error", 3, True)
    assert reply["error_code"] == "INTERNAL_SERVER_ERROR"
    await bus.assert_no_reply(within=0.5)
    assert await admin.leads() == []
    assert (await admin.stats())["by_method"]["crm.lead.list"] == {"INTERNAL_SERVER_ERROR": 3}


async def test_rate_limit_answers_do_not_use_up_attempts(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    await admin.limit("crm.lead.list", "QUERY_LIMIT_EXCEEDED", times=3)
    await admin.limit("crm.lead.add", "OPERATION_TIME_LIMIT", times=3)
    await bus.publish(event("create_card", 63, reply_queue=settings.rabbitmq_reply_queue))
    reply = (await bus.reply())["data"]
    assert (reply["status"], reply["attempts"]) == ("success", 1)
    assert len(await admin.leads()) == 1


async def test_a_create_that_timed_out_after_writing_adopts_the_lead(
    start_service: ServiceFactory, portal: object, bus: Bus, admin: Admin, settings: Settings
) -> None:
    await start_service(bitrix_timeout_s=0.5)
    await admin.script(method="crm.lead.add", times=1, kind="timeout_after_write", delay_s=2)
    await bus.publish(event("create_card", 64, reply_queue=settings.rabbitmq_reply_queue))
    reply = (await bus.reply())["data"]
    (lead,) = await admin.leads()
    assert (reply["status"], reply["attempts"]) == ("success", 2)
    assert reply["bitrix_lead_id"] == int(lead["ID"])


async def test_bad_messages_are_answered_acked_and_do_not_stop_the_service(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    queue = settings.rabbitmq_reply_queue
    await bus.publish(b"{this is not json")
    unknown: dict[str, Any] = event("create_card", 71, reply_queue=queue)
    unknown["pattern"] = "user_deleted"
    await bus.publish(unknown)
    invalid: dict[str, Any] = event("create_card", 72, reply_queue=queue)
    invalid["data"]["action"] = "delete_card"
    await bus.publish(invalid)
    await bus.publish(event("create_card", 73, reply_queue=queue))

    unknown_reply, invalid_reply, good_reply = (r["data"] for r in await bus.replies(3))
    assert unknown_reply["status"] == "error"
    assert unknown_reply["reason"] == "Unknown pattern: 'user_deleted'"
    assert unknown_reply["user_id"] == 71
    assert invalid_reply["status"] == "error"
    assert invalid_reply["reason"].startswith("Invalid event: data.action: Input should be")
    assert invalid_reply["user_id"] == 72
    assert good_reply["status"] == "success"
    assert good_reply["user_id"] == 73
    assert await bus.pending_events() == 0
    assert [lead["ORIGIN_ID"] for lead in await admin.leads()] == ["73"]


async def test_a_user_leased_by_another_process_waits_without_spending_an_attempt(
    service: BitrixService,
    bus: Bus,
    admin: Admin,
    settings: Settings,
    redis_client: Redis,
) -> None:
    # Another process is writing the user's lead for a while.
    await redis_client.set(f"{service.key_prefix}:lease:user:81", "other-process", px=1500)
    await bus.publish(event("create_card", 81, reply_queue=settings.rabbitmq_reply_queue))
    reply = (await bus.reply())["data"]
    assert (reply["status"], reply["attempts"]) == ("success", 1)
    assert len(await admin.leads()) == 1


async def test_replies_go_only_to_the_configured_queue(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    other = f"{settings.rabbitmq_reply_queue}.other"
    await bus.publish(event("create_card", 82, reply_queue=other))
    without = event("create_card", 83, reply_queue="")
    del without["data"]["replyQueue"]
    await bus.publish(without)

    reply = (await bus.reply())["data"]
    assert (reply["status"], reply["user_id"]) == ("success", 83)
    await bus.assert_no_reply(within=0.5)
    assert [lead["ORIGIN_ID"] for lead in await admin.leads()] == ["83"]
    assert await bus.pending_events() == 0
    # No queue was made for the other name.
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await channel.declare_queue(other, passive=True)


async def test_stop_is_bounded_and_another_service_finishes_the_cut_job(
    start_service: ServiceFactory, portal: object, bus: Bus, admin: Admin, settings: Settings
) -> None:
    timings = {"job_lock_duration_ms": 1000, "job_stalled_interval_ms": 500}
    first = await start_service(shutdown_timeout_s=0.5, **timings)
    await admin.script(method="crm.lead.add", times=1, kind="timeout_after_write", delay_s=30)
    await bus.publish(event("create_card", 83, reply_queue=settings.rabbitmq_reply_queue))

    await admin.until_a_lead_exists()
    await asyncio.wait_for(first.stop(), 5)
    await start_service(**timings)

    reply = (await bus.reply())["data"]
    (lead,) = await admin.leads()
    assert (reply["status"], reply["bitrix_lead_id"]) == ("success", int(lead["ID"]))
    await bus.assert_no_reply(within=0.5)


async def _break_reply_queue(bus: Bus, name: str) -> AbstractQueue:
    """A reply queue RabbitMQ refuses our declaration of: publishing a reply to it fails."""
    return await bus.channel.declare_queue(name, durable=False, auto_delete=True)


async def _start_with_broken_replies(
    start_service: ServiceFactory, bus: Bus, settings: Settings, **overrides: Any
) -> AbstractQueue:
    """A service whose reply queue is broken (see `_break_reply_queue`)."""
    broken = await _break_reply_queue(bus, f"{settings.rabbitmq_reply_queue}.broken")
    await start_service(rabbitmq_reply_queue=broken.name, **overrides)
    return broken


async def _reply_once_repaired(bus: Bus, broken: AbstractQueue) -> dict[str, Any]:
    """Replaces the broken reply queue with a working one and returns the reply that arrives."""
    name = broken.name
    await broken.delete(if_unused=False, if_empty=False)
    queue = await bus.channel.declare_queue(name, durable=True)
    try:
        for _ in range(100):
            message = await queue.get(fail=False)
            if message is not None:
                reply: dict[str, Any] = json.loads(message.body)["data"]
                return reply
            await asyncio.sleep(0.1)
        raise AssertionError("no reply after the reply queue was repaired")
    finally:
        await queue.delete(if_unused=False, if_empty=False)


def _jobs_counted(outcome: str) -> float:
    return REGISTRY.get_sample_value("b24sync_bitrix_jobs_total", {"outcome": outcome}) or 0


async def _counted_more(outcome: str, before: float) -> None:
    async def grew() -> bool:
        return _jobs_counted(outcome) > before

    await eventually(grew)


async def test_a_failed_reply_fails_the_attempt_and_the_retry_replies(
    start_service: ServiceFactory, portal: object, bus: Bus, admin: Admin, settings: Settings
) -> None:
    broken = await _start_with_broken_replies(start_service, bus, settings, job_backoff_ms=1000)
    retries_before = _jobs_counted("retry")
    await bus.publish(event("create_card", 84, reply_queue=broken.name))

    await _counted_more("retry", retries_before)
    reply = await _reply_once_repaired(bus, broken)
    (lead,) = await admin.leads()
    assert (reply["status"], reply["attempts"]) == ("success", 2)
    assert reply["bitrix_lead_id"] == int(lead["ID"])


async def test_an_unsent_final_error_reply_keeps_the_job_until_it_is_sent(
    start_service: ServiceFactory, portal: object, bus: Bus, admin: Admin, settings: Settings
) -> None:
    await admin.fail("crm.lead.list", status=401, error="NO_AUTH_FOUND", times=100)
    broken = await _start_with_broken_replies(start_service, bus, settings, job_backoff_ms=200)
    delayed_before = _jobs_counted("delayed")
    await bus.publish(event("create_card", 85, reply_queue=broken.name))

    await _counted_more("delayed", delayed_before)
    reply = await _reply_once_repaired(bus, broken)
    assert (reply["status"], reply["error_code"]) == ("error", "NO_AUTH_FOUND")
    assert await admin.leads() == []
