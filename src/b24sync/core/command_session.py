"""A database session for a command run beside Core (`b24sync status`, `b24sync users`): Core
need not run, and a database that cannot be used is a `StartupError`'s one line."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession

from b24sync.core.db import create_sessionmaker
from b24sync.core.migrate import checked_engine
from b24sync.settings import Settings


@asynccontextmanager
async def command_session(settings: Settings) -> AsyncIterator[AsyncSession]:
    """A session on a database checked to be at the latest migration; read-only use (it
    never commits). Raises `StartupError` when the database cannot be used."""
    engine = await checked_engine(settings)
    try:
        async with create_sessionmaker(engine)() as session:
            yield session
    finally:
        await engine.dispose()
