"""What `GET /sync` answers: how far Bitrix24 is behind Core, at a glance."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from b24sync.contracts import MAX_ID

UserId = Annotated[int, Field(ge=1, le=MAX_ID)]
# Ids named in one request; larger sets go by status or all at once.
MAX_NAMED_USERS = 1000


class UserSyncCounts(BaseModel):
    total: int
    pending: int = Field(description="changed, no answer from the Bitrix service yet")
    synced: int
    failed: int = Field(description="the Bitrix service answered with an error")


class FailedUsers(BaseModel):
    retrying: int = Field(description="failed for a transient reason: Core sends them again")
    permanent: int = Field(
        description="failed for a reason no retry cures: they wait for a change or a resync"
    )
    next_retry_in_s: float | None = Field(
        description="seconds until the next retry is due (negative when overdue)"
    )


class OutboxBacklog(BaseModel):
    unpublished: int = Field(description="events committed but not yet confirmed by RabbitMQ")
    oldest_unpublished_s: float | None = Field(description="age of the oldest of them")


class SyncOverview(BaseModel):
    users: UserSyncCounts
    failed: FailedUsers
    oldest_pending_s: float | None = Field(
        description="seconds since the least recently changed pending user changed"
    )
    outbox: OutboxBacklog


class ResyncRequest(BaseModel):
    """Which users to send again: named ones, the failed ones, or all."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"user_ids": [1, 2]}, {"status": "failed"}, {"all": True}]},
    )

    user_ids: list[UserId] | None = Field(default=None, min_length=1, max_length=MAX_NAMED_USERS)
    status: Literal["failed"] | None = None
    all: bool = False
    force: bool = Field(
        default=False,
        description="every field, applied even over a version the Bitrix service holds as newer",
    )

    @model_validator(mode="after")
    def _one_selection(self) -> ResyncRequest:
        chosen = [self.user_ids is not None, self.status is not None, self.all]
        if sum(chosen) != 1:
            raise ValueError('name the users by exactly one of "user_ids", "status", "all"')
        return self


class ResyncResult(BaseModel):
    resent: int = Field(description="users sent again (ids of no user are passed over)")
