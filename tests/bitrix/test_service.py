"""The Bitrix service end to end, in-process: raw AMQP events in, the emulator's leads and the
replies out."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import httpx
from redis.asyncio import Redis

from b24sync.bitrix.main import BitrixService
from b24sync.settings import Settings
from tests.seed import SEED_CREATE, SEED_MOVE, SEED_NO_PHONE_REPLY, SEED_UPDATE

from .conftest import Admin, Bus, ServiceFactory, event


def to(reply_queue: str, body: dict[str, Any]) -> dict[str, Any]:
    """A seed message aimed at this test's reply queue."""
    body = copy.deepcopy(body)
    body["data"]["replyQueue"] = reply_queue
    return body


def phones(lead: dict[str, Any]) -> list[str]:
    return [entry["VALUE"] for entry in lead.get("PHONE") or []]


async def test_seed_messages_give_the_seed_replies(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    replies = []
    for body in (SEED_CREATE, SEED_UPDATE, SEED_MOVE):
        await bus.publish(to(settings.rabbitmq_reply_queue, body))
        replies.append(await bus.reply())

    (lead,) = await admin.leads()
    lead_id = int(lead["ID"])
    for reply, sent in zip(replies, (SEED_CREATE, SEED_UPDATE, SEED_MOVE), strict=True):
        assert reply == {
            "pattern": "bitrix.responses",
            "data": {
                "status": "success",
                "action": sent["data"]["action"],
                "user": sent["data"]["user"],
                "user_id": 123,
                "bitrix_lead_id": lead_id,
                "attempts": 1,
            },
        }
    assert lead["TITLE"] == "Иван Петров"
    assert (lead["NAME"], lead["LAST_NAME"]) == ("Иван", "Петров")
    assert lead["STATUS_ID"] == "CONVERTED"
    assert (lead["ORIGINATOR_ID"], lead["ORIGIN_ID"]) == (settings.originator_id, "123")
    assert phones(lead) == ["+77001112233"]
    assert lead["PHONE"][0]["VALUE_TYPE"] == "WORK"


async def test_missing_phone_is_answered_at_once_without_calling_bitrix24(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    body = event("create_card", 123, reply_queue=settings.rabbitmq_reply_queue)
    body["data"]["user"] = {"id": 123, "full_name": "Пользователь без телефона", "stage": "NEW"}
    await bus.publish(body, message_id="evt-no-phone")

    message = await bus.reply_message()
    assert message.correlation_id == "evt-no-phone"
    # The seed's reply, saying too that sending it again cannot help.
    expected = copy.deepcopy(SEED_NO_PHONE_REPLY)
    expected["data"]["retryable"] = False
    assert json.loads(message.body) == expected
    # Only the call that checked the webhook at start.
    assert (await admin.stats())["by_method"] == {"crm.lead.fields": {"ok": 1}}


async def test_a_phone_change_replaces_the_phone(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    queue = settings.rabbitmq_reply_queue
    await bus.publish(event("create_card", 5, reply_queue=queue, phone="+77000000001"))
    lead_id = (await bus.reply())["data"]["bitrix_lead_id"]
    # Someone added a second number in the portal by hand.
    await admin.rest(
        "crm.lead.update",
        {"id": lead_id, "fields": {"PHONE": [{"VALUE": "+77000000002", "VALUE_TYPE": "HOME"}]}},
    )
    assert phones((await admin.leads())[0]) == ["+77000000001", "+77000000002"]

    await bus.publish(event("update_card", 5, reply_queue=queue, phone="+77009998877"))
    reply = await bus.reply()

    assert reply["data"]["status"] == "success"
    (lead,) = await admin.leads()
    assert phones(lead) == ["+77009998877"]
    assert lead["PHONE"][0]["VALUE_TYPE"] == "WORK"


async def test_correlation_id_is_the_message_id(
    service: BitrixService, bus: Bus, settings: Settings
) -> None:
    await bus.publish(
        event("create_card", 9, reply_queue=settings.rabbitmq_reply_queue), message_id="evt-9"
    )
    message = await bus.reply_message()
    assert message.correlation_id == "evt-9"


async def test_health_ready_and_metrics(
    service: BitrixService, bus: Bus, settings: Settings
) -> None:
    await bus.publish(event("create_card", 1, reply_queue=settings.rabbitmq_reply_queue))
    await bus.reply()
    base = f"http://127.0.0.1:{settings.bitrix_http_port}"
    async with httpx.AsyncClient(base_url=base) as http:
        health = (await http.get("/healthz")).json()
        assert health == {"status": "ok", "pid": os.getpid(), "ppid": os.getppid()}
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"rabbitmq": "ok", "redis": "ok", "bitrix24": "ok"}
        metrics = (await http.get("/metrics")).text
    assert 'b24sync_bitrix_jobs_total{outcome="success"}' in metrics
    assert 'b24sync_bitrix_api_calls_total{code="OK",method="crm.lead.add"}' in metrics
    assert "b24sync_bitrix_api_call_seconds_bucket" in metrics
    assert "b24sync_bitrix_job_attempts_bucket" in metrics


async def test_redis_keys_live_under_the_prefix(
    service: BitrixService, bus: Bus, settings: Settings, redis_client: Redis
) -> None:
    await bus.publish(event("create_card", 2, reply_queue=settings.rabbitmq_reply_queue))
    await bus.reply()
    keys = [key async for key in redis_client.scan_iter(match="*")]
    ours = [key for key in keys if key.startswith(f"{settings.bullmq_prefix}:")]
    assert f"{service.key_prefix}:user:2" in ours
    # Jobs carry the event, never the webhook URL.
    (job_key,) = [
        k
        for k in ours
        if k.startswith(f"{settings.bullmq_prefix}:bitrix_jobs:")
        and (await redis_client.type(k)) == "hash"
        and await redis_client.hexists(k, "data")
    ]
    job = await redis_client.hgetall(job_key)
    (queued,) = json.loads(job["data"])["events"]
    assert queued["event"]["data"]["user"]["id"] == 2
    assert "/rest/" not in json.dumps(job)
    assert settings.portal_webhook.get_secret_value() not in json.dumps(job)


async def test_graceful_stop_lets_the_active_job_finish(
    start_service: ServiceFactory, portal: object, bus: Bus, admin: Admin, settings: Settings
) -> None:
    service = await start_service()
    await admin.script(method="crm.lead.add", times=1, kind="timeout_after_write", delay_s=1.5)
    await bus.publish(event("create_card", 3, reply_queue=settings.rabbitmq_reply_queue))

    await admin.until_a_lead_exists()  # the call is in flight: the lead exists, no answer yet
    await service.stop()
    reply = await bus.reply(wait_s=1)
    assert reply["data"]["status"] == "success"
    assert reply["data"]["attempts"] == 1
