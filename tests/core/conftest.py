"""Core fixtures: a database of this run's own, migrated once, on the real PostgreSQL.

API tests run inside a transaction that is rolled back (each request's commit only releases a
savepoint); relay and reply-consumer tests need committed rows and clean the tables after.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from uuid import uuid4

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from b24sync.core.app import create_app
from b24sync.core.db import async_url, asyncpg_dsn, create_write_pool
from b24sync.core.migrate import upgrade_head
from b24sync.settings import Settings
from tests.conftest import TEST_DATABASE_URL
from tests.core.helpers import running_core


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    """A fresh database per test run (concurrent runs never share one), dropped at the end."""
    base = make_url(TEST_DATABASE_URL)
    url = base.set(database=f"{base.database}_core_{uuid4().hex[:8]}").render_as_string(
        hide_password=False
    )
    await upgrade_head(url)
    yield url
    maintenance = base.set(database="postgres").render_as_string(hide_password=False)
    connection = await asyncpg.connect(asyncpg_dsn(maintenance))
    try:
        name = make_url(url).database
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(async_url(database_url))
    yield engine
    await engine.dispose()


@pytest.fixture
def core_settings(settings: Settings, database_url: str) -> Settings:
    return settings.model_copy(update={"database_url": database_url})


@pytest.fixture
async def write_pool(core_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """Connections for groups of writes, as the app keeps them."""
    pool = await create_write_pool(core_settings, 2)
    yield pool
    await pool.close()


@pytest.fixture
async def connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection inside an outer transaction that is rolled back after the test."""
    async with engine.connect() as connection:
        transaction = await connection.begin()
        yield connection
        await transaction.rollback()


@pytest.fixture
def rollback_sessionmaker(connection: AsyncConnection) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(
        bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint"
    )


@pytest.fixture
async def client(
    core_settings: Settings, rollback_sessionmaker: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    """The API without its background tasks; every request's commit stays in the test's
    transaction."""
    app = create_app(core_settings)
    app.state.sessionmaker = rollback_sessionmaker
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://core") as http:
        yield http


@pytest.fixture
async def committed(engine: AsyncEngine) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions that really commit; the tables are emptied after the test."""
    yield async_sessionmaker(engine, expire_on_commit=False)
    async with engine.begin() as connection:
        await connection.execute(text("TRUNCATE users, outbox_events"))


@pytest.fixture
async def running_app(
    core_settings: Settings, committed: async_sessionmaker[AsyncSession]
) -> AsyncIterator[httpx.AsyncClient]:
    """The whole Core (API, relay, reply consumer) started through its lifespan."""
    async with running_core(core_settings) as http:
        yield http
