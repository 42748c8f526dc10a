"""All SQL on the users table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from b24sync.core.models import SyncStatus, User
from b24sync.core.outbox.repository import NOTIFY_CHANNEL
from b24sync.core.outbox.service import EventDraft

_USER_COLUMNS = [column.name for column in User.__table__.columns]
_INSERT_WITH_EVENT = text(
    "WITH new_user AS ("
    " INSERT INTO users (full_name, phone, stage) VALUES (:full_name, :phone, :stage)"
    " RETURNING *"
    "), event AS ("
    " INSERT INTO outbox_events (id, user_id, pattern, body)"
    " SELECT :event_id, id, :pattern, jsonb_set(:body, '{data,user,id}', to_jsonb(id))"
    " FROM new_user RETURNING user_id"
    ") SELECT new_user.*, pg_notify(:channel, '') FROM new_user"
    " JOIN event ON event.user_id = new_user.id"
).bindparams(bindparam("body", type_=JSONB))


class UserRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def create(self, *, full_name: str, phone: str, stage: str, event: EventDraft) -> User:
        """Inserts the user and its ``user_created`` event in one statement (one round trip on
        the hottest path). The event body is built by the contracts model; only the user id,
        assigned by this very insert, is written into it by the database."""
        row = (
            await self.session.execute(
                _INSERT_WITH_EVENT,
                {
                    "full_name": full_name,
                    "phone": phone,
                    "stage": stage,
                    "event_id": event.id,
                    "pattern": event.pattern.value,
                    "body": event.body,
                    "channel": NOTIFY_CHANNEL,
                },
            )
        ).one()
        return User(**{column: getattr(row, column) for column in _USER_COLUMNS})

    async def get(self, user_id: int, *, for_update: bool = False) -> User | None:
        statement = select(User).where(User.id == user_id)
        if for_update:
            # Serialises a user's changes, so its events reach the outbox in commit order.
            statement = statement.with_for_update()
        result = await self.session.scalars(
            statement, execution_options={"populate_existing": True}
        )
        return result.one_or_none()

    async def update_fields(self, user_id: int, values: dict[str, Any]) -> User:
        """Applies a change made through the API: bumps the version, resets the sync state."""
        statement = (
            update(User)
            .where(User.id == user_id)
            .values(
                **values,
                version=User.version + 1,
                sync_status=SyncStatus.PENDING.value,
                sync_error=None,
                sync_attempts=0,
                updated_at=func.now(),
            )
            .returning(User)
        )
        result = await self.session.scalars(
            statement, execution_options={"populate_existing": True}
        )
        return result.one()

    async def update_sync_state(self, user_id: int, values: dict[str, Any]) -> None:
        """Records what Bitrix24 answered; never touches the user's own data or version."""
        await self.session.execute(update(User).where(User.id == user_id).values(**values))

    async def list(
        self, *, stage: str | None, sync_status: str | None, limit: int, offset: int
    ) -> tuple[Sequence[User], int]:
        filters = []
        if stage is not None:
            filters.append(User.stage == stage)
        if sync_status is not None:
            filters.append(User.sync_status == sync_status)
        total = await self.session.scalar(select(func.count()).select_from(User).where(*filters))
        rows = await self.session.scalars(
            select(User).where(*filters).order_by(User.id).limit(limit).offset(offset)
        )
        return rows.all(), total or 0
