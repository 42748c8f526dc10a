"""All SQL on the outbox_events table but for three statements of the users repository that
write a user and its events together: a new user and its first event (`create_many`: the
event needs the id that insert assigns), a group of changes (`change_users`, built from this
module's `inserted_events` and `superseding_held`), and a reply's event read and answered with
its user's sync state (`get_with_events`, `record_reply`: few round trips on the reply path)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from sqlalchemy import (
    CTE,
    BigInteger,
    ColumnElement,
    Integer,
    Select,
    Table,
    Text,
    Update,
    Uuid,
    any_,
    bindparam,
    exists,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from b24sync.contracts import Pattern
from b24sync.core.db import Statements, driver_of
from b24sync.core.models import AnswerStatus, OutboxEvent

if TYPE_CHECKING:
    from b24sync.core.outbox.service import EventDraft

# Channel the write transactions NOTIFY and the relays LISTEN on.
NOTIFY_CHANNEL = "b24sync_outbox"
# Held per batch transaction: one relay publishes at a time, so events leave in seq order.
RELAY_LOCK_KEY = 0x6232_3473_796E_63  # "b24sync"

Driver = Any  # an asyncpg connection (asyncpg has no type hints)

_OUTBOX = cast(Table, OutboxEvent.__table__)
# New events, as bound by `event_parameters`, numbered in the order given.
_NEW_EVENTS = (
    func.unnest(
        bindparam("event_ids", type_=ARRAY(Uuid)),
        bindparam("event_user_ids", type_=ARRAY(BigInteger)),
        bindparam("event_patterns", type_=ARRAY(Text)),
        bindparam("event_versions", type_=ARRAY(Integer)),
        bindparam("event_bodies", type_=ARRAY(Text)),
    )
    .table_valued("id", "user_id", "pattern", "version", "body", with_ordinality="position")
    .render_derived(name="new_event")
)


def event_parameters(events: Sequence[tuple[int, EventDraft]]) -> dict[str, Any]:
    """The parameters of `inserted_events` for each user's event, in the order given."""
    return {
        "event_ids": [draft.id for _, draft in events],
        "event_user_ids": [user_id for user_id, _ in events],
        "event_patterns": [draft.pattern.value for _, draft in events],
        "event_versions": [draft.version for _, draft in events],
        "event_bodies": [json.dumps(draft.body, ensure_ascii=False) for _, draft in events],
    }


def inserted_events(of_users: Select[Any] | None = None) -> CTE:
    """A CTE that inserts the events of `event_parameters` in the order given (with
    `of_users`, a query of user ids, only theirs), returning their ids."""
    rows = select(
        _NEW_EVENTS.c.id,
        _NEW_EVENTS.c.user_id,
        _NEW_EVENTS.c.pattern,
        _NEW_EVENTS.c.version,
        _NEW_EVENTS.c.body.cast(JSONB),
    ).order_by(_NEW_EVENTS.c.position)
    if of_users is not None:
        rows = rows.where(_NEW_EVENTS.c.user_id.in_(of_users))
    return (
        insert(_OUTBOX)
        .from_select(["id", "user_id", "pattern", "version", "body"], rows, include_defaults=False)
        .returning(_OUTBOX.c.id)
        .cte("events")
    )


# Wakes the relays. NOTIFY is delivered only on commit, so a relay never wakes up for an event
# it cannot see yet.
WAKE_RELAYS = func.pg_notify(bindparam("channel", NOTIFY_CHANNEL), "")


def superseding_held(of_users: ColumnElement[bool]) -> Update:
    """Marks as superseded (never sent) the updates and moves that never went out of the
    users `of_users` (a condition on `OutboxEvent.user_id`).

    Neither sent nor answered, tested in a form the index of pending events cannot serve: a
    few users' events are found by user, never by a scan of every event waiting to go out,
    whatever the statistics say (and whether the plan is generic or made for the values)."""
    return (
        update(OutboxEvent)
        .where(
            of_users,
            func.coalesce(OutboxEvent.published_at, OutboxEvent.answered_at).is_(None),
            OutboxEvent.resends == 0,
            OutboxEvent.pattern != Pattern.USER_CREATED.value,
        )
        .values(
            answered_at=text("now()"),
            answer_status=AnswerStatus.SUPERSEDED.value,
            answer_reason="never sent: a create carrying its change took its place",
        )
    )


_WAKE = select(WAKE_RELAYS)
# One round trip: the event rows, in the order given, and one wake-up call.
_INSERT_AND_NOTIFY = select(WAKE_RELAYS).where(exists(select(inserted_events().c.id)))
_SUPERSEDE_HELD = superseding_held(
    OutboxEvent.user_id == any_(bindparam("user_ids", type_=ARRAY(BigInteger)))
)


