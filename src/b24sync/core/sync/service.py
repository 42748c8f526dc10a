"""Bitrix replies applied to the users' sync state, and users sent again (Core's retries,
resyncs, restatements).

A reply is first tied to the event it answers (the rule is written down in
docs/architecture.md): by its correlation id, which is the event's id; without one, or with
one Core does not know, to the user's oldest event that went out and has no answer yet, with
the reply's action and the reply's version when it names them. The event's version is the one
the reply is about. Then:

- a success (not skipped) marks the user synced when it is about the user's latest version;
  about an older one it records how far Bitrix24 got and fills an unknown lead id;
- a skipped success proves nothing about the lead; when the Bitrix service says it applied a
  version Core never had (forged or foreign), Core restates the whole user with ``force``;
- an error about the latest version, unless already synced, marks the user failed: a transient one
  with the next retry time (a growing delay), a permanent one until the user changes or is
  resynced. Errors about older versions change nothing: a newer event carries their fields;
- a reply tied to no event never marks a version synced nor replaces a known lead id (it may
  fill an unknown one);
- an event's answer is recorded once per kind: the same reply again changes nothing, and a
  success is never overwritten.

A success also tells that the portal works: retries waiting for users that failed before its
event went out are brought forward (a bounded number per success).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import timedelta
from enum import StrEnum
from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncSession

from b24sync.contracts import Action, Pattern, ReplyData, ReplyStatus
from b24sync.core.db import InSession
from b24sync.core.models import AnswerStatus, SyncStatus, User
from b24sync.core.outbox import repository as outbox_repository
from b24sync.core.outbox.repository import AnsweredEvent
from b24sync.core.outbox.service import outbox_service
from b24sync.core.sync.schemas import FailedUsers, OutboxBacklog, SyncOverview, UserSyncCounts
from b24sync.core.users.repository import (
    FRESH_SYNC_STATE,
    Answer,
    DatabaseNow,
    PullRetries,
    UserRepository,
)
from b24sync.settings import Settings

UNKNOWN_ERROR = "Bitrix service reported an error without a reason"
# Reasons of the seed's own Bitrix service, which does not say whether an error is worth a
# retry: these are its validation errors (no retry can cure them); anything else is taken to
# be transient.
PERMANENT_REASONS = frozenset({"Missing phone number"})
# Each retry's delay is spread by up to this share either way, so users that failed together
# do not come back together.
RETRY_JITTER = 0.2
# Users read, locked and sent again together by a resync of many.
RESYNC_PAGE_SIZE = 500
PATTERN_BY_ACTION = {
    Action.CREATE_CARD: Pattern.USER_CREATED,
    Action.UPDATE_CARD: Pattern.USER_UPDATED,
    Action.MOVE_CARD: Pattern.USER_MOVED,
}


class Outcome(StrEnum):
    APPLIED = "applied"  # the user's sync state changed
    UNCHANGED = "unchanged"  # the event's answer was recorded; nothing left to learn from it
    DUPLICATE = "duplicate"  # the event already had this answer (or a success)
    RESTATED = "restated"  # the lead holds a version Core never had: the user is sent again
    UNTIED = "untied"  # about no event Core sent, and nothing to learn from it
    UNKNOWN_USER = "unknown_user"
    FUTURE_VERSION = "future_version"


def is_retryable(reply: ReplyData) -> bool:
    """Whether sending the same change again may succeed; the sender's word when it gives it."""
    if reply.retryable is not None:
        return reply.retryable
    return (reply.reason or "").strip() not in PERMANENT_REASONS


def retry_delay_s(settings: Settings, retries: int) -> float:
    """The wait before Core's next retry of a user it already retried `retries` times."""
    delay = min(settings.sync_retry_max_s, settings.sync_retry_initial_s * 2.0 ** min(retries, 30))
    return delay * (1 + RETRY_JITTER * random.uniform(-1, 1))


