"""All SQL on the outbox_events table but one statement: a new user and its first event are
inserted together by `UserRepository.create`, because the event needs the id that insert
assigns."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from b24sync.core.db import DRIVER_CONNECTION_ERRORS

# Channel the write transactions NOTIFY and the relays LISTEN on.
NOTIFY_CHANNEL = "b24sync_outbox"
# Held per batch transaction: one relay publishes at a time, so events leave in seq order.
RELAY_LOCK_KEY = 0x6232_3473_796E_63  # "b24sync"

Driver = Any  # an asyncpg connection (asyncpg has no type hints)

# One round trip: the event row and the wake-up call. NOTIFY is delivered only on commit, so
# a relay never wakes up for an event it cannot see yet.
_INSERT_AND_NOTIFY = text(
    "WITH event AS ("
    " INSERT INTO outbox_events (id, user_id, pattern, body)"
    " VALUES (:id, :user_id, :pattern, :body) RETURNING seq"
    ") SELECT pg_notify(:channel, '') FROM event"
).bindparams(bindparam("body", type_=JSONB), bindparam("channel", NOTIFY_CHANNEL))


@dataclass(frozen=True, slots=True)
class PendingEvent:
    id: UUID
    seq: int
    user_id: int
    body: dict[str, Any]


async def add(
    session: AsyncSession, *, event_id: UUID, user_id: int, pattern: str, body: dict[str, Any]
) -> None:
    await session.execute(
        _INSERT_AND_NOTIFY,
        {"id": event_id, "user_id": user_id, "pattern": pattern, "body": body},
    )


# The relay's statements go straight through the asyncpg driver (its prepared-statement cache):
# SQLAlchemy's per-statement work cost the relay more CPU than the statements themselves.

# The lock and the batch in one statement. The lock is tried in a scalar subquery, which
# PostgreSQL evaluates once, before the scan, and uses as a one-time filter: while another
# relay holds the lock, no event is even read. The statement's snapshot predates the lock, so
# events the previous holder has just marked published may look pending to it: FOR UPDATE
# rechecks the latest version of each row against the WHERE clause and skips those.
_CLAIM_BATCH = (
    "SELECT id, seq, user_id, body::text AS body FROM outbox_events"
    " WHERE published_at IS NULL AND (SELECT pg_try_advisory_xact_lock($1))"
    " ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED"
)
# One array parameter rather than IN (...): the same prepared statement whatever the batch size.
_MARK_PUBLISHED = (
    "UPDATE outbox_events SET published_at = clock_timestamp() WHERE id = ANY($1::uuid[])"
)


# The latest event of each user still waiting for an answer, published long enough ago, is
# marked unpublished again: the relay sends it once more with the same message_id. The wait
# doubles with every resend, up to a day. Under the relay lock, so one relay does it at a time.
_REQUEUE_UNANSWERED = """
UPDATE outbox_events SET published_at = NULL, resends = resends + 1
WHERE id IN (
    SELECT latest.id FROM users
    CROSS JOIN LATERAL (
        SELECT id, published_at, resends FROM outbox_events
        WHERE user_id = users.id ORDER BY seq DESC LIMIT 1
    ) AS latest
    WHERE users.sync_status = 'pending'
      AND latest.published_at
          < now() - make_interval(secs => least($2 * power(2, latest.resends), 86400))
      AND (SELECT pg_try_advisory_xact_lock($1))
    LIMIT $3
)
"""


@asynccontextmanager
async def relay_transaction(engine: AsyncEngine) -> AsyncIterator[Driver]:
    """A transaction on a pooled connection's asyncpg driver, committed when the block exits
    without an error. A connection the database dropped is invalidated, never pooled again."""
    async with engine.connect() as connection:
        driver = (await connection.get_raw_connection()).driver_connection
        assert driver is not None
        try:
            async with driver.transaction():
                yield driver
        except DRIVER_CONNECTION_ERRORS:
            await connection.invalidate()
            raise


async def claim_batch(driver: Driver, limit: int) -> list[PendingEvent]:
    """Takes the relay lock and the first `limit` pending events in seq order, locked until
    the transaction ends; none while another relay holds the lock (it publishes ours too)."""
    rows = await driver.fetch(_CLAIM_BATCH, RELAY_LOCK_KEY, limit)
    return [
        PendingEvent(id=row[0], seq=row[1], user_id=row[2], body=json.loads(row[3])) for row in rows
    ]


_BACKLOG = text(
    "SELECT count(*), extract(epoch FROM now() - min(created_at))"
    " FROM outbox_events WHERE published_at IS NULL"
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


async def mark_published(driver: Driver, event_ids: Sequence[UUID]) -> None:
    if event_ids:
        await driver.execute(_MARK_PUBLISHED, event_ids)
