"""Migration 0003 on a database holding 0002's rows: what the rows knew is kept, and the sweeps
start from a sensible state. On a database of the test's own."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from uuid import uuid4

import asyncpg
import pytest
from alembic import command
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from b24sync.core.db import async_url, asyncpg_dsn
from b24sync.core.migrate import alembic_config, create_database_if_missing
from tests.conftest import TEST_DATABASE_URL


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    base = make_url(TEST_DATABASE_URL)
    url = base.set(database=f"{base.database}_migration_{uuid4().hex[:8]}")
    rendered = url.render_as_string(hide_password=False)
    await create_database_if_missing(rendered)
    yield rendered
    maintenance = base.set(database="postgres").render_as_string(hide_password=False)
    connection = await asyncpg.connect(asyncpg_dsn(maintenance))
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
    finally:
        await connection.close()


async def migrate(url: str, revision: str, *, down: bool = False) -> None:
    def run(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)

    engine = create_async_engine(async_url(url))
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run)
    finally:
        await engine.dispose()


def event_body(user_id: int, version: int) -> str:
    user = {"id": user_id, "version": version}
    data = {"action": "update_card", "user": user, "replyQueue": "q"}
    return json.dumps({"pattern": "user_updated", "data": data})


async def test_0003_backfills_versions_answers_and_retries(database_url: str) -> None:
    await migrate(database_url, "0002")
    db = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        # A synced user (two events), a pending one (its second event unanswered), one failed
        # for a transient reason and one for the seed's validation error.
        await db.execute(
            "INSERT INTO users (id, full_name, phone, stage, version, sync_status, sync_error,"
            " synced_version, synced_at) VALUES"
            " (1, 'Synced', '+77001112233', 'NEW', 2, 'synced', NULL, 2, now()),"
            " (2, 'Pending', '+77001112233', 'NEW', 2, 'pending', NULL, 1, now()),"
            " (3, 'Failed', '+77001112233', 'NEW', 1, 'failed', 'HTTP 503', NULL, NULL),"
            " (4, 'No phone', '+77001112233', 'NEW', 1, 'failed', 'Missing phone number',"
            "  NULL, NULL)"
        )
        events = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (4, 1)]
        for user_id, version in events:
            await db.execute(
                "INSERT INTO outbox_events (id, user_id, pattern, body, published_at)"
                " VALUES ($1, $2, 'user_updated', $3::jsonb, now())",
                uuid4(),
                user_id,
                event_body(user_id, version),
            )
        await migrate(database_url, "head")

        answers = await db.fetch(
            "SELECT user_id, version, answer_status FROM outbox_events ORDER BY user_id, version"
        )
        assert [tuple(row) for row in answers] == [
            (1, 1, "success"),
            (1, 2, "success"),
            (2, 1, "success"),
            (2, 2, None),
            (3, 1, "error"),
            (4, 1, "error"),
        ]
        users = await db.fetch(
            "SELECT id, full_name_version, phone_version, stage_version, sync_retryable,"
            " next_sync_at IS NOT NULL AS retry_waits FROM users ORDER BY id"
        )
        assert [tuple(row) for row in users] == [
            (1, 2, 2, 2, None, False),
            (2, 2, 2, 2, None, False),
            (3, 1, 1, 1, True, True),
            (4, 1, 1, 1, False, False),
        ]

        await migrate(database_url, "0002", down=True)
        columns = await db.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'users'"
            " AND column_name = 'sync_retries'"
        )
        assert columns == []
    finally:
        await db.close()
