"""All SQL on the users table."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from b24sync.core.db import DRIVER_CONNECTION_ERRORS
from b24sync.core.models import SyncStatus, User
from b24sync.core.outbox.repository import NOTIFY_CHANNEL
from b24sync.core.outbox.service import EventDraft

_USER_COLUMNS = [column.name for column in User.__table__.columns]
# The user, its event and the relay's wake-up in one statement, sent straight through the
# driver (asyncpg's prepared-statement cache): the hottest path skips SQLAlchemy's statement
# execution, which cost more CPU than the round trip itself. NOTIFY is delivered on commit only.
_INSERT_WITH_EVENT = (
    "WITH new_user AS ("
    " INSERT INTO users (full_name, phone, stage) VALUES ($1, $2, $3)"
    " RETURNING *"
    "), event AS ("
    " INSERT INTO outbox_events (id, user_id, pattern, body)"
    " SELECT $4, id, $5, jsonb_set($6::jsonb, '{data,user,id}', to_jsonb(id))"
    " FROM new_user RETURNING user_id"
    ") SELECT new_user.*, pg_notify($7, '') FROM new_user"
    " JOIN event ON event.user_id = new_user.id"
)


class UserRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def create(self, *, full_name: str, phone: str, stage: str, event: EventDraft) -> User:
        """Inserts the user and its ``user_created`` event in one statement (one round trip on
        the hottest path). The event body is built by the contracts model; only the user id,
        assigned by this very insert, is written into it by the database.

        The statement runs on the session's connection, so inside the session's transaction
        when one is open; otherwise it is a transaction of its own, and the session's commit
        has nothing left to send. A single statement is atomic either way: the user, its
        event and the NOTIFY are committed together or not at all.
        """
        connection = await self.session.connection()
        driver = (await connection.get_raw_connection()).driver_connection
        assert driver is not None
        try:
            row = await driver.fetchrow(
                _INSERT_WITH_EVENT,
                full_name,
                phone,
                stage,
                event.id,
                event.pattern.value,
                json.dumps(event.body, ensure_ascii=False),
                NOTIFY_CHANNEL,
            )
        except DRIVER_CONNECTION_ERRORS:
            await connection.invalidate()  # never back into the pool
            raise
        return User(**{column: row[column] for column in _USER_COLUMNS})

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
