"""The database engine and the request-scoped session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from fastapi import Request
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from b24sync.settings import Settings

# Errors of a statement sent straight through the driver that mean the database is gone (the
# ones SQLAlchemy would have raised as OperationalError or InterfaceError): answered with 503.
DRIVER_CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
)
# Everything that means the database cannot be reached now: answered with 503.
DATABASE_UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    OperationalError,
    InterfaceError,
    PoolTimeoutError,
    OSError,
    *DRIVER_CONNECTION_ERRORS,
)


def database_unavailable(exc: BaseException) -> bool:
    """The database cannot be reached now, as opposed to refusing a statement: worth trying
    again later. A connection lost in the middle of a statement comes as a plain `DBAPIError`
    whose connection SQLAlchemy found closed and invalidated."""
    return isinstance(exc, DATABASE_UNAVAILABLE_ERRORS) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated
    )


def one_item_to_blame(exc: BaseException) -> bool:
    """Whether a group of writes that failed with `exc` is worth trying again one item at a
    time: an error one item could cause (a refused row, a conflict, a bug), as opposed to the
    database being unreachable, which would fail every item alike."""
    return not database_unavailable(exc)


def async_url(url: str) -> str:
    """DATABASE_URL is given as ``postgresql://``; SQLAlchemy needs the asyncpg driver named."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def asyncpg_dsn(url: str) -> str:
    """A DSN for a raw asyncpg connection (LISTEN/NOTIFY, database creation)."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def create_engine(settings: Settings) -> AsyncEngine:
    return create_async_engine(
        async_url(settings.database_url),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_pre_ping=False,
    )


def create_sessionmaker(
    engine: AsyncEngine, info: dict[str, Any] | None = None
) -> async_sessionmaker[AsyncSession]:
    """Sessions for requests and consumers; `info` is handed to every session (`Session.info`)."""
    return async_sessionmaker(engine, expire_on_commit=False, info=info)


async def get_db_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request, committed when the endpoint returns without an error.

    Used with ``scope="function"`` so the commit happens before the response is sent: a client
    never sees a success for a change that failed to commit.
    """
    async with committing(request.app.state.sessionmaker) as session:
        yield session


@asynccontextmanager
async def committing(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """A session whose transaction commits when the block exits without an error (an error
    skips the commit; closing rolls back). A session that began none is not committed: a
    grouped write went through a connection of its own, and beginning a transaction only to
    commit it costs CPU. It is closed only while still in a transaction (after an error): a
    committed session, or one that began none, holds no connection, and closing a session
    costs a task (`AsyncSession` shields its close), about a tenth of a grouped write's CPU."""
    session = sessionmaker()
    try:
        yield session
        if session.in_transaction():
            await session.commit()
    finally:
        if session.in_transaction():
            await asyncio.shield(session.close())
