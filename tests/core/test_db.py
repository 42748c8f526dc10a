"""Telling a database that is gone from one that refuses a statement, on the real PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from b24sync.core.db import async_url, database_unavailable
from b24sync.settings import Settings
from tests.core.helpers import proxied_database


async def test_a_connection_lost_mid_transaction_means_the_database_is_unavailable(
    core_settings: Settings,
) -> None:
    proxy, settings = await proxied_database(core_settings)
    engine = create_async_engine(async_url(settings.database_url))
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
            await proxy.stop()
            with pytest.raises(DBAPIError) as lost:
                await connection.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    assert database_unavailable(lost.value)


async def test_a_statement_the_database_refuses_is_not_unavailability(
    engine: AsyncEngine,
) -> None:
    async with engine.connect() as connection:
        with pytest.raises(DBAPIError) as refused:
            await connection.execute(text("SELECT 1 / 0"))
    assert not database_unavailable(refused.value)
