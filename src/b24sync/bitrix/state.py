"""Per-user state of the Bitrix service in Redis: the lead id and applied version, and the turns
and lock that run jobs of one user one at a time, in order (across processes too).

Redis may lose all of it: the lead id is then found on the portal again, and a lost version only
means the next event is applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast
from uuid import uuid4

from redis.asyncio import Redis

from b24sync.logs import get_logger

log = get_logger(__name__)

# KEYS[1] user hash; ARGV: lead id, version ("" when the event had none).
# The version only grows, so a late old event can never lower it.
_RECORD = """
redis.call('HSET', KEYS[1], 'lead_id', ARGV[1])
if ARGV[2] ~= '' then
  local current = tonumber(redis.call('HGET', KEYS[1], 'version'))
  if current == nil or tonumber(ARGV[2]) > current then
    redis.call('HSET', KEYS[1], 'version', ARGV[2])
  end
end
return 1
"""

# Renew or release a lock only while it is still ours (the token matches).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class UserState:
    lead_id: int | None
    version: int | None


class UserStateStore:
    def __init__(self, redis: Redis, prefix: str) -> None:
        self._redis = redis
        self._prefix = prefix
        self._record: Any = redis.register_script(_RECORD)

    def _key(self, user_id: int) -> str:
        return f"{self._prefix}:user:{user_id}"

    async def get(self, user_id: int) -> UserState:
        lead_id, version = await self._redis.hmget(self._key(user_id), ["lead_id", "version"])
        return UserState(
            lead_id=int(lead_id) if lead_id else None,
            version=int(version) if version else None,
        )

    async def record(self, user_id: int, lead_id: int, version: int | None) -> None:
        await self._record(
            keys=[self._key(user_id)], args=[lead_id, "" if version is None else version]
        )


class UserBusyError(Exception):
    """The user's earlier jobs kept the turn for longer than we wait."""


# Whether a job may still run (waiting, delayed, active): only such a job keeps its turn.
JobPending = Callable[[str], Awaitable[bool]]


class UserLocks:
    """Jobs of one user run one at a time and in the order they were queued, across processes.

    Order: the consumer appends each job id to the user's list; a job runs only at the head of
    it, and leaves it once it has its final outcome. A head that is no longer pending (finished,
    removed, failed as stalled) is dropped by whoever finds it, so a lost job cannot block the
    user. Exclusion: SET NX with a random token and a TTL, renewed while held, so a holder that
    died blocks the user for at most one TTL (a job whose worker died is run again as stalled).
    """

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        *,
        is_pending: JobPending,
        ttl_ms: int,
        wait_s: float,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._is_pending = is_pending
        self._ttl_ms = ttl_ms
        self._wait_s = wait_s
        self._renew: Any = redis.register_script(_RENEW)
        self._release: Any = redis.register_script(_RELEASE)

    def _turns_key(self, user_id: int) -> str:
        return f"{self._prefix}:turns:user:{user_id}"

    async def enqueue(self, user_id: int, job_id: str) -> None:
        await self._redis.rpush(self._turns_key(user_id), job_id)

    async def finish(self, user_id: int, job_id: str) -> None:
        """Passes the turn on. Best effort: the job's outcome is final already, and a finished
        job left at the head is dropped by the next one anyway."""
        try:
            await self._redis.lrem(self._turns_key(user_id), 0, job_id)
        except Exception as exc:
            log.warning(f"[Bitrix] Could not pass on the turn of job {job_id}: {exc}")

    async def _has_turn(self, user_id: int, job_id: str) -> bool:
        key = self._turns_key(user_id)
        while True:
            head = cast(str | None, await self._redis.lindex(key, 0))
            if head is None or head == job_id:
                return True
            if await self._is_pending(head):
                return False
            await self._redis.lrem(key, 1, head)

    @contextlib.asynccontextmanager
    async def hold(self, user_id: int, job_id: str) -> AsyncIterator[None]:
        """Waits (at most `wait_s`) for the job's turn and the user's lock, holds the lock."""
        key = f"{self._prefix}:lock:user:{user_id}"
        token = uuid4().hex
        deadline = time.monotonic() + self._wait_s
        poll_s = 0.02
        while not (
            await self._has_turn(user_id, job_id)
            and await self._redis.set(key, token, nx=True, px=self._ttl_ms)
        ):
            if time.monotonic() >= deadline:
                raise UserBusyError(f"user {user_id} is busy with earlier jobs")
            await asyncio.sleep(poll_s)
            poll_s = min(poll_s * 2, 0.25)
        renewer = asyncio.create_task(self._keep(key, token))
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            try:
                await self._release(keys=[key], args=[token])
            except Exception as exc:  # The TTL frees the user anyway; keep the job's own outcome.
                log.warning(f"[Bitrix] Could not release the lock {key}: {exc}")

    async def _keep(self, key: str, token: str) -> None:
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)
            try:
                renewed = await self._renew(keys=[key], args=[token, self._ttl_ms])
            except Exception as exc:  # Redis hiccup: the next renewal may still succeed.
                log.warning(f"[Bitrix] Could not renew the lock {key}: {exc}")
                continue
            if not renewed:
                log.warning(f"[Bitrix] Lost the lock {key}; another job may run for this user")
                return