def answer_status(reply: ReplyData) -> AnswerStatus:
    if reply.status is ReplyStatus.ERROR:
        return AnswerStatus.ERROR
    return AnswerStatus.SKIPPED if reply.skipped else AnswerStatus.SUCCESS


def _event_id(correlation_id: str | None) -> UUID | None:
    """The event a correlation id names (Core's event ids are UUIDs); None for anything else."""
    try:
        return UUID(correlation_id) if correlation_id else None
    except ValueError:
        return None


def _clean(text: str) -> str:
    # PostgreSQL's text cannot hold NUL, whatever Bitrix24 put in its message.
    return text.replace("\x00", "")


class ReplyService:
    async def apply(
        self,
        session: AsyncSession,
        settings: Settings,
        reply: ReplyData,
        *,
        correlation_id: str | None = None,
    ) -> Outcome:
        (outcome,) = await self.apply_many(session, settings, [(reply, correlation_id)])
        return outcome

    async def apply_many(
        self,
        session: AsyncSession,
        settings: Settings,
        replies: Sequence[tuple[ReplyData, str | None]],
    ) -> list[Outcome]:
        """Applies replies (each with its correlation id) in the order given. The users they
        name are locked and read in one statement, with the events named; a user named again
        is read again, after what the replies before taught."""
        repository = UserRepository(session)
        first: dict[int, UUID | None] = {}
        for reply, correlation_id in replies:
            first.setdefault(reply.target_user_id, _event_id(correlation_id))
        found = await repository.get_with_events(list(first.items()))
        outcomes = []
        read: set[int] = set()
        for reply, correlation_id in replies:
            user_id = reply.target_user_id
            if user_id in read:
                again = await repository.get_with_events([(user_id, _event_id(correlation_id))])
                found[user_id] = again[user_id]  # locked: it still exists
            read.add(user_id)
            outcomes.append(await self._apply(session, settings, reply, found.get(user_id)))
        return outcomes

    async def _apply(
        self,
        session: AsyncSession,
        settings: Settings,
        reply: ReplyData,
        found: tuple[User, AnsweredEvent | None] | None,
    ) -> Outcome:
        if found is None:
            return Outcome.UNKNOWN_USER
        user, event = found
        if event is None:
            # Tied by the rule for replies without a (known) correlation id.
            pattern = PATTERN_BY_ACTION[reply.action] if reply.action is not None else None
            event = await outbox_repository.oldest_unanswered(
                session, user.id, pattern, reply.version
            )
        if event is None:
            return await self._apply_untied(session, settings, user, reply)
        status = answer_status(reply)
        if event.answer_status in (status.value, AnswerStatus.SUCCESS.value):
            return Outcome.DUPLICATE
        reason = _clean(reply.reason) if reply.reason is not None else None
        answer = Answer(event.id, status, reason)
        if status is AnswerStatus.SKIPPED:
            return await self._apply_skipped(session, settings, user, reply, answer)
        if status is AnswerStatus.SUCCESS:
            values = self._success(user, reply, event.version)
            # The portal took this event: retries waiting since before it went out may pass.
            pull = PullRetries(event.published_at, settings.sync_retry_batch)
            return await self._update(session, settings, user, values, answer, pull)
        values = self._error(settings, user, reply, event)
        return await self._update(session, settings, user, values, answer)

    def _success(self, user: User, reply: ReplyData, version: int) -> dict[str, Any]:
        latest = version == user.version
        values: dict[str, Any] = {}
        if reply.bitrix_lead_id is not None and (user.bitrix_lead_id is None or latest):
            values["bitrix_lead_id"] = reply.bitrix_lead_id
        if user.synced_version is None or version > user.synced_version:
            values["synced_version"] = version
        if latest:
            attempts = reply.attempts if reply.attempts is not None else user.sync_attempts
            values.update(
                FRESH_SYNC_STATE,
                sync_status=SyncStatus.SYNCED.value,
                sync_attempts=attempts,
                sync_force=False,
            )
        return values

    def _error(
        self, settings: Settings, user: User, reply: ReplyData, event: AnsweredEvent
    ) -> dict[str, Any]:
        # In hold mode the user's later changes wait for the create's lead id: a failed
        # create fails them all.
        holds_back = (
            settings.hold_until_lead_id
            and event.pattern is Pattern.USER_CREATED
            and user.bitrix_lead_id is None
        )
        about_latest = event.version == user.version or holds_back
        # Once synced, the latest version is written: another event's failure undoes nothing.
        if not about_latest or user.sync_status == SyncStatus.SYNCED.value:
            return {}
        retryable = is_retryable(reply)
        values: dict[str, Any] = {
            "sync_status": SyncStatus.FAILED.value,
            "sync_error": _clean(reply.reason or UNKNOWN_ERROR),
            "sync_error_code": _clean(reply.error_code) if reply.error_code else None,
            "sync_retryable": retryable,
            "sync_attempts": reply.attempts if reply.attempts is not None else user.sync_attempts,
            "sync_failed_at": DatabaseNow(),
            "next_sync_at": None,
        }
        if retryable and settings.sync_retry_initial_s > 0:
            delay = timedelta(seconds=retry_delay_s(settings, user.sync_retries))
            values["next_sync_at"] = DatabaseNow(delay)
        return values

    async def _apply_skipped(
        self,
        session: AsyncSession,
        settings: Settings,
        user: User,
        reply: ReplyData,
        answer: Answer | None = None,
    ) -> Outcome:
        if reply.applied_version is not None and reply.applied_version > user.version:
            await self._update(session, settings, user, {}, answer)  # the answer alone
            if user.sync_force:
                return Outcome.UNCHANGED  # a restatement is already on its way
            await resync_service.resync(session, settings, [user.id], force=True)
            return Outcome.RESTATED
        values = {}
        if reply.bitrix_lead_id is not None and user.bitrix_lead_id is None:
            values["bitrix_lead_id"] = reply.bitrix_lead_id
        return await self._update(session, settings, user, values, answer)

    async def _apply_untied(
        self, session: AsyncSession, settings: Settings, user: User, reply: ReplyData
    ) -> Outcome:
        if reply.version is not None and reply.version > user.version:
            # Cannot be about this database's user (restored backup, foreign producer).
            return Outcome.FUTURE_VERSION
        if reply.status is ReplyStatus.SUCCESS and reply.skipped:
            return await self._apply_skipped(session, settings, user, reply)
        if (
            reply.status is ReplyStatus.SUCCESS
            and reply.bitrix_lead_id is not None
            and user.bitrix_lead_id is None
        ):
            return await self._update(
                session, settings, user, {"bitrix_lead_id": reply.bitrix_lead_id}
            )
        return Outcome.UNTIED

    async def _update(
        self,
        session: AsyncSession,
        settings: Settings,
        user: User,
        values: dict[str, Any],
        answer: Answer | None = None,
        pull_retries: PullRetries | None = None,
    ) -> Outcome:
        """Writes what changed of `values`, with the event's answer and the retries to pull
        forward, in one statement; APPLIED when the user's sync state changed."""
        # A value computed by the database (now()) always counts as a change.
        values = {
            key: value
            for key, value in values.items()
            if isinstance(value, DatabaseNow) or getattr(user, key) != value
        }
        if "synced_version" in values:
            values["synced_at"] = DatabaseNow()
        if values or answer is not None or pull_retries is not None:
            pulled = await UserRepository(session).record_reply(
                user.id, values, answer=answer, pull_retries=pull_retries
            )
            # The user's held-back updates and moves can go now.
            releases_held = (
                settings.hold_until_lead_id
                and user.bitrix_lead_id is None
                and values.get("bitrix_lead_id")
            )
            if pulled or releases_held:
                await outbox_repository.wake_relay(session)
        return Outcome.APPLIED if values else Outcome.UNCHANGED


