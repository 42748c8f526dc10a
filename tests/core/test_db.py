"""Telling a database that is gone from one that refuses a statement, on the real PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from b24sync.core.db import async_url, database_unavailable
from b24sync.settings import Settings
from tests.core.rabbit import TcpProxy


async def test_a_connection_lost_mid_transaction_means_the_database_is_unavailable(
    core_settings: Settings,
) -> None:
    proxy = TcpProxy(target_port=make_url(core_settings.database_url).port or 5432)
    await proxy.start()
    url = make_url(core_settings.database_url).set(host="127.0.0.1", port=proxy.port)
    engine = create_async_engine(async_url(url.render_as_string(hide_password=False)))
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
