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
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from b24sync.core.db import async_url, asyncpg_dsn
from b24sync.logs import get_logger
from b24sync.settings import Settings

log = get_logger(__name__)


class SchemaNotReadyError(RuntimeError):
    pass


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
        raise ValueError("DATABASE_URL names no database")
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
    asyncio.run(upgrade_head(settings.database_url))
    log.info("[Core] Database migrated", revision=head_revision())
