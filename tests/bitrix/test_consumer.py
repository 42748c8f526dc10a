"""Bad input on the event queue: each message is answered clearly (when it names a user and our
reply queue), acknowledged, never turned into a lead, and the service goes on."""

from __future__ import annotations

import json
from typing import Any

import pytest

from b24sync.bitrix.main import BitrixService
from b24sync.settings import Settings

from .conftest import Admin, Bus, event


async def assert_next_event_is_served(bus: Bus, admin: Admin, settings: Settings) -> None:
    """A good event after the bad ones gets its lead and its reply; nothing else was made."""
    await bus.publish(event("create_card", 99, reply_queue=settings.rabbitmq_reply_queue))
    reply = (await bus.reply())["data"]
    assert (reply["status"], reply["user_id"]) == ("success", 99)
    assert [lead["ORIGIN_ID"] for lead in await admin.leads()] == ["99"]
    assert await bus.pending_events() == 0


async def test_deeply_nested_json_is_refused_and_acknowledged(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    await bus.publish(nested)
    deep_inside = json.dumps(event("create_card", 5, reply_queue=settings.rabbitmq_reply_queue))
    await bus.publish(deep_inside[:-1].encode() + b', "x": ' + nested + b"}")

    # Nothing to reply about (the body cannot be read), and nothing left unacknowledged.
    await assert_next_event_is_served(bus, admin, settings)


async def test_an_event_over_the_size_cap_is_refused_with_a_reply(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    body = event("create_card", 5, reply_queue=settings.rabbitmq_reply_queue)
    body["data"]["padding"] = "x" * settings.bitrix_event_max_bytes
    raw = json.dumps(body).encode()
    await bus.publish(raw, message_id="evt-big")

    message = await bus.reply_message()
    reply = json.loads(message.body)["data"]
    assert message.correlation_id == "evt-big"
    assert (reply["status"], reply["user_id"], reply["retryable"]) == ("error", 5, False)
    assert reply["reason"] == (
        f"Event too large: {len(raw)} bytes, at most {settings.bitrix_event_max_bytes}"
    )
    await assert_next_event_is_served(bus, admin, settings)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("full_name", "Я" * 201, "data.user.full_name: String should have at most 200 characters"),
        ("phone", "+7" * 33, "data.user.phone: String should have at most 64 characters"),
        ("stage", "S" * 65, "data.user.stage: String should have at most 64 characters"),
        ("version", 2**31, "data.user.version: Input should be less than or equal to 2147483647"),
    ],
)
async def test_fields_beyond_the_contract_are_refused(
    service: BitrixService,
    bus: Bus,
    admin: Admin,
    settings: Settings,
    field: str,
    value: Any,
    problem: str,
) -> None:
    body = event("create_card", 6, reply_queue=settings.rabbitmq_reply_queue, **{field: value})
    await bus.publish(body)
    reply = (await bus.reply())["data"]
    assert (reply["status"], reply["user_id"]) == ("error", 6)
    assert reply["reason"] == f"Invalid event: {problem}"
    # The echo is only the user's id: the refused value is not sent back.
    assert reply["user"] == {"id": 6}
    await assert_next_event_is_served(bus, admin, settings)


async def test_user_ids_that_cannot_exist_make_no_lead(
    service: BitrixService, bus: Bus, admin: Admin, settings: Settings
) -> None:
    for user_id in (0, -1, 2**63, 2**70):
        await bus.publish(event("create_card", user_id, reply_queue=settings.rabbitmq_reply_queue))
    # No user to reply about: refused with a log line only.
    await assert_next_event_is_served(bus, admin, settings)
    await bus.assert_no_reply(within=0.3)


async def test_log_lines_carry_cut_values(
    service: BitrixService,
    bus: Bus,
    admin: Admin,
    settings: Settings,
    capfd: pytest.CaptureFixture[str],
) -> None:
    body: dict[str, Any] = event("create_card", 7, reply_queue=settings.rabbitmq_reply_queue)
    body["pattern"] = "p" * 10_000
    await bus.publish(body)
    other = event("create_card", 8, reply_queue=f"{'q' * 200}")
    await bus.publish(other)
    assert (await bus.reply())["data"]["reason"].startswith("Unknown pattern: 'ppp")
    await assert_next_event_is_served(bus, admin, settings)

    lines = [line for line in capfd.readouterr().out.splitlines() if "Rejected event" in line]
    assert len(lines) == 2
    assert all(len(line) < 600 for line in lines)
