"""What the Bitrix service keeps per user in Redis: the lead id and the version it applied last,
and a short lease that lets one process at a time write the user's lead.

Leases are taken, renewed and released for many users in one script call each. A lease lives
`ttl_ms` unless renewed, so a process killed while writing blocks its users for at most that
long. Redis may lose all of it: the lead id is found on the portal again, and a lost version
only means the next event is applied.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

# KEYS: lease and state key of each user, in pairs; ARGV: owner, ttl in ms. For each user,
# {1, lead_id, version} when the lease is ours now (taken, or ours already), {0} when another
# process holds it. A free lease costs one SET (NX ... GET tells who held it) and one HMGET.
_TAKE = """
local out = {}
for i = 1, #KEYS, 2 do
  local holder = redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2], 'GET')
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  end
  if holder == false or holder == ARGV[1] then
    local state = redis.call('HMGET', KEYS[i + 1], 'lead_id', 'version')
    out[#out + 1] = {1, state[1] or '', state[2] or ''}
  else
    out[#out + 1] = {0}
  end
end
return out
"""

# KEYS: lease and state key of each user, in pairs; ARGV[1] owner, then per user four values:
# lead id ('' to keep), version ('' to keep), '1' when the version is forced (written even if
# lower), '1' to release the lease. While the lease is ours, nobody else wrote the user since
# it was taken, and the engine writes no version below the one it read then unless forced: the
# version is set as it comes. A lease that ran out during the write may have let another
# process apply a newer version, so then the version only grows (a late old event never
# lowers it). A lease is released only while it is still ours.
_FINISH = """
for i = 1, #KEYS, 2 do
  local at = 2 + (i - 1) * 2
  local lead_id, version, forced, release = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local ours = redis.call('GET', KEYS[i]) == ARGV[1]
  if version ~= '' and not ours and forced ~= '1' then
    local current = tonumber(redis.call('HGET', KEYS[i + 1], 'version'))
    if current ~= nil and tonumber(version) <= current then
      version = ''
    end
  end
  local fields = {}
  if lead_id ~= '' then
    fields[#fields + 1] = 'lead_id'
    fields[#fields + 1] = lead_id
  end
  if version ~= '' then
    fields[#fields + 1] = 'version'
    fields[#fields + 1] = version
  end
  if #fields > 0 then
    redis.call('HSET', KEYS[i + 1], unpack(fields))
  end
  if release == '1' and ours then
    redis.call('DEL', KEYS[i])
  end
end
return 1
"""

# KEYS: leases; ARGV: owner, ttl in ms. Returns how many were no longer ours.
_RENEW = """
local lost = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
  else
    lost = lost + 1
  end
end
return lost
"""


@dataclass(frozen=True)
class UserState:
    lead_id: int | None
    version: int | None


@dataclass(frozen=True)
class Finish:
    """What a process learnt about a user's lead, and whether it is done with the user."""

    user_id: int
    lead_id: int | None = None
    version: int | None = None
    forced: bool = False
    release: bool = True


class UserLeases:
    def __init__(self, redis: Redis, prefix: str, *, owner: str, ttl_ms: int) -> None:
        self._redis = redis
        self._prefix = prefix
        self._owner = owner
        self._ttl_ms = ttl_ms
        self._take: Any = redis.register_script(_TAKE)
        self._finish: Any = redis.register_script(_FINISH)
        self._renew: Any = redis.register_script(_RENEW)

    @property
    def ttl_ms(self) -> int:
        return self._ttl_ms

    def _keys(self, user_id: int) -> tuple[str, str]:
        return f"{self._prefix}:lease:user:{user_id}", f"{self._prefix}:user:{user_id}"

    async def take(self, user_ids: Sequence[int]) -> dict[int, UserState | None]:
        """Leases the users; for each, its state when the lease is ours, None when another
        process holds it."""
        if not user_ids:
            return {}
        keys = [key for user_id in user_ids for key in self._keys(user_id)]
        rows = await self._take(keys=keys, args=[self._owner, self._ttl_ms])
        taken: dict[int, UserState | None] = {}
        for user_id, row in zip(user_ids, rows, strict=True):
            if int(row[0]) != 1:
                taken[user_id] = None
                continue
            lead_id, version = row[1], row[2]
            taken[user_id] = UserState(
                lead_id=int(lead_id) if lead_id else None,
                version=int(version) if version else None,
            )
        return taken

    async def finish(self, finished: Sequence[Finish]) -> None:
        """Records what was learnt and releases the leases marked for release."""
        if not finished:
            return
        keys: list[str] = []
        args: list[str | int] = [self._owner]
        for item in finished:
            keys.extend(self._keys(item.user_id))
            args.extend(
                [
                    "" if item.lead_id is None else item.lead_id,
                    "" if item.version is None else item.version,
                    "1" if item.forced else "0",
                    "1" if item.release else "0",
                ]
            )
        await self._finish(keys=keys, args=args)

    async def renew(self, user_ids: Iterable[int]) -> int:
        """Extends the leases still ours; returns how many were not (expired, taken over)."""
        keys = [self._keys(user_id)[0] for user_id in user_ids]
        if not keys:
            return 0
        return int(await self._renew(keys=keys, args=[self._owner, self._ttl_ms]))