@dataclass(frozen=True, slots=True)
class PendingEvent:
    id: UUID
    seq: int
    user_id: int
    body: dict[str, Any]
    # The user's lead id when the event was claimed: the one the event goes out with.
    bitrix_lead_id: int | None = None


async def add(statements: Statements, events: Sequence[tuple[int, EventDraft]]) -> None:
    """Inserts each user's event, in the order given, and wakes the relay."""
    if events:
        await statements.rows(_INSERT_AND_NOTIFY, event_parameters(events))


async def wake_relay(session: AsyncSession) -> None:
    """Wakes the relay when the transaction commits (something became ready to send)."""
    await session.execute(_WAKE)


async def try_relay_lock(session: AsyncSession) -> bool:
    """Takes the relay lock for the rest of the transaction, unless another relay holds it."""
    taken = await session.scalar(
        text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": RELAY_LOCK_KEY}
    )
    return bool(taken)


async def supersede_held(statements: Statements, user_ids: Sequence[int]) -> None:
    """Marks the users' updates and moves that never went out as superseded: never sent."""
    await statements.rows(_SUPERSEDE_HELD, {"user_ids": list(user_ids)})


@dataclass(frozen=True, slots=True)
class AnsweredEvent:
    """An event as the reply rules need it."""

    id: UUID
    user_id: int
    pattern: Pattern
    version: int
    published_at: datetime | None
    answer_status: str | None


ANSWERED_EVENT_COLUMNS = (
    OutboxEvent.id,
    OutboxEvent.user_id,
    OutboxEvent.pattern,
    OutboxEvent.version,
    OutboxEvent.published_at,
    OutboxEvent.answer_status,
)


def answered_event(row: Sequence[Any]) -> AnsweredEvent:
    """The event from a row of `ANSWERED_EVENT_COLUMNS`, in that order."""
    event_id, user_id, pattern, version, published_at, status = row
    return AnsweredEvent(
        id=event_id,
        user_id=user_id,
        pattern=Pattern(pattern),
        version=version,
        published_at=published_at,
        answer_status=status,
    )


# Built once: on the reply path, building a statement cost more CPU than running it. The
# answer's UPDATE is on the table: the ORM's bulk-update machinery cost more than the statement.
RECORD_ANSWER = (
    update(_OUTBOX)
    .where(_OUTBOX.c.id == bindparam("event_id"))
    .values(
        answered_at=text("now()"),
        answer_status=bindparam("new_status"),
        answer_reason=bindparam("new_reason"),
    )
)


async def oldest_unanswered(
    session: AsyncSession, user_id: int, pattern: Pattern | None, version: int | None
) -> AnsweredEvent | None:
    """The user's oldest event that went out and got no answer yet, of that pattern and
    version when given (the rule that ties a reply without a correlation id to an event).

    A reply can come back before the relay that sent its event has committed it as published:
    the user's unanswered events are locked first, which waits for such a relay, and the
    search that follows sees what it committed."""
    await session.execute(
        select(OutboxEvent.id)
        .where(OutboxEvent.user_id == user_id, OutboxEvent.answered_at.is_(None))
        .with_for_update()
    )
    statement = (
        select(*ANSWERED_EVENT_COLUMNS)
        .where(
            OutboxEvent.user_id == user_id,
            OutboxEvent.answered_at.is_(None),
            OutboxEvent.published_at.is_not(None) | (OutboxEvent.resends > 0),
        )
        .order_by(OutboxEvent.seq)
        .limit(1)
    )
    if pattern is not None:
        statement = statement.where(OutboxEvent.pattern == pattern.value)
    if version is not None:
        statement = statement.where(OutboxEvent.version == version)
    row = (await session.execute(statement)).one_or_none()
    return answered_event(row) if row is not None else None


async def history(session: AsyncSession, user_id: int, limit: int) -> Sequence[OutboxEvent]:
    """The user's latest `limit` events, newest first, with the answers they got."""
    statement = (
        select(OutboxEvent)
        .where(OutboxEvent.user_id == user_id)
        .order_by(OutboxEvent.seq.desc())
        .limit(limit)
    )
    return (await session.scalars(statement)).all()


def answer_parameters(event_id: UUID, status: AnswerStatus, reason: str | None) -> dict[str, Any]:
    """The values of `RECORD_ANSWER`'s parameters."""
    return {"event_id": event_id, "new_status": status.value, "new_reason": reason}


# The relay's statements go straight through the asyncpg driver (its prepared-statement cache):
# SQLAlchemy's per-statement work cost the relay more CPU than the statements themselves.

