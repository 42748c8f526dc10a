"""Client-side leaky bucket in front of Bitrix24, shared by every worker and process via Redis.

Bitrix24 counts requests per portal and source IP: each request adds one to a counter that drains
at `rate_per_s`; above `burst` the portal answers 503 QUERY_LIMIT_EXCEEDED. Keeping our own count
in one Redis key makes all workers on this host slow down together instead of each of them hitting
the portal's limit. A `batch` of up to 50 commands counts as one request, so it acquires cost 1.

Bitrix24 also blocks a method for a while once its operating time runs out (429
OPERATION_TIME_LIMIT). A worker told so marks the method blocked here, so the others wait too
instead of each spending a request to hear the same.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from redis.asyncio import Redis

from b24sync.bitrix.stats import REQUESTS, count_lua

# KEYS[1] the bucket hash {level, ts}, KEYS[2] the method's block, KEYS[3] (optional) the
# request counters' prefix (stats.py); ARGV: burst, rate per second, cost, and the counters'
# kind. Returns {0, room} when the cost was taken (counted as requests when KEYS[3] is given),
# room being the thousandths of a slot still free; otherwise {1, ms} with the milliseconds to
# wait before trying again, or {2, ms} while the method is blocked (nothing taken). Time comes
# from the Redis server so that clocks of the callers do not matter.
_ACQUIRE = f"""
local blocked = redis.call('PTTL', KEYS[2])
if blocked > 0 then
  return {{2, blocked}}
end
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local burst = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'level', 'ts')
local level = tonumber(state[1]) or 0
local ts = tonumber(state[2]) or now
level = math.max(0, level - math.max(0, now - ts) * rate)
if level + cost <= burst then
  level = level + cost
  redis.call('HSET', KEYS[1], 'level', tostring(level), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(level / rate * 1000) + 1000)
  if KEYS[3] then
{count_lua(key=3, kind=4, amount=3)}
  end
  return {{0, math.floor((burst - level) * 1000)}}
end
return {{1, math.ceil((level + cost - burst) / rate * 1000)}}
"""

# Marks the bucket full: the portal said it is over its limit, whatever our count says.
_FILL = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
redis.call('HSET', KEYS[1], 'level', ARGV[1], 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) / tonumber(ARGV[2]) * 1000) + 1000)
return 0
"""


class MethodBlockedError(Exception):
    """Bitrix24 blocked the method (operating time), as another worker was told."""

    def __init__(self, method: str, retry_after_s: float) -> None:
        super().__init__(f"{method} is blocked for {retry_after_s:.1f}s more")
        self.retry_after_s = retry_after_s


class RateLimiter:
    def __init__(
        self,
        redis: Redis,
        key: str,
        *,
        burst: int,
        rate_per_s: float,
        stats_key: str | None = None,
    ) -> None:
        """`stats_key`: the request counters' prefix (`stats.stats_key`); each request taken
        is counted there, inside the same script call."""
        if burst < 1 or rate_per_s <= 0:
            raise ValueError("the rate limit needs burst >= 1 and rate_per_s > 0")
        self._redis = redis
        self._key = key
        self._burst = burst
        self._rate_per_s = rate_per_s
        self._stats_key = stats_key
        self._acquire_script: Any = redis.register_script(_ACQUIRE)
        self._fill_script: Any = redis.register_script(_FILL)
        # The room the bucket had after this process last took from it, and when.
        self._room = float(burst)
        self._room_at = 0.0

    @property
    def interval_s(self) -> float:
        """How long the bucket takes to free one slot."""
        return 1 / self._rate_per_s

    def free_share(self) -> float:
        """The share of the bucket free now, as far as this process can tell: the room left
        after its last take, drained since (other processes may have taken some)."""
        drained = (time.monotonic() - self._room_at) * self._rate_per_s
        return min(1.0, (self._room + drained) / self._burst)

    async def try_acquire(self, cost: int = 1, *, method: str = "") -> float:
        """Takes `cost` slots if free and returns 0, else returns the seconds to wait.
        Raises `MethodBlockedError` while `method` is blocked."""
        if not 1 <= cost <= self._burst:
            raise ValueError(f"cost must be between 1 and {self._burst}")
        keys = [self._key, self._block_key(method)]
        if self._stats_key is not None:
            keys.append(self._stats_key)
        status, value = await self._acquire_script(
            keys=keys, args=[self._burst, self._rate_per_s, cost, REQUESTS]
        )
        if int(status) == 0:
            self._room, self._room_at = int(value) / 1000, time.monotonic()
            return 0.0
        if int(status) == 2:
            raise MethodBlockedError(method, int(value) / 1000)
        return int(value) / 1000

    async def acquire(self, cost: int = 1, *, method: str = "") -> None:
        """Waits until `cost` slots are free and takes them (see `try_acquire`)."""
        while (wait_s := await self.try_acquire(cost, method=method)) > 0:  # noqa: ASYNC110
            # Jitter spreads out workers that were told the same wait.
            await asyncio.sleep(wait_s + random.uniform(0, 0.05))

    async def fill(self) -> None:
        await self._fill_script(keys=[self._key], args=[self._burst, self._rate_per_s])

    async def block(self, method: str, for_s: float) -> None:
        """Marks `method` blocked for every limiter on this key, for `for_s` seconds."""
        await self._redis.set(self._block_key(method), "1", px=max(1, round(for_s * 1000)))

    def _block_key(self, method: str) -> str:
        return f"{self._key}:blocked:{method}"
