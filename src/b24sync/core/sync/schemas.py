"""What `GET /sync` answers: how far Bitrix24 is behind Core, at a glance."""

from __future__ import annotations

from pydantic import BaseModel, Field


class UserSyncCounts(BaseModel):
    total: int
    pending: int = Field(description="changed, no answer from the Bitrix service yet")
    synced: int
    failed: int = Field(description="the Bitrix service answered with an error")


class OutboxBacklog(BaseModel):
    unpublished: int = Field(description="events committed but not yet confirmed by RabbitMQ")
    oldest_unpublished_s: float | None = Field(description="age of the oldest of them")


class SyncOverview(BaseModel):
    users: UserSyncCounts
    oldest_pending_s: float | None = Field(
        description="seconds since the least recently changed pending user changed"
    )
    outbox: OutboxBacklog
