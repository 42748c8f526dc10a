"""A command's progress bar that follows users to the end of their sync: from pending to synced
or failed, read from the database (Core need not run in this process; its relay publishes)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.core.models import SyncStatus
from b24sync.core.users.repository import UserRepository

POLL_INTERVAL_S = 1.0


async def follow_sync(
    sessions: async_sessionmaker[AsyncSession],
    user_ids: Sequence[int],
    console: Console,
    *,
    poll_interval_s: float = POLL_INTERVAL_S,
) -> dict[str, int]:
    """Shows how many of `user_ids` Bitrix24 has answered (synced or failed) until none is
    pending; returns the count of each sync status. A failure Core retries later counts as
    answered: `b24sync resync --failed` sends such users again at once."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("Waiting for Bitrix24", total=len(user_ids))
        while True:
            async with sessions() as session:
                counts = await UserRepository(session).count_by_sync_status_of(user_ids)
            synced = counts.get(SyncStatus.SYNCED.value, 0)
            failed = counts.get(SyncStatus.FAILED.value, 0)
            progress.update(
                task,
                completed=synced + failed,
                description=f"Bitrix24: {synced} synced, {failed} failed",
            )
            if not counts.get(SyncStatus.PENDING.value, 0):
                return counts
            await asyncio.sleep(poll_interval_s)
