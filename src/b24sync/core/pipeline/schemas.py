"""What `GET /sync/pipeline` answers."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from b24sync.core.sync.schemas import SyncOverview


class JobCounts(BaseModel):
    """The Bitrix service's BullMQ queue. A job carries the events that reached the service
    together, up to RABBITMQ_PREFETCH of them."""

    waiting: int = Field(description="jobs waiting for a worker")
    active: int = Field(description="jobs a worker holds")
    delayed: int = Field(description="jobs waiting out a retry's backoff")
    failed: int = Field(description="jobs that spent their attempts (kept: JOB_REMOVE_ON_FAIL)")


class BitrixRequests(BaseModel):
    """Requests to Bitrix24 of every Bitrix service process, as they count them in Redis."""

    plan: str = Field(description="BITRIX_PLAN")
    ceiling_per_s: float | None = Field(description="the plan's requests a second; None: none")
    burst: int | None = Field(description="the plan's burst")
    window_s: int = Field(description="the whole seconds the figures cover")
    requests_per_s: float = Field(description="average over the window")
    per_second: list[int] = Field(description="requests in each second, oldest first")
    limit_answers: int = Field(
        description="limit answers (QUERY_LIMIT_EXCEEDED, OPERATION_TIME_LIMIT) in the window, "
        "each waited out before its commands went again"
    )


class RecentFailure(BaseModel):
    user_id: int
    full_name: str
    reason: str | None = Field(description="the last failure's reason")
    code: str | None = Field(description="its Bitrix24 or service code")
    retryable: bool | None = Field(description="whether Core sends the user again by itself")
    attempts: int = Field(description="attempts the Bitrix service made")
    retries: int = Field(description="times Core sent the user again since its last change")
    failed_at: datetime | None
    next_retry_at: datetime | None


class PipelineSnapshot(BaseModel):
    taken_at: datetime
    sync: SyncOverview
    queue_name: str
    queue: JobCounts | None = Field(description="None when Redis cannot be read")
    bitrix: BitrixRequests | None = Field(description="None when Redis cannot be read")
    redis_error: str | None = Field(description="why Redis could not be read")
    recent_failures: list[RecentFailure] = Field(description="the latest failed users first")
