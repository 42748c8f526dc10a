"""The database engine and the request-scoped session."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg  # type: ignore[import-untyped]
from fastapi import Request
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, ResourceClosedError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.sql import Executable

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


@asynccontextmanager
async def driver_of(connection: AsyncConnection) -> AsyncIterator[asyncpg.Connection]:
    """The asyncpg connection under a pooled SQLAlchemy one, for statements sent straight
    through the driver. A connection the database dropped is invalidated, never pooled again
    (SQLAlchemy does that only for statements it executes itself)."""
    driver = (await connection.get_raw_connection()).driver_connection
    assert driver is not None
    try:
        yield driver
    except DRIVER_CONNECTION_ERRORS:
        await connection.invalidate()
        raise


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


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for requests and consumers."""
    return async_sessionmaker(engine, expire_on_commit=False)


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
    skips the commit; closing rolls back). A session that began none (its route did not use
    it) is not committed: beginning a transaction only to commit it costs CPU. It is closed
    only while still in a transaction (after an error): a committed session, or one that
    began none, holds no connection, and closing a session costs a task (`AsyncSession`
    shields its close)."""
    session = sessionmaker()
    try:
        yield session
        if session.in_transaction():
            await session.commit()
    finally:
        if session.in_transaction():
            await asyncio.shield(session.close())


class Statements(Protocol):
    """Where a repository's statements run: a session's transaction (`InSession`), or a
    connection of the app's groups of writes (`OnDriver`). One statement, either place."""

    async def rows(
        self, statement: Executable, parameters: Mapping[str, Any]
    ) -> Sequence[Mapping[Any, Any]]: ...

    def transaction(self) -> AbstractAsyncContextManager[Any]:
        """A transaction for the statements of the block (the open one, if there is one)."""
        ...


@dataclass(frozen=True, slots=True)
class InSession:
    session: AsyncSession

    async def rows(
        self, statement: Executable, parameters: Mapping[str, Any]
    ) -> Sequence[Mapping[Any, Any]]:
        result = await self.session.execute(statement, dict(parameters))
        try:
            return result.mappings().all()
        except ResourceClosedError:  # a statement that returns no rows
            return []

    def transaction(self) -> AbstractAsyncContextManager[Any]:
        return nullcontext()


@dataclass(frozen=True, slots=True)
class OnDriver:
    """Statements sent straight through asyncpg, each compiled once: on the groups of writes,
    SQLAlchemy's execution layers (session, greenlet, result) cost more CPU than the round
    trip."""

    connection: asyncpg.Connection

    async def rows(
        self, statement: Executable, parameters: Mapping[str, Any]
    ) -> Sequence[Mapping[Any, Any]]:
        sql, names, fixed = _driver_sql(statement)
        # A parameter neither given nor bound by the statement raises KeyError, as SQLAlchemy
        # would refuse it, rather than becoming NULL.
        values = [parameters[name] if name in parameters else fixed[name] for name in names]
        rows: list[Mapping[Any, Any]] = await self.connection.fetch(sql, *values)
        return rows

    def transaction(self) -> AbstractAsyncContextManager[Any]:
        return self.connection.transaction()  # type: ignore[no-any-return]


_ASYNCPG = asyncpg_dialect()  # type: ignore[no-untyped-call]


@functools.cache
def _driver_sql(statement: Executable) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """The statement's SQL for asyncpg ($1, $2...), its parameters' names in that order, and
    the values the statement itself binds (literals in it). Cached by identity: for statements
    built once, at module level."""
    compiled = statement.compile(dialect=_ASYNCPG)  # type: ignore[attr-defined]
    if compiled.post_compile_params or compiled.literal_execute_params:
        raise ValueError("a statement with expanding parameters cannot be compiled once")
    fixed = {name: bind.value for name, bind in compiled.binds.items() if not bind.required}
    return compiled.string, tuple(compiled.positiontup or ()), fixed


async def _keep_connection(_: asyncpg.Connection) -> None:
    """Every use ends its own transaction (asyncpg still rolls back one left open): the
    default reset would cost a round trip."""


# The groups' statements, prepared once per connection, are planned once per connection too.
# PostgreSQL's default planned them again at every run (a group of two or three looks cheaper
# to its custom plan than to the generic plan's guess of ten rows), and planning a change
# statement cost more than running it. Sequential scans off, a generic plan made while the
# users table is nearly empty (a new database) still looks each user up by its key, as every
# statement of the groups does, whatever the table grows to.
_WRITE_SETTINGS = {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off"}


async def create_write_pool(settings: Settings, size: int) -> asyncpg.Pool:
    """Connections of one kind of the app's groups of writes, one for each group that can be
    in flight: opened when first needed, then kept."""
    pool: asyncpg.Pool = await asyncpg.create_pool(
        asyncpg_dsn(settings.database_url),
        min_size=0,
        max_size=size,
        max_inactive_connection_lifetime=0,
        reset=_keep_connection,
        server_settings=_WRITE_SETTINGS,
    )
    return pool


async def close_write_pool(pool: asyncpg.Pool, timeout_s: float) -> None:
    """Closes the pool, cutting connections a group still holds after `timeout_s` (a group
    waiting on a lock or a silent network would otherwise hold up the shutdown)."""
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except TimeoutError:
        pool.terminate()
