"""The pipeline snapshot: `sync_overview_service`'s figures from the database, plus the Bitrix
service's BullMQ queue and its Bitrix24 requests from Redis. Redis being down is part of the
answer (counts None and the reason), never an error of its own."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from bullmq import Queue
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession

from b24sync.bitrix.main import key_prefix
from b24sync.bitrix.stats import RequestStats
from b24sync.core.pipeline import repository
from b24sync.core.pipeline.schemas import (
    BitrixRequests,
    JobCounts,
    PipelineSnapshot,
    RecentFailure,
)
from b24sync.core.sync.service import sync_overview_service
from b24sync.messaging import describe_url
from b24sync.settings import Settings

# How long reading Redis may take before the snapshot goes without it.
REDIS_WAIT_S = 2.0
# The seconds the request figures average over.
REQUESTS_WINDOW_S = 10
RECENT_FAILURES = 10
# BullMQ's states read, in its names; prioritized jobs wait too.
_JOB_STATES = ("waiting", "prioritized", "active", "delayed", "failed")


class QueueReader:
    """A Redis connection of its own for reading the Bitrix service's figures: its queue through
    BullMQ and its request counters. Fails fast, without retrying, when Redis is away."""

    def __init__(self, settings: Settings) -> None:
        self._url = settings.redis_url
        self._redis = Redis.from_url(
            settings.redis_url,
            decode_responses=True,
            socket_connect_timeout=REDIS_WAIT_S,
            socket_timeout=REDIS_WAIT_S,
            retry=Retry(NoBackoff(), 0),
        )
        self._queue = Queue(
            settings.bullmq_queue, {"connection": self._redis, "prefix": settings.bullmq_prefix}
        )
        self._stats = RequestStats(self._redis, key_prefix(settings))

    async def read(self) -> tuple[JobCounts, list[int], list[int]]:
        """The queue's counts, and the requests and limit answers of the last seconds."""
        counts: dict[str, Any] = await self._queue.getJobCounts(*_JOB_STATES)
        figures = await self._stats.read(REQUESTS_WINDOW_S)
        jobs = JobCounts(
            waiting=int(counts["waiting"]) + int(counts["prioritized"]),
            active=int(counts["active"]),
            delayed=int(counts["delayed"]),
            failed=int(counts["failed"]),
        )
        return jobs, figures.requests, figures.limit_answers

    def describe_failure(self, exc: BaseException) -> str:
        # The exception's own text may hold the URL; its kind and the host say enough.
        reason = "no answer in time" if isinstance(exc, TimeoutError) else type(exc).__name__
        return f"Redis at {describe_url(self._url)} cannot be read ({reason})"

    async def aclose(self) -> None:
        await self._queue.close()


class PipelineService:
    async def snapshot(
        self, session: AsyncSession, settings: Settings, reader: QueueReader
    ) -> PipelineSnapshot:
        overview = await sync_overview_service.overview(session)
        failures = await repository.recent_failures(session, RECENT_FAILURES)
        queue: JobCounts | None = None
        bitrix: BitrixRequests | None = None
        redis_error: str | None = None
        try:
            queue, requests, limits = await asyncio.wait_for(reader.read(), REDIS_WAIT_S)
        except (RedisError, OSError, TimeoutError) as exc:
            redis_error = reader.describe_failure(exc)
        else:
            bucket = settings.bitrix_bucket
            bitrix = BitrixRequests(
                plan=settings.bitrix_plan,
                ceiling_per_s=bucket[1] if bucket else None,
                burst=bucket[0] if bucket else None,
                window_s=len(requests),
                requests_per_s=round(sum(requests) / len(requests), 2),
                per_second=requests,
                limit_answers=sum(limits),
            )
        return PipelineSnapshot(
            taken_at=datetime.now(UTC),
            sync=overview,
            queue_name=settings.bullmq_queue,
            queue=queue,
            bitrix=bitrix,
            redis_error=redis_error,
            recent_failures=[
                RecentFailure(
                    user_id=user.id,
                    full_name=user.full_name,
                    reason=user.sync_error,
                    code=user.sync_error_code,
                    retryable=user.sync_retryable,
                    attempts=user.sync_attempts,
                    retries=user.sync_retries,
                    failed_at=user.sync_failed_at,
                    next_retry_at=user.next_sync_at,
                )
                for user in failures
            ],
        )


pipeline_service = PipelineService()
