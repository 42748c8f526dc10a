"""Recording events: the one place a user change becomes a message for the Bitrix service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

from sqlalchemy.ext.asyncio import AsyncSession

from b24sync.contracts import ACTION_BY_PATTERN, Event, EventData, Pattern, UserPayload
from b24sync.core.models import User
from b24sync.core.outbox import repository


def build_event(user: User, pattern: Pattern, reply_queue: str) -> Event:
    return Event(
        pattern=pattern,
        data=EventData(
            action=ACTION_BY_PATTERN[pattern],
            user=UserPayload(
                id=user.id,
                full_name=user.full_name,
                phone=user.phone,
                stage=user.stage,
                version=user.version,
                bitrix_lead_id=user.bitrix_lead_id,
            ),
            reply_queue=reply_queue,
        ),
    )


@dataclass(frozen=True, slots=True)
class EventDraft:
    id: UUID
    pattern: Pattern
    body: dict[str, Any]


class OutboxService:
    def draft(self, user: User, pattern: Pattern, reply_queue: str) -> EventDraft:
        return EventDraft(uuid4(), pattern, build_event(user, pattern, reply_queue).wire())

    async def record(
        self, session: AsyncSession, user: User, pattern: Pattern, reply_queue: str
    ) -> UUID:
        """Adds the event to the caller's transaction: it commits (or not) with the change."""
        event = self.draft(user, pattern, reply_queue)
        await repository.add(
            session, event_id=event.id, user_id=user.id, pattern=pattern.value, body=event.body
        )
        return event.id


outbox_service = OutboxService()
