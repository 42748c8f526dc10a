"""Applying Bitrix replies to the users' sync state.

A reply names the user version it is about (``user.version``; replies from producers that do
not send it are taken to be about the current version). The rules keep the newest truth:

- a success for the current version marks the user synced;
- a success for an older version only records the lead id (when still unknown) and how far
  Bitrix24 got; the user stays pending, a newer event is on its way;
- an error counts only for the current version and never undoes a newer success;
- applying the same reply again changes nothing.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncSession

from b24sync.contracts import ReplyData, ReplyStatus
from b24sync.core.models import SyncStatus, User
from b24sync.core.outbox import repository as outbox_repository
from b24sync.core.sync.schemas import OutboxBacklog, SyncOverview, UserSyncCounts
from b24sync.core.users.repository import UserRepository

UNKNOWN_ERROR = "Bitrix service reported an error without a reason"


class Outcome(StrEnum):
    APPLIED = "applied"
    UNCHANGED = "unchanged"  # duplicate, or stale with nothing left to learn from it
    UNKNOWN_USER = "unknown_user"
    FUTURE_VERSION = "future_version"


def _changes(user: User, reply: ReplyData, version: int) -> dict[str, Any]:
    current = version == user.version
    newer_than_synced = user.synced_version is None or version > user.synced_version
    attempts = reply.attempts if reply.attempts is not None else user.sync_attempts
    values: dict[str, Any] = {}
    if reply.status is ReplyStatus.SUCCESS:
        if reply.bitrix_lead_id is not None and (user.bitrix_lead_id is None or current):
            values["bitrix_lead_id"] = reply.bitrix_lead_id
        if newer_than_synced:
            values["synced_version"] = version
            if current:
                values.update(
                    sync_status=SyncStatus.SYNCED.value, sync_error=None, sync_attempts=attempts
                )
    elif current and newer_than_synced:
        values.update(
            sync_status=SyncStatus.FAILED.value,
            # PostgreSQL's text cannot hold NUL, whatever Bitrix24 put in its message.
            sync_error=(reply.reason or UNKNOWN_ERROR).replace("\x00", ""),
            sync_attempts=attempts,
        )
    values = {key: value for key, value in values.items() if getattr(user, key) != value}
    if "synced_version" in values:
        values["synced_at"] = func.now()
    return values


class ReplyService:
    async def apply(self, session: AsyncSession, reply: ReplyData) -> Outcome:
        repository = UserRepository(session)
        user = await repository.get(reply.user.id, for_update=True)
        if user is None:
            return Outcome.UNKNOWN_USER
        version = reply.user.version or user.version
        if version > user.version:
            # Cannot be about this database's user (restored backup, foreign producer).
            return Outcome.FUTURE_VERSION
        values = _changes(user, reply, version)
        if not values:
            return Outcome.UNCHANGED
        await repository.update_sync_state(user.id, values)
        return Outcome.APPLIED


reply_service = ReplyService()


class SyncOverviewService:
    async def overview(self, session: AsyncSession) -> SyncOverview:
        by_status = await UserRepository(session).count_by_sync_status()
        counts = {status.value: by_status.get(status.value, (0, None))[0] for status in SyncStatus}
        unpublished, oldest_unpublished_s = await outbox_repository.backlog(session)
        return SyncOverview(
            users=UserSyncCounts(total=sum(counts.values()), **counts),
            oldest_pending_s=by_status.get(SyncStatus.PENDING.value, (0, None))[1],
            outbox=OutboxBacklog(
                unpublished=unpublished, oldest_unpublished_s=oldest_unpublished_s
            ),
        )


sync_overview_service = SyncOverviewService()
