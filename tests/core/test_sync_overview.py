"""How far Bitrix24 is behind, at a glance: GET /sync and GET /metrics, on the real database,
each test rolled back."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.settings import Settings
from tests.core.helpers import answer, error, publish_all, success
from tests.core.test_api import SEED_CREATE


async def test_users_by_sync_state_and_the_outbox_backlog(
    client: httpx.AsyncClient,
    rollback_sessionmaker: async_sessionmaker[AsyncSession],
    core_settings: Settings,
) -> None:
    empty = (await client.get("/sync")).json()
    assert empty == {
        "users": {"total": 0, "pending": 0, "synced": 0, "failed": 0},
        "failed": {"retrying": 0, "permanent": 0, "next_retry_in_s": None},
        "oldest_pending_s": None,
        "outbox": {"unpublished": 0, "oldest_unpublished_s": None},
    }

    ids = [(await client.post("/users", json=SEED_CREATE)).json()["id"] for _ in range(5)]
    sessions = rollback_sessionmaker
    await publish_all(sessions)
    await answer(sessions, core_settings, success(ids[0], 1, lead=10))
    await answer(sessions, core_settings, error(ids[1], 1, reason="Missing phone number"))
    await answer(sessions, core_settings, error(ids[2], 1, reason="HTTP 502", retryable=True))
    await client.post("/users", json=SEED_CREATE)  # its event still waits for RabbitMQ

    overview = (await client.get("/sync")).json()
    assert overview["users"] == {"total": 6, "pending": 3, "synced": 1, "failed": 2}
    assert overview["failed"]["retrying"] == 1
    assert overview["failed"]["permanent"] == 1
    assert 20 < overview["failed"]["next_retry_in_s"] <= 36  # about 30 s, with its jitter
    assert overview["oldest_pending_s"] >= 0
    assert overview["outbox"]["unpublished"] == 1
    assert overview["outbox"]["oldest_unpublished_s"] >= 0

    response = await client.get("/metrics")
    assert response.status_code == 200
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    assert samples[("b24sync_core_users", (("sync_status", "pending"),))] == 3
    assert samples[("b24sync_core_users", (("sync_status", "synced"),))] == 1
    assert samples[("b24sync_core_users", (("sync_status", "failed"),))] == 2
    assert samples[("b24sync_core_failed_users", (("kind", "retrying"),))] == 1
    assert samples[("b24sync_core_failed_users", (("kind", "permanent"),))] == 1
    assert 20 < samples[("b24sync_core_next_retry_seconds", ())] <= 36
    assert samples[("b24sync_core_outbox_unpublished", ())] == 1
    assert samples[("b24sync_core_oldest_pending_seconds", ())] >= 0
