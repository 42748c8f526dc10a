"""Per-user state and lock in Redis."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from b24sync.bitrix.state import UserBusyError, UserLocks, UserState, UserStateStore
from b24sync.settings import Settings


async def test_the_applied_version_only_grows(settings: Settings, redis_client: Redis) -> None:
    store = UserStateStore(redis_client, settings.bullmq_prefix)
    assert await store.get(1) == UserState(lead_id=None, version=None)
    await store.record(1, 10, 3)
    await store.record(1, 10, 2)  # a late old event
    assert await store.get(1) == UserState(lead_id=10, version=3)
    await store.record(1, 11, None)  # an event without version moves the lead id only
    assert await store.get(1) == UserState(lead_id=11, version=3)


def locks_for(
    settings: Settings, redis: Redis, *, pending: set[str] | None = None, **timing: float
) -> UserLocks:
    """Locks whose jobs are pending while listed in `pending` (all jobs when None)."""

    async def is_pending(job_id: str) -> bool:
        return pending is None or job_id in pending

    options: dict[str, float] = {"ttl_ms": 1000, "wait_s": 5} | timing
    return UserLocks(
        redis,
        settings.bullmq_prefix,
        is_pending=is_pending,
        ttl_ms=int(options["ttl_ms"]),
        wait_s=options["wait_s"],
    )


async def test_jobs_of_one_user_run_one_at_a_time_in_queue_order(
    settings: Settings, redis_client: Redis
) -> None:
    locks = locks_for(settings, redis_client)
    ran: list[str] = []
    inside: list[str] = []
    overlaps: list[str] = []

    async def job(job_id: str) -> None:
        async with locks.hold(7, job_id):
            if inside:
                overlaps.append(job_id)
            inside.append(job_id)
            ran.append(job_id)
            await asyncio.sleep(0.05)
            inside.remove(job_id)
        await locks.finish(7, job_id)

    for job_id in ("j1", "j2", "j3", "j4"):
        await locks.enqueue(7, job_id)
    # Workers pick them up in any order; they still run in queue order.
    await asyncio.gather(*(job(job_id) for job_id in ("j4", "j2", "j3", "j1")))
    assert ran == ["j1", "j2", "j3", "j4"]
    assert overlaps == []


async def test_a_finished_or_lost_job_does_not_keep_the_turn(
    settings: Settings, redis_client: Redis
) -> None:
    locks = locks_for(settings, redis_client, pending={"j2"}, wait_s=0.5)
    for job_id in ("lost", "j2"):
        await locks.enqueue(8, job_id)
    async with locks.hold(8, "j2"):
        pass
    assert await redis_client.lrange(f"{settings.bullmq_prefix}:turns:user:8", 0, -1) == ["j2"]


async def test_a_busy_user_is_reported_after_the_wait(
    settings: Settings, redis_client: Redis
) -> None:
    locks = locks_for(settings, redis_client, ttl_ms=600, wait_s=0.1)
    lock_key = f"{settings.bullmq_prefix}:lock:user:8"
    await locks.enqueue(8, "first")
    with pytest.raises(UserBusyError):  # not its turn
        async with locks.hold(8, "second"):
            pass
    async with locks.hold(8, "first"):
        with pytest.raises(UserBusyError):  # its turn, but the lock is held (a stalled copy)
            async with locks.hold(8, "first"):
                pass
        # Held longer than the TTL: the renewal keeps it.
        await asyncio.sleep(0.8)
        assert await redis_client.exists(lock_key)
    assert not await redis_client.exists(lock_key)


async def test_a_dead_holder_blocks_the_user_for_one_ttl_at_most(
    settings: Settings, redis_client: Redis
) -> None:
    # A worker killed while holding the lock leaves the key behind, never renewed.
    lock_key = f"{settings.bullmq_prefix}:lock:user:9"
    await redis_client.set(lock_key, "dead-token", px=300)
    locks = locks_for(settings, redis_client, wait_s=2)
    async with locks.hold(9, "j1"):
        assert await redis_client.get(lock_key) != "dead-token"
