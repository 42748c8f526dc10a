"""Requests and limit answers counted per second in Redis, as Core's pipeline view reads them."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from b24sync.bitrix.main import create_client, key_prefix
from b24sync.bitrix.stats import RequestStats
from b24sync.settings import Settings

from .conftest import Admin


@pytest.mark.parametrize("plan", ["standard", "unlimited"])
async def test_requests_and_limit_answers_are_counted(
    fast_settings: Settings, admin: Admin, redis_client: Redis, plan: str
) -> None:
    settings = fast_settings.model_copy(update={"bitrix_plan": plan})
    client = create_client(settings, redis_client)
    stats = RequestStats(redis_client, key_prefix(settings))
    await admin.limit("crm.lead.list", "QUERY_LIMIT_EXCEEDED")
    try:
        for _ in range(3):
            await client.call("crm.lead.list", {"filter": {"ORIGINATOR_ID": "x"}})
    finally:
        await client.aclose()

    # Three calls, the first answered with a limit and sent again: four requests, one limit.
    totals = {"requests": 0, "limits": 0}
    for key in map(str, await redis_client.keys(f"{stats.key}:*")):
        totals[key.split(":")[-2]] += int(await redis_client.get(key) or 0)
        assert 0 < await redis_client.ttl(key) <= 120
    assert totals == {"requests": 4, "limits": 1}
    assert (await stats.read(5)).window_s == 5


async def test_read_gives_whole_seconds_oldest_first(
    settings: Settings, redis_client: Redis
) -> None:
    stats = RequestStats(redis_client, key_prefix(settings))
    now = int((await redis_client.time())[0])
    await redis_client.set(f"{stats.key}:requests:{now - 2}", 7)
    await redis_client.set(f"{stats.key}:limits:{now - 2}", 1)
    await redis_client.set(f"{stats.key}:requests:{now - 1}", 3)

    figures = await stats.read(4)

    # The second just before may have become the current one between the writes and the read.
    assert figures.requests[-2:] in ([7, 3], [3, 0])
    assert sum(figures.requests) == 10
    assert sum(figures.limit_answers) == 1
    assert figures.requests_per_s == 10 / 4
