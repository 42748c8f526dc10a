"""Alembic environment: runs on the connection `b24sync migrate` hands over, or on its own
async engine when invoked through the ``alembic`` command with ``DATABASE_URL`` set."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from b24sync.core.db import async_url
from b24sync.core.models import Base
from b24sync.settings import get_settings

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine() -> None:
    engine = create_async_engine(async_url(get_settings().database_url))
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


shared: Connection | None = config.attributes.get("connection")
if shared is not None:
    _run(shared)
else:
    asyncio.run(_run_with_own_engine())
