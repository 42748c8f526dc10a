"""All SQL on the outbox_events table but one statement: a new user and its first event are
inserted together by `UserRepository.create`, because the event needs the id that insert
assigns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from sqlalchemy import Uuid, bindparam, select, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from b24sync.core.models import OutboxEvent

# Channel the write transactions NOTIFY and the relays LISTEN on.
NOTIFY_CHANNEL = "b24sync_outbox"
# Held per batch transaction: one relay publishes at a time, so events leave in seq order.
RELAY_LOCK_KEY = 0x6232_3473_796E_63  # "b24sync"

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


async def try_lock_relay(connection: AsyncConnection) -> bool:
    result = await connection.execute(
        text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": RELAY_LOCK_KEY}
    )
    return bool(result.scalar_one())


async def pending(connection: AsyncConnection, limit: int) -> list[PendingEvent]:
    statement = (
        select(OutboxEvent.id, OutboxEvent.seq, OutboxEvent.user_id, OutboxEvent.body)
        .where(OutboxEvent.published_at.is_(None))
        .order_by(OutboxEvent.seq)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = (await connection.execute(statement)).all()
    return [
        PendingEvent(id=row.id, seq=row.seq, user_id=row.user_id, body=row.body) for row in rows
    ]


# One array parameter rather than IN (...): the same prepared statement whatever the batch size.
_MARK_PUBLISHED = text(
    "UPDATE outbox_events SET published_at = clock_timestamp() WHERE id = ANY(:ids)"
).bindparams(bindparam("ids", type_=ARRAY(Uuid)))


async def mark_published(connection: AsyncConnection, event_ids: Sequence[UUID]) -> None:
    if event_ids:
        await connection.execute(_MARK_PUBLISHED, {"ids": list(event_ids)})
