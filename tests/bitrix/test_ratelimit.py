"""The leaky bucket in Redis, shared by every limiter that uses the same key."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from b24sync.bitrix.ratelimit import MethodBlockedError, RateLimiter
from b24sync.settings import Settings


def two_workers(
    settings: Settings, redis: Redis, *, burst: int, rate_per_s: float
) -> tuple[RateLimiter, RateLimiter]:
    """The limiters two workers would have: one bucket in Redis."""
    key = f"{settings.bullmq_prefix}:ratelimit"
    return (
        RateLimiter(redis, key, burst=burst, rate_per_s=rate_per_s),
        RateLimiter(redis, key, burst=burst, rate_per_s=rate_per_s),
    )


async def test_burst_then_drain_shared_between_limiters(
    settings: Settings, redis_client: Redis
) -> None:
    first, second = two_workers(settings, redis_client, burst=3, rate_per_s=10)

    assert [await first.try_acquire() for _ in range(2)] == [0, 0]
    assert await second.try_acquire() == 0
    # The bucket is full for both: one slot drains in 1/10 s.
    wait_s = await second.try_acquire()
    assert 0 < wait_s <= 0.1
    assert await first.try_acquire() > 0

    await asyncio.sleep(wait_s + 0.02)
    assert await first.try_acquire() == 0


async def test_acquire_waits_for_a_slot(settings: Settings, redis_client: Redis) -> None:
    limiter = RateLimiter(redis_client, f"{settings.bullmq_prefix}:rl", burst=2, rate_per_s=20)
    for _ in range(5):
        await limiter.acquire()
    # Five slots taken from a bucket of two: the last three had to wait for the drain.
    assert await limiter.try_acquire(2) > 0


async def test_fill_blocks_until_drained(settings: Settings, redis_client: Redis) -> None:
    limiter = RateLimiter(redis_client, f"{settings.bullmq_prefix}:rl", burst=5, rate_per_s=50)
    await limiter.fill()
    assert await limiter.try_acquire() > 0
    with pytest.raises(ValueError, match="cost"):
        await limiter.try_acquire(6)


async def test_a_blocked_method_takes_nothing_until_the_block_ends(
    settings: Settings, redis_client: Redis
) -> None:
    first, second = two_workers(settings, redis_client, burst=1, rate_per_s=1)
    await first.block("crm.lead.list", 0.2)

    with pytest.raises(MethodBlockedError) as blocked:
        await second.acquire(method="crm.lead.list")
    assert 0 < blocked.value.retry_after_s <= 0.2
    # Blocked calls took no slot: the bucket's only one is still there for another method.
    assert await second.try_acquire(method="crm.lead.add") == 0

    await asyncio.sleep(0.25)
    assert await first.try_acquire(method="crm.lead.list") > 0  # the bucket's turn now
