"""Per-user leases and state in Redis, many users per script call."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from b24sync.bitrix.state import Finish, UserLeases, UserState
from b24sync.settings import Settings


def leases(settings: Settings, redis: Redis, owner: str, ttl_ms: int = 1000) -> UserLeases:
    return UserLeases(redis, settings.bullmq_prefix, owner=owner, ttl_ms=ttl_ms)


async def test_one_call_leases_many_users_and_tells_their_state(
    settings: Settings, redis_client: Redis
) -> None:
    ours, theirs = leases(settings, redis_client, "a"), leases(settings, redis_client, "b")
    assert await theirs.take([3]) == {3: UserState(None, None)}
    await ours.finish([Finish(1, lead_id=10, version=4, release=True)])

    taken = await ours.take([1, 2, 3])
    # User 3 is another process's: nothing to take; the others come with what is recorded.
    assert taken == {1: UserState(10, 4), 2: UserState(None, None), 3: None}
    assert await ours.take([1]) == {1: UserState(10, 4)}  # ours already: still ours
    assert await theirs.take([1, 2]) == {1: None, 2: None}

    await ours.finish([Finish(1), Finish(2, release=False)])
    assert await theirs.take([1, 2]) == {1: UserState(10, 4), 2: None}


async def test_the_applied_version_only_grows_unless_forced(
    settings: Settings, redis_client: Redis
) -> None:
    store = leases(settings, redis_client, "a")

    async def state() -> UserState | None:
        return (await store.take([1]))[1]

    await store.finish([Finish(1, lead_id=10, version=3)])
    await store.finish([Finish(1, lead_id=10, version=2)])  # a late old event
    assert await state() == UserState(10, 3)
    await store.finish([Finish(1, lead_id=11)])  # an event without a version: the lead id only
    assert await state() == UserState(11, 3)
    # Core restated a user whose recorded version it never had (a forged one).
    await store.finish([Finish(1, version=1000)])
    await store.finish([Finish(1, lead_id=11, version=7, forced=True)])
    assert await state() == UserState(11, 7)


async def test_a_lease_lives_while_renewed_and_ends_with_its_ttl(
    settings: Settings, redis_client: Redis
) -> None:
    ours = leases(settings, redis_client, "a", ttl_ms=300)
    theirs = leases(settings, redis_client, "b", ttl_ms=300)
    await ours.take([1, 2])
    for _ in range(4):
        await asyncio.sleep(0.1)
        assert await ours.renew([1]) == 0
    # User 1 was kept alive by its renewals; user 2's lease ran out, as a killed process's does.
    assert await theirs.take([1, 2]) == {1: None, 2: UserState(None, None)}
    assert await ours.renew([1, 2]) == 1
