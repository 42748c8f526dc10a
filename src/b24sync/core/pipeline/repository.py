"""The pipeline view's own SQL: the latest failures."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from b24sync.core.models import SyncStatus, User


async def recent_failures(session: AsyncSession, limit: int) -> Sequence[User]:
    """Failed users, the latest failure first."""
    statement = (
        select(User)
        .where(User.sync_status == SyncStatus.FAILED.value)
        .order_by(User.sync_failed_at.desc().nulls_last(), User.id.desc())
        .limit(limit)
    )
    return (await session.scalars(statement)).all()
