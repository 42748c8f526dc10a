"""Telling a database that is gone from one that refuses a statement, and the request's
committing session, on the real PostgreSQL."""

from __future__ import annotations

import time

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

from b24sync.core.db import (
    OnDriver,
    async_url,
    close_write_pool,
    committing,
    create_sessionmaker,
    create_write_pool,
    database_unavailable,
)
from b24sync.core.outbox.repository import _SUPERSEDE_HELD
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


async def test_a_committing_session_commits_rolls_back_and_always_gives_its_connection_back(
    engine: AsyncEngine,
) -> None:
    sessions = create_sessionmaker(engine)
    insert = text("INSERT INTO committing_probe VALUES (:n)")

    async def failing_request() -> None:
        async with committing(sessions) as session:
            await session.execute(insert, {"n": 2})
            raise RuntimeError("the request failed after its write")

    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE committing_probe (n int)"))
    try:
        async with committing(sessions) as session:
            await session.execute(insert, {"n": 1})
        with pytest.raises(RuntimeError):
            await failing_request()
        async with committing(sessions):
            pass  # a session that never began
        assert isinstance(engine.pool, QueuePool)
        assert engine.pool.checkedout() == 0
        async with engine.connect() as connection:
            rows = (await connection.execute(text("SELECT n FROM committing_probe"))).all()
        assert [row.n for row in rows] == [1]
    finally:
        async with engine.begin() as connection:
            await connection.execute(text("DROP TABLE committing_probe"))


async def test_a_statement_on_the_driver_refuses_a_parameter_not_given(
    write_pool: asyncpg.Pool,
) -> None:
    async with write_pool.acquire() as driver:
        statements = OnDriver(driver)
        # Bound by the statement itself (the answer's status and reason) or given.
        assert await statements.rows(_SUPERSEDE_HELD, {"user_ids": [1]}) == []
        with pytest.raises(KeyError, match="user_ids"):
            await statements.rows(_SUPERSEDE_HELD, {})


async def test_closing_the_write_pool_cuts_a_connection_still_held_after_the_timeout(
    core_settings: Settings,
) -> None:
    pool = await create_write_pool(core_settings, 1)
    held = await pool.acquire()
    started = time.monotonic()

    await close_write_pool(pool, 0.2)

    assert time.monotonic() - started < 2
    with pytest.raises(asyncpg.InterfaceError):
        await held.fetchval("SELECT 1")
