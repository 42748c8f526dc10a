"""Bitrix24 requests and limit answers per second, counted in Redis by every Bitrix process and
read by Core's pipeline view (`GET /sync/pipeline`, the dashboard, `b24sync status`).

One counter key per kind and second (`<prefix>:stats:<kind>:<unix second>`), living
`STATS_TTL_S`. A request is counted inside the bucket's own script when it takes its slot
(`ratelimit.py`), so it costs no extra Redis command; only without a bucket (the unlimited
plan) does counting cost one script call per request. The second comes from the Redis server's
clock, so the processes' clocks do not matter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

REQUESTS = "requests"
LIMIT_ANSWERS = "limits"
# Seconds a counter outlives its second: enough for a reader's window.
STATS_TTL_S = 120
# The longest window a reader may ask for.
MAX_WINDOW_S = 60

# Lua: adds ARGV[n] to the counter of kind ARGV[n - 1] for the current second, under the key
# prefix KEYS[k]. Embedded in the bucket's script and used alone; `k` and `n` are filled in.
_COUNT_LUA = """
do
  local second = redis.call('TIME')[1]
  local counter = KEYS[{key}] .. ':' .. ARGV[{kind}] .. ':' .. second
  redis.call('INCRBY', counter, ARGV[{amount}])
  redis.call('EXPIRE', counter, {ttl})
end
"""


def count_lua(*, key: int, kind: int, amount: int) -> str:
    """The Lua that counts, with the positions of its key prefix and arguments."""
    return _COUNT_LUA.format(key=key, kind=kind, amount=amount, ttl=STATS_TTL_S)


_COUNT = count_lua(key=1, kind=1, amount=2) + "return 0"

# KEYS[1] the prefix; ARGV[1] the window. Returns the server's current second, then for each
# second of the window before it (oldest first) the requests and the limit answers.
_READ = f"""
local now = tonumber(redis.call('TIME')[1])
local window = tonumber(ARGV[1])
local keys = {{}}
for second = now - window, now - 1 do
  keys[#keys + 1] = KEYS[1] .. ':{REQUESTS}:' .. second
  keys[#keys + 1] = KEYS[1] .. ':{LIMIT_ANSWERS}:' .. second
end
local values = redis.call('MGET', unpack(keys))
local result = {{now}}
for index = 1, #keys do
  result[#result + 1] = tonumber(values[index]) or 0
end
return result
"""


def stats_key(prefix: str) -> str:
    """The counters' key prefix under the service's own key prefix (`bitrix.main.key_prefix`)."""
    return f"{prefix}:stats"


@dataclass(frozen=True, slots=True)
class RequestFigures:
    """The last `window_s` whole seconds, oldest first."""

    requests: list[int]
    limit_answers: list[int]

    @property
    def window_s(self) -> int:
        return len(self.requests)

    @property
    def requests_per_s(self) -> float:
        return sum(self.requests) / self.window_s if self.window_s else 0.0


class RequestStats:
    """The counters of one Bitrix service's key prefix."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self.key = stats_key(prefix)
        self._count: Any = redis.register_script(_COUNT)
        self._read: Any = redis.register_script(_READ)

    async def count(self, kind: str, amount: int = 1) -> None:
        """One script call: adds `amount` to this second's counter of `kind`."""
        await self._count(keys=[self.key], args=[kind, amount])

    async def read(self, window_s: int) -> RequestFigures:
        """The counts of the last `window_s` whole seconds (1 to `MAX_WINDOW_S`), one script
        call."""
        window_s = max(1, min(window_s, MAX_WINDOW_S))
        values = [int(value) for value in await self._read(keys=[self.key], args=[window_s])]
        pairs = values[1:]
        return RequestFigures(requests=pairs[0::2], limit_answers=pairs[1::2])
