"""How far Bitrix24 is behind, at a glance: GET /sync and GET /metrics, on the real database,
each test rolled back."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.contracts import ReplyData
from b24sync.core.sync.service import reply_service
from tests.core.test_api import SEED_CREATE


async def answer(sessions: async_sessionmaker[AsyncSession], user_id: int, **reply: Any) -> None:
    data = ReplyData.model_validate(
        {"action": "create_card", "user": {"id": user_id, "version": 1}, **reply}
    )
    async with sessions() as session:
        await reply_service.apply(session, data)
        await session.commit()


async def test_users_by_sync_state_and_the_outbox_backlog(
    client: httpx.AsyncClient, rollback_sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    empty = (await client.get("/sync")).json()
    assert empty == {
        "users": {"total": 0, "pending": 0, "synced": 0, "failed": 0},
        "oldest_pending_s": None,
        "outbox": {"unpublished": 0, "oldest_unpublished_s": None},
    }

    ids = [(await client.post("/users", json=SEED_CREATE)).json()["id"] for _ in range(4)]
    await answer(rollback_sessionmaker, ids[0], status="success", bitrix_lead_id=10)
    await answer(rollback_sessionmaker, ids[1], status="error", reason="Missing phone number")

    overview = (await client.get("/sync")).json()
    assert overview["users"] == {"total": 4, "pending": 2, "synced": 1, "failed": 1}
    assert overview["oldest_pending_s"] >= 0
    # No relay runs here: every event is still waiting for RabbitMQ.
    assert overview["outbox"]["unpublished"] == 4
    assert overview["outbox"]["oldest_unpublished_s"] >= 0

    response = await client.get("/metrics")
    assert response.status_code == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    assert samples[("b24sync_core_users", (("sync_status", "pending"),))] == 2
    assert samples[("b24sync_core_users", (("sync_status", "synced"),))] == 1
    assert samples[("b24sync_core_users", (("sync_status", "failed"),))] == 1
    assert samples[("b24sync_core_outbox_unpublished", ())] == 4
    assert samples[("b24sync_core_oldest_pending_seconds", ())] >= 0
