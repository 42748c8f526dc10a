"""The Bitrix service's log lines for one create, in-process against the emulator: the seed's
wording, the user's name and phone masked, one line per fact, the new lead's id and the time
its creation took rather than Bitrix24's `time` object."""

from __future__ import annotations

import re

import pytest

from b24sync.bitrix.main import BitrixService
from b24sync.settings import Settings

from .conftest import Admin, Bus, event


async def test_one_create_logs_each_fact_once_with_the_user_masked(
    service: BitrixService,
    bus: Bus,
    admin: Admin,
    settings: Settings,
    capfd: pytest.CaptureFixture[str],
) -> None:
    capfd.readouterr()
    await bus.publish(event("create_card", 7, reply_queue=settings.rabbitmq_reply_queue))
    reply = (await bus.reply())["data"]
    assert reply["status"] == "success"
    (lead,) = await admin.leads()
    logged = capfd.readouterr().out

    (received,) = re.findall(r"\[Bitrix\] Received user_created event: .*", logged)
    assert '"full_name": "И*** И***"' in received
    assert '"phone": "+7******2233"' in received
    assert "Иван" not in logged
    assert "7001112233" not in logged

    (created,) = re.findall(r"\[Bitrix\] Created lead in Bitrix24: .*", logged)
    assert created.startswith(f"[Bitrix] Created lead in Bitrix24: {lead['ID']} ")
    assert re.search(r"took_ms=\d+(\.\d+)?", created)
    assert "time" not in created.replace("took_ms", "")

    assert logged.count("[Bitrix] Job completed successfully") == 1
    # The seed's second wording of the same fact is kept one level down.
    (repeated,) = [line for line in logged.splitlines() if "completed after" in line]
    assert "[debug" in repeated