# The lock and the batch in one statement, the batch marked published in it too: the mark
# commits only with the transaction, which the relay commits once the broker has confirmed
# the messages (and before that, it unmarks those it could not publish). The lock is tried in
# a scalar subquery, which PostgreSQL evaluates once, before the scan, and uses as a one-time
# filter: while another relay holds the lock, no event is even read. The statement's snapshot
# predates the lock, so events the previous holder has just marked published may look pending
# to it: FOR UPDATE rechecks the latest version of each row against the WHERE clause and skips
# those.
# Each event goes out with its user's lead id as it is now, read in the same statement. With
# $3 (hold mode) an update or a move of a user whose lead id is not known yet stays in the
# outbox until the create's reply brings it; a user's later events are held with it.
_CLAIM_BATCH = (
    "WITH claimed AS ("
    " SELECT e.id, e.seq, e.user_id, e.body, u.bitrix_lead_id"
    " FROM outbox_events AS e JOIN users AS u ON u.id = e.user_id"
    " WHERE e.published_at IS NULL AND e.answered_at IS NULL"
    " AND (SELECT pg_try_advisory_xact_lock($1))"
    " AND (NOT $3::boolean OR e.pattern = 'user_created' OR u.bitrix_lead_id IS NOT NULL)"
    " ORDER BY e.seq LIMIT $2 FOR UPDATE OF e SKIP LOCKED"
    "), marked AS ("
    " UPDATE outbox_events SET published_at = clock_timestamp()"
    " FROM claimed WHERE outbox_events.id = claimed.id"
    ")"
    " SELECT id, seq, user_id, body::text AS body, bitrix_lead_id FROM claimed ORDER BY seq"
)
# One array parameter rather than IN (...): the same prepared statement whatever the batch size.
_UNMARK_PUBLISHED = "UPDATE outbox_events SET published_at = NULL WHERE id = ANY($1::uuid[])"


# A user's latest event that went out, when it got no answer long enough after it was
# published, is marked unpublished again: the relay sends it once more with the same
# message_id. The wait doubles with every resend, up to a day. An older unanswered event is
# left alone: the later one carries its changes. Under the relay lock, so one relay does it at
# a time.
_REQUEUE_UNANSWERED = """
UPDATE outbox_events SET published_at = NULL, resends = resends + 1
WHERE id IN (
    SELECT e.id FROM outbox_events AS e
    WHERE e.answered_at IS NULL
      AND e.published_at < now() - make_interval(secs => $2)
      AND e.published_at < now() - make_interval(secs => least($2 * power(2, e.resends), 86400))
      AND NOT EXISTS (
          SELECT FROM outbox_events AS later
          WHERE later.user_id = e.user_id AND later.seq > e.seq
            AND (later.published_at IS NOT NULL OR later.resends > 0)
      )
      AND (SELECT pg_try_advisory_xact_lock($1))
    LIMIT $3
)
"""


@asynccontextmanager
async def relay_transaction(engine: AsyncEngine) -> AsyncIterator[Driver]:
    """A transaction on a pooled connection's asyncpg driver, committed when the block exits
    without an error. A connection the database dropped is invalidated, never pooled again."""
    async with (
        engine.connect() as connection,
        driver_of(connection) as driver,
        driver.transaction(),
    ):
        yield driver


async def claim_batch(driver: Driver, limit: int, *, hold: bool = False) -> list[PendingEvent]:
    """Takes the relay lock and the first `limit` pending events in seq order, locked until
    the transaction ends and marked published when it commits (`unmark_published` takes the
    mark back from those that did not go out); none while another relay holds the lock (it
    publishes ours too). With `hold`, updates and moves of users without a lead id stay
    behind."""
    rows = await driver.fetch(_CLAIM_BATCH, RELAY_LOCK_KEY, limit, hold)
    return [
        PendingEvent(
            id=row[0], seq=row[1], user_id=row[2], body=json.loads(row[3]), bitrix_lead_id=row[4]
        )
        for row in rows
    ]


_BACKLOG = text(
    "SELECT count(*), extract(epoch FROM now() - min(created_at))"
    " FROM outbox_events WHERE published_at IS NULL AND answered_at IS NULL"
)


async def backlog(session: AsyncSession) -> tuple[int, float | None]:
    """Events not yet published, and the age in seconds of the oldest of them."""
    count, age = (await session.execute(_BACKLOG)).one()
    return int(count), float(age) if age is not None else None


async def requeue_unanswered(driver: Driver, after_s: float, limit: int) -> int:
    """Queues again up to `limit` events that got no answer within `after_s` (times 2 per
    earlier resend); returns how many."""
    status: str = await driver.execute(_REQUEUE_UNANSWERED, RELAY_LOCK_KEY, after_s, limit)
    return int(status.rsplit(" ", 1)[-1])  # "UPDATE <count>"


async def unmark_published(driver: Driver, event_ids: Sequence[UUID]) -> None:
    """Claimed events that did not go out stay pending."""
    if event_ids:
        await driver.execute(_UNMARK_PUBLISHED, event_ids)