reply_service = ReplyService()


class ResyncService:
    async def resync(
        self,
        session: AsyncSession,
        settings: Settings,
        user_ids: Sequence[int],
        *,
        force: bool = False,
    ) -> int:
        """Sends the users again as they are now and makes them pending; returns how many
        were sent (ids of no user are passed over).

        Each gets a new event: a create while its lead id is unknown, an update otherwise,
        of its current version, carrying the fields changed since the version Bitrix24 last
        confirmed; with `force`, every field, applied by the Bitrix service even over a version
        it holds as newer (and so every later event until one is written)."""
        return await self._send_again(session, settings, user_ids, force=force, retry=False)

    async def resync_page(
        self,
        session: AsyncSession,
        settings: Settings,
        *,
        after_id: int,
        only: SyncStatus | None = None,
        force: bool = False,
    ) -> Sequence[int]:
        """Resyncs the next page of users (of status `only` when given) after id `after_id`;
        returns their ids in order, none when no user was left."""
        user_ids = await UserRepository(session).page_of_ids(
            after_id, RESYNC_PAGE_SIZE, sync_status=only
        )
        await self.resync(session, settings, user_ids, force=force)
        return user_ids

    async def resync_all(
        self,
        session: AsyncSession,
        settings: Settings,
        *,
        only: SyncStatus | None = None,
        force: bool = False,
    ) -> int:
        """Resyncs every user (of status `only` when given), page by page, in the caller's
        transaction; returns how many were sent."""
        total, after_id = 0, 0
        while user_ids := await self.resync_page(
            session, settings, after_id=after_id, only=only, force=force
        ):
            total, after_id = total + len(user_ids), user_ids[-1]
        return total

    async def retry_due(self, session: AsyncSession, settings: Settings, *, probe: bool) -> int:
        """One pass of Core's retries: up to `sync_retry_batch` users whose retry is due are
        sent again, the same way as a resync. With `probe` and none due, the earliest waiting
        one goes at once: its answer tells whether the portal is back. The caller holds the
        relay lock. Returns how many users were sent."""
        repository = UserRepository(session)
        user_ids = await repository.lock_retries(settings.sync_retry_batch)
        if not user_ids and probe:
            user_ids = await repository.lock_retries(1, due=False)
        return await self._send_again(session, settings, user_ids, force=False, retry=True)

    async def _send_again(
        self,
        session: AsyncSession,
        settings: Settings,
        user_ids: Sequence[int],
        *,
        force: bool,
        retry: bool,
    ) -> int:
        if not user_ids:
            return 0
        repository = UserRepository(session)
        users = await repository.lock_many(user_ids)
        changes = [
            (user, Pattern.USER_CREATED if user.bitrix_lead_id is None else Pattern.USER_UPDATED)
            for user in users
        ]
        creates = [user.id for user, pattern in changes if pattern is Pattern.USER_CREATED]
        if settings.hold_until_lead_id and creates:
            await outbox_service.supersede_held(InSession(session), creates)
        await outbox_service.record(
            InSession(session), changes, settings.rabbitmq_reply_queue, force=force
        )
        await repository.mark_sent_again([user.id for user in users], retry=retry, force=force)
        return len(users)


resync_service = ResyncService()


class SyncOverviewService:
    async def overview(self, session: AsyncSession) -> SyncOverview:
        repository = UserRepository(session)
        by_status = await repository.count_by_sync_status()
        counts = {status.value: by_status.get(status.value, (0, None))[0] for status in SyncStatus}
        retrying, permanent, next_retry_in_s = await repository.failures()
        unpublished, oldest_unpublished_s = await outbox_repository.backlog(session)
        return SyncOverview(
            users=UserSyncCounts(total=sum(counts.values()), **counts),
            failed=FailedUsers(
                retrying=retrying, permanent=permanent, next_retry_in_s=next_retry_in_s
            ),
            oldest_pending_s=by_status.get(SyncStatus.PENDING.value, (0, None))[1],
            outbox=OutboxBacklog(
                unpublished=unpublished, oldest_unpublished_s=oldest_unpublished_s
            ),
        )


sync_overview_service = SyncOverviewService()
