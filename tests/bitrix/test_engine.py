"""The sync engine through the whole service, in-process: raw AMQP events in, the emulator's
leads, calls and the replies out. The newest change wins, only changed fields are written,
look-ups are shared, and there is never a second lead."""

from __future__ import annotations

from typing import Any

from bullmq import Queue
from redis.asyncio import Redis

from b24sync.bitrix.main import BitrixService
from b24sync.settings import Settings
from tests.conftest import eventually, wipe_redis

from .conftest import Admin, Bus, ServiceFactory, event


def phones(lead: dict[str, Any]) -> list[str]:
    return [entry["VALUE"] for entry in lead.get("PHONE") or []]


def by_version(replies: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {reply["data"]["user"]["version"]: reply["data"] for reply in replies}


async def hold_next(admin: Admin, method: str, delay_s: float = 1.0) -> None:
    """The portal writes the next `method` call but answers it only after `delay_s`: the
    user's write stays in flight meanwhile."""
    await admin.script(method=method, kind="timeout_after_write", delay_s=delay_s)


async def test_every_event_gets_one_reply_with_its_correlation_id(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    queue = settings.rabbitmq_reply_queue
    sent: list[str] = []
    for version in range(1, 5):
        for user_id in (1, 2, 3):
            action = "create_card" if version == 1 else "update_card"
            body = event(action, user_id, reply_queue=queue, version=version, stage=f"S{version}")
            message_id = f"evt-{user_id}-{version}"
            await bus.publish(body, message_id=message_id)
            sent.append(message_id)

    messages = [await bus.reply_message() for _ in sent]
    await bus.assert_no_reply(within=0.5)
    assert sorted(message.correlation_id or "" for message in messages) == sorted(sent)
    leads = await admin.leads()
    assert sorted((lead["ORIGIN_ID"], lead["STATUS_ID"]) for lead in leads) == [
        ("1", "S4"),
        ("2", "S4"),
        ("3", "S4"),
    ]


async def test_the_newest_of_the_waiting_changes_is_written_once(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    queue = settings.rabbitmq_reply_queue
    await hold_next(admin, "crm.lead.add")
    await bus.publish(event("create_card", 5, reply_queue=queue, version=1))
    await admin.until_a_lead_exists()  # events sent from now on wait behind it
    for version in range(2, 6):
        await bus.publish(
            event(
                "update_card",
                5,
                reply_queue=queue,
                version=version,
                full_name=f"Версия {version}",
                changed=["full_name"],
            )
        )

    replies = by_version(await bus.replies(5))
    assert replies[1]["status"] == "success"
    assert "skipped" not in replies[5]
    for version in (2, 3, 4):
        assert replies[version]["skipped"] is True
        assert replies[version]["reason"] == "superseded by version 5"
        assert "applied_version" not in replies[version]
    (lead,) = await admin.leads()
    assert lead["TITLE"] == "Версия 5"
    # One write for the four waiting changes, of the name only; the lead id was known.
    updates = await admin.calls("crm.lead.update")
    assert [call["params"]["fields"] for call in updates] == [
        {"TITLE": "Версия 5", "NAME": "Версия", "LAST_NAME": "5"}
    ]
    assert len(await admin.calls("crm.lead.list")) == 1  # the create's look-up only


async def test_a_salespersons_edit_of_an_unchanged_field_survives(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    queue = settings.rabbitmq_reply_queue
    await bus.publish(event("create_card", 6, reply_queue=queue, version=1))
    lead_id = (await bus.reply())["data"]["bitrix_lead_id"]
    await admin.rest("crm.lead.update", {"id": lead_id, "fields": {"TITLE": "VIP: Иван"}})

    await bus.publish(
        event(
            "move_card",
            6,
            reply_queue=queue,
            version=2,
            stage="IN_PROCESS",
            changed=["stage"],
            bitrix_lead_id=lead_id,
        )
    )
    assert (await bus.reply())["data"]["status"] == "success"
    (lead,) = await admin.leads()
    assert (lead["TITLE"], lead["STATUS_ID"]) == ("VIP: Иван", "IN_PROCESS")
    assert phones(lead) == ["+77001112233"]


async def test_a_move_after_a_failed_update_writes_the_phone(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    queue = settings.rabbitmq_reply_queue
    await bus.publish(event("create_card", 7, reply_queue=queue, version=1))
    lead_id = (await bus.reply())["data"]["bitrix_lead_id"]
    await admin.fail("crm.lead.update", status=500, error="INTERNAL_SERVER_ERROR", times=3)
    await bus.publish(
        event(
            "update_card",
            7,
            reply_queue=queue,
            version=2,
            phone="+77770000002",
            changed=["phone"],
            bitrix_lead_id=lead_id,
        )
    )
    failed = (await bus.reply())["data"]
    assert (failed["status"], failed["retryable"]) == ("error", True)

    # Core's move carries every field changed since the version Bitrix24 confirmed (1).
    await bus.publish(
        event(
            "move_card",
            7,
            reply_queue=queue,
            version=3,
            phone="+77770000002",
            stage="CONVERTED",
            changed=["phone", "stage"],
            bitrix_lead_id=lead_id,
        )
    )
    moved = (await bus.reply())["data"]
    assert (moved["status"], moved["bitrix_lead_id"]) == ("success", lead_id)
    (lead,) = await admin.leads()
    assert (phones(lead), lead["STATUS_ID"]) == (["+77770000002"], "CONVERTED")


async def test_the_fields_of_superseded_changes_survive_a_failed_write(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    queue = settings.rabbitmq_reply_queue
    await hold_next(admin, "crm.lead.add")
    await bus.publish(event("create_card", 8, reply_queue=queue, version=1))
    await admin.until_a_lead_exists()  # events sent from now on wait behind it
    await admin.fail("crm.lead.update", status=502, error="INTERNAL_SERVER_ERROR")
    await bus.publish(
        event(
            "update_card", 8, reply_queue=queue, version=2, phone="+77770000008", changed=["phone"]
        )
    )
    await bus.publish(
        event(
            "move_card",
            8,
            reply_queue=queue,
            version=3,
            phone="+77770000008",
            stage="CONVERTED",
            changed=["stage"],
        )
    )

    replies = by_version(await bus.replies(3))
    assert replies[2]["reason"] == "superseded by version 3"
    # The move's first write failed; its retry still carried the superseded update's phone.
    assert (replies[3]["status"], replies[3]["attempts"]) == ("success", 2)
    (lead,) = await admin.leads()
    assert (phones(lead), lead["STATUS_ID"]) == (["+77770000008"], "CONVERTED")


async def test_no_second_lead_after_redis_lost_everything(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    queue = settings.rabbitmq_reply_queue
    await bus.publish(event("create_card", 9, reply_queue=queue, version=1))
    lead_id = (await bus.reply())["data"]["bitrix_lead_id"]
    assert await wipe_redis(settings.bullmq_prefix) > 0

    # A producer that knows no lead id and sends no version (the seed's Core).
    await bus.publish(event("update_card", 9, reply_queue=queue, phone="+77770000009"))
    reply = (await bus.reply())["data"]
    (lead,) = await admin.leads()
    assert reply["bitrix_lead_id"] == lead_id == int(lead["ID"])
    assert phones(lead) == ["+77770000009"]


async def test_a_forced_event_is_written_and_its_version_recorded(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings, redis_client: Redis
) -> None:
    queue = settings.rabbitmq_reply_queue

    async def send(version: int, name: str, *, force: bool = False) -> dict[str, Any]:
        body = event(
            "update_card",
            10,
            reply_queue=queue,
            version=version,
            full_name=name,
            changed=["full_name"],
            force=force,
        )
        await bus.publish(body)
        reply: dict[str, Any] = (await bus.reply())["data"]
        return reply

    await send(1000, "Подделка Подделка")  # a forged event
    real = await send(2, "Настоящее Имя")
    assert (real["skipped"], real["applied_version"]) == (True, 1000)
    # Core restates its user with force: it is written, and its version is the applied one.
    forced = await send(2, "Настоящее Имя", force=True)
    assert "skipped" not in forced
    assert await redis_client.hget(f"{service.key_prefix}:user:10", "version") == "2"
    assert "skipped" not in await send(3, "Следующее Имя")
    (lead,) = await admin.leads()
    assert lead["TITLE"] == "Следующее Имя"


async def test_look_ups_of_many_users_share_one_command(
    start_service: ServiceFactory, portal: object, bus: Bus, admin: Admin, settings: Settings
) -> None:
    # A bucket that lets a request out every half second: the users pile up meanwhile.
    await start_service(bitrix_rate_burst=1, bitrix_rate_per_s=2)
    queue = settings.rabbitmq_reply_queue
    for user_id in range(1, 31):
        await bus.publish(event("create_card", user_id, reply_queue=queue, version=1))
    replies = await bus.replies(30)

    assert {reply["data"]["status"] for reply in replies} == {"success"}
    leads = await admin.leads()
    assert sorted(int(lead["ORIGIN_ID"]) for lead in leads) == list(range(1, 31))
    looked_up = [
        call["params"]["filter"]["@ORIGIN_ID"] for call in await admin.calls("crm.lead.list")
    ]
    assert sorted(int(user_id) for ids in looked_up for user_id in ids) == list(range(1, 31))
    assert len(looked_up) <= 3
    assert len(await admin.calls("crm.lead.add")) == 30
    assert (await admin.stats())["total"] < 10  # HTTP requests, a batch counted once


async def test_a_known_lead_without_a_phone_change_is_not_looked_up(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    queue = settings.rabbitmq_reply_queue
    await bus.publish(event("create_card", 11, reply_queue=queue, version=1))
    lead_id = (await bus.reply())["data"]["bitrix_lead_id"]
    await bus.publish(
        event(
            "update_card",
            11,
            reply_queue=queue,
            version=2,
            full_name="Пётр Петров",
            stage="IN_PROCESS",
            changed=["full_name", "stage"],
            bitrix_lead_id=lead_id,
        )
    )
    assert (await bus.reply())["data"]["bitrix_lead_id"] == lead_id
    assert len(await admin.calls("crm.lead.list")) == 1  # the create's
    (update,) = await admin.calls("crm.lead.update")
    assert update["params"]["fields"] == {
        "TITLE": "Пётр Петров",
        "NAME": "Пётр",
        "LAST_NAME": "Петров",
        "STATUS_ID": "IN_PROCESS",
    }


async def test_a_phone_change_replaces_the_entries_it_read(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    queue = settings.rabbitmq_reply_queue
    await bus.publish(event("create_card", 12, reply_queue=queue, version=1))
    lead_id = (await bus.reply())["data"]["bitrix_lead_id"]
    await admin.rest(  # someone added a second number in the portal
        "crm.lead.update",
        {"id": lead_id, "fields": {"PHONE": [{"VALUE": "+77000000002", "VALUE_TYPE": "HOME"}]}},
    )
    await bus.publish(
        event(
            "update_card",
            12,
            reply_queue=queue,
            version=2,
            phone="+77009998877",
            changed=["phone"],
            bitrix_lead_id=lead_id,
        )
    )
    await bus.reply()
    (lead,) = await admin.leads()
    assert phones(lead) == ["+77009998877"]


async def test_an_event_sent_again_after_its_job_finished_runs_again(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    """Core sends an event again, with its message id, when its reply was lost."""
    body = event("create_card", 13, reply_queue=settings.rabbitmq_reply_queue, version=1)
    await bus.publish(body, message_id="evt-13")
    first = await bus.reply_message()

    queue = Queue(
        settings.bullmq_queue, {"connection": settings.redis_url, "prefix": settings.bullmq_prefix}
    )

    async def finished() -> bool:
        return bool((await queue.getJobCounts("completed"))["completed"] == 1)

    await eventually(finished)
    await queue.close()
    await bus.publish(body, message_id="evt-13")
    again = await bus.reply_message()
    assert first.correlation_id == again.correlation_id == "evt-13"
    assert len(await admin.leads()) == 1


async def test_users_beyond_those_in_flight_wait_their_turn_and_are_all_written(
    start_service: ServiceFactory, portal: object, bus: Bus, admin: Admin, settings: Settings
) -> None:
    # One command a request, one request out: three users in flight at most.
    await start_service(bitrix_batch_size=1, bitrix_requests_in_flight=1)
    queue = settings.rabbitmq_reply_queue
    for user_id in range(1, 13):
        await bus.publish(event("create_card", user_id, reply_queue=queue, version=1))
    replies = await bus.replies(12)
    assert sorted(reply["data"]["user_id"] for reply in replies) == list(range(1, 13))
    assert len(await admin.leads()) == 12
