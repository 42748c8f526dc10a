"""`b24sync migrate`: create the database when missing, then apply the Alembic migrations.

Core checks the same revision on startup (:func:`check_schema`) and refuses to run on a database
that is behind, so a forgotten migration fails loudly instead of at the first request.
"""

from __future__ import annotations

import asyncio
from importlib.resources import files

import asyncpg  # type: ignore[import-untyped]
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from b24sync.core.db import async_url, asyncpg_dsn, create_engine
from b24sync.errors import StartupError, unreachable
from b24sync.logs import get_logger
from b24sync.messaging import describe_url
from b24sync.settings import Settings

log = get_logger(__name__)


class SchemaNotReadyError(StartupError):
    pass


def database_error(exc: BaseException, database_url: str) -> StartupError:
    """The one line for a database that cannot be used: unreachable, refusing the login,
    missing, or a DATABASE_URL that is no URL. Never shows the password."""
    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, ArgumentError | ValueError):
        return StartupError(f"DATABASE_URL: not a PostgreSQL URL ({exc})")
    where = describe_url(database_url)
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, asyncpg.InvalidCatalogNameError):
            return StartupError(
                f"the database at {where} does not exist: run `b24sync migrate` (it creates it) "
                "or check DATABASE_URL"
            )
        if isinstance(seen, asyncpg.InvalidAuthorizationSpecificationError):
            return StartupError(f"PostgreSQL at {where} refused the login: check DATABASE_URL")
        if isinstance(seen, asyncpg.PostgresError):
            return StartupError(f"PostgreSQL at {where}: {seen}: check DATABASE_URL")
        seen = seen.__cause__ or seen.__context__
    return unreachable("PostgreSQL", where, exc, "DATABASE_URL")


async def checked_engine(settings: Settings) -> AsyncEngine:
    """An engine on a database that is reachable and fully migrated; raises `StartupError`
    (with the engine disposed) otherwise."""
    try:
        engine = create_engine(settings)
    except ArgumentError as exc:
        raise database_error(exc, settings.database_url) from exc
    try:
        await check_schema(engine)
    except BaseException as exc:
        await engine.dispose()
        if isinstance(exc, OSError | DBAPIError | asyncpg.PostgresError):
            raise database_error(exc, settings.database_url) from exc
        raise
    return engine


async def check_database(settings: Settings) -> None:
    """Raises `StartupError` unless the database is reachable and fully migrated."""
    await (await checked_engine(settings)).dispose()


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(files("b24sync.core") / "migrations"))
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def create_database_if_missing(database_url: str) -> bool:
    url = make_url(database_url)
    name = url.database
    if not name:
        raise StartupError("DATABASE_URL names no database")
    maintenance = asyncpg_dsn(url.set(database="postgres").render_as_string(hide_password=False))
    connection = await asyncpg.connect(maintenance)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        # Identifiers cannot be bound parameters; quote it the way PostgreSQL does.
        quoted = '"' + name.replace('"', '""') + '"'
        await connection.execute(f"CREATE DATABASE {quoted}")
        return True
    finally:
        await connection.close()


async def upgrade_head(database_url: str) -> None:
    await create_database_if_missing(database_url)
    engine = create_async_engine(async_url(database_url))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade)
    finally:
        await engine.dispose()


def _upgrade(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def check_schema(engine: AsyncEngine) -> None:
    """Raises `SchemaNotReadyError` unless the database is at the latest migration."""
    async with engine.connect() as connection:
        current = await connection.run_sync(
            lambda sync: MigrationContext.configure(sync).get_current_revision()
        )
    head = head_revision()
    if current != head:
        raise SchemaNotReadyError(
            f"the database is at migration {current or 'none'}, Core needs {head}: "
            "run `b24sync migrate` first"
        )


def migrate(settings: Settings) -> None:
    try:
        asyncio.run(upgrade_head(settings.database_url))
    except (OSError, ValueError, ArgumentError, DBAPIError, asyncpg.PostgresError) as exc:
        raise database_error(exc, settings.database_url) from exc
    log.info("[Core] Database migrated", revision=head_revision())
