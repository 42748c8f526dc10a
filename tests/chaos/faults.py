"""The faults, one at a time: processes killed, services restarted, the portal down or wrong
(through the emulator's `PUT /admin/faults`). Each returns when the fault is over."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import httpx
from redis.asyncio import Redis

from tests.chaos.infra import Infrastructure
from tests.chaos.profiles import ERROR_RATE, HELD_ANSWER_S, LOST_ANSWER_RATE, Profile
from tests.chaos.services import System

# How long a fault waits for its moment (every Bitrix process holding active jobs, say).
BUSY_WAIT_S = 60.0
# How long a Redis restart waits for jobs that no worker has taken yet.
UNTAKEN_WAIT_S = 20.0
# After the killed worker is back: how long to watch for the survivor taking new jobs.
SURVIVOR_WATCH_S = 10.0

T = TypeVar("T")


class Fault(StrEnum):
    CORE_KILL = "kill -9 Core"
    WORKER_KILL = "kill -9 Bitrix process"
    RABBITMQ_RESTART = "RabbitMQ restart"
    REDIS_RESTART = "Redis restart, data lost"
    POSTGRES_RESTART = "PostgreSQL restart"
    PORTAL_OUTAGE = "portal outage"
    PORTAL_LONG_OUTAGE = "portal long outage"
    PORTAL_ERRORS = "portal 5xx"
    LOST_ANSWERS = "answers lost after the write"

    @property
    def is_outage(self) -> bool:
        return self in (Fault.PORTAL_OUTAGE, Fault.PORTAL_LONG_OUTAGE)


@dataclass
class FaultRecord:
    fault: Fault
    round: int
    started_at: float  # a fault that waits for its moment sets these itself
    ended_at: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.fault} #{self.round}"


class Injector:
    def __init__(self, infra: Infrastructure, system: System, profile: Profile) -> None:
        self.infra = infra
        self.system = system
        self.profile = profile
        self.admin = httpx.AsyncClient(base_url=system.portal_url, timeout=10)
        self._faults: dict[Fault, Callable[[FaultRecord], Awaitable[None]]] = {
            Fault.CORE_KILL: self._kill_core,
            Fault.WORKER_KILL: self._kill_worker,
            Fault.RABBITMQ_RESTART: self._restart_rabbitmq,
            Fault.REDIS_RESTART: self._restart_redis,
            Fault.POSTGRES_RESTART: self._restart_postgres,
            Fault.PORTAL_OUTAGE: self._portal_outage,
            Fault.PORTAL_LONG_OUTAGE: self._portal_outage,
            Fault.PORTAL_ERRORS: self._portal_errors,
            Fault.LOST_ANSWERS: self._lost_answers,
        }

    async def close(self) -> None:
        await self.admin.aclose()

    async def inject(self, fault: Fault, round_: int) -> FaultRecord:
        record = FaultRecord(fault, round_, started_at=time.time())
        await self._faults[fault](record)
        record.ended_at = record.ended_at or time.time()
        return record

    async def _down_then_start(self, service_start: Callable[[], Awaitable[None]]) -> None:
        await asyncio.sleep(self.profile.down_s)
        await service_start()

    async def _kill_core(self, record: FaultRecord) -> None:
        record.details["pid"] = self.system.core.process.pid
        self.system.core.kill()
        await self._down_then_start(self.system.core.start)

    async def _kill_worker(self, record: FaultRecord) -> None:
        """Kills one Bitrix process (in turn) once every process holds active jobs, so the
        one killed surely dies mid-job."""
        target = self.system.bitrix[(record.round - 1) % len(self.system.bitrix)]
        every_process = len(self.system.bitrix)
        before = await self._until(self._active_jobs, lambda busy: len(busy) >= every_process)
        record.details.update(
            process=target.name,
            pid=target.process.pid,
            active_jobs_by_worker=sorted((len(tokens) for tokens in before.values()), reverse=True),
            every_process_busy=len(before) >= every_process,
        )
        record.started_at = time.time()
        target.kill()
        await self._down_then_start(target.start)
        record.ended_at = time.time()
        record.details["killed_active_jobs"] = await self._jobs_of_the_killed(before)

    async def _until(
        self,
        read: Callable[[], Awaitable[T]],
        holds: Callable[[T], bool],
        wait_s: float = BUSY_WAIT_S,
    ) -> T:
        """Reads until what is read `holds` (the moment a fault waits for), giving up after
        `wait_s`; returns the last reading."""
        deadline = time.monotonic() + wait_s
        while True:
            reading = await read()
            if holds(reading) or time.monotonic() > deadline:
                return reading
            await asyncio.sleep(0.05)

    def _bullmq(self) -> tuple[Redis, str]:
        """A client of the suite's Redis and the BullMQ queue's key prefix."""
        settings = self.system.settings
        redis = Redis.from_url(settings.redis_url, decode_responses=True)
        return redis, f"{settings.bullmq_prefix}:{settings.bullmq_queue}"

    async def _active_jobs(self) -> dict[str, set[str]]:
        """BullMQ's active jobs by worker: lock tokens are `<worker id>:<n>`."""
        redis, base = self._bullmq()
        async with redis:
            job_ids = await redis.lrange(f"{base}:active", 0, -1)
            tokens = await redis.mget([f"{base}:{job}:lock" for job in job_ids]) if job_ids else []
        workers: dict[str, set[str]] = {}
        for token in tokens:
            if token:
                workers.setdefault(token.split(":")[0], set()).add(token)
        return workers

    async def _queued_jobs(self) -> dict[str, int]:
        """BullMQ's unfinished jobs: waiting, running, waiting for a retry."""
        redis, base = self._bullmq()
        async with redis:
            return {
                "waiting": await redis.llen(f"{base}:wait"),
                "prioritized": await redis.zcard(f"{base}:prioritized"),
                "active": await redis.llen(f"{base}:active"),
                "delayed": await redis.zcard(f"{base}:delayed"),
            }

    async def _jobs_of_the_killed(self, before: dict[str, set[str]]) -> int | None:
        """The killed process's worker is the one that never takes a new job again; None when
        the survivor took none while watched either."""
        deadline = time.monotonic() + SURVIVOR_WATCH_S
        while time.monotonic() < deadline:
            now = await self._active_jobs()
            alive = {worker for worker, tokens in now.items() if tokens - before.get(worker, set())}
            gone = set(before) - alive
            if alive & set(before) and len(gone) == 1:
                return len(before[gone.pop()])
            await asyncio.sleep(0.2)
        return None

    async def _restart_rabbitmq(self, record: FaultRecord) -> None:
        await asyncio.to_thread(self.infra.rabbitmq.stop)
        await self._down_then_start(self.infra.rabbitmq.start)

    async def _restart_redis(self, record: FaultRecord) -> None:
        """Once BullMQ holds jobs no worker has taken (a worker finishes and answers the jobs
        it holds, Redis or not), else once it holds any unfinished job."""
        jobs = await self._until(
            self._queued_jobs,
            lambda queued: sum(queued.values()) > queued["active"],
            UNTAKEN_WAIT_S,
        )
        if not sum(jobs.values()):
            jobs = await self._until(self._queued_jobs, lambda queued: sum(queued.values()) > 0)
        async with Redis.from_url(self.infra.redis.url) as redis:
            record.details.update(jobs_lost=jobs, keys_lost=await redis.dbsize())
        record.started_at = time.time()
        await asyncio.to_thread(self.infra.redis.process.kill)
        await self._down_then_start(self.infra.redis.start)

    async def _restart_postgres(self, record: FaultRecord) -> None:
        await asyncio.to_thread(self.infra.postgres.stop)
        await self._down_then_start(self.infra.postgres.start)

    async def _set_portal_faults(self, **faults: Any) -> None:
        """The emulator's fault config; what is not named is off (held answers keep theirs)."""
        response = await self.admin.put(
            "/admin/faults", json={"timeout_delay_s": HELD_ANSWER_S, **faults}
        )
        response.raise_for_status()

    async def _portal_outcomes(self) -> Counter[str]:
        """Calls answered so far, by outcome (commands inside batches included)."""
        stats = (await self.admin.get("/admin/stats")).json()
        outcomes: Counter[str] = Counter()
        for by_outcome in stats["by_method"].values():
            outcomes.update(by_outcome)
        return outcomes

    async def _while_portal_faulty(
        self, record: FaultRecord, hold_s: float, after_s: float = 0.0, **faults: Any
    ) -> None:
        before = await self._portal_outcomes()
        await self._set_portal_faults(**faults)
        await asyncio.sleep(hold_s)
        await self._set_portal_faults()
        await asyncio.sleep(after_s)
        outcomes = await self._portal_outcomes()
        outcomes.subtract(before)
        record.details.update(faults, seconds=hold_s, portal_outcomes=+outcomes)

    async def _portal_outage(self, record: FaultRecord) -> None:
        long = record.fault is Fault.PORTAL_LONG_OUTAGE
        seconds = self.profile.long_outage_s if long else self.profile.portal_outage_s
        # Both kinds of outage in turn: an nginx 503 page, and connections reset.
        modes = ("connection", "html") if long else ("html", "connection")
        mode = modes[(record.round - 1) % 2]
        await self._while_portal_faulty(record, seconds, outage_s=seconds, outage_mode=mode)

    async def _portal_errors(self, record: FaultRecord) -> None:
        await self._while_portal_faulty(
            record, self.profile.error_burst_s, error_rate=ERROR_RATE, error_format="mixed"
        )

    async def _lost_answers(self, record: FaultRecord) -> None:
        # Over once the last held answer has left (it is lost to the client all the same).
        await self._while_portal_faulty(
            record,
            self.profile.lost_answers_s,
            after_s=HELD_ANSWER_S,
            timeout_rate=LOST_ANSWER_RATE,
        )


def schedule(profile: Profile) -> list[tuple[Fault, int]]:
    """Every fault once per round, in the same order, one after another."""
    return [(fault, round_) for round_ in range(1, profile.rounds + 1) for fault in Fault]
