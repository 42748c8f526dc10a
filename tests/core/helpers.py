"""Committed writes through Core's own service, and the whole Core running in the test's loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.core.app import create_app
from b24sync.core.models import User
from b24sync.core.users.schemas import UserCreate, UserMove, UserUpdate
from b24sync.core.users.service import user_service
from b24sync.settings import Settings

Sessions = async_sessionmaker[AsyncSession]


async def create_user(sessions: Sessions, settings: Settings, name: str = "Иван Иванов") -> User:
    async with sessions() as session, session.begin():
        data = UserCreate(full_name=name, phone="+77001112233", stage="NEW")
        return await user_service.create(session, settings, data)


async def rename_user(sessions: Sessions, settings: Settings, user_id: int, name: str) -> User:
    async with sessions() as session, session.begin():
        data = UserUpdate(full_name=name)
        return await user_service.update(session, settings, user_id, data)


async def move_user(sessions: Sessions, settings: Settings, user_id: int, stage: str) -> User:
    async with sessions() as session, session.begin():
        data = UserMove(stage=stage)
        return await user_service.move(session, settings, user_id, data)


async def unpublished(sessions: Sessions) -> int:
    async with sessions() as session:
        query = text("SELECT count(*) FROM outbox_events WHERE published_at IS NULL")
        return int((await session.execute(query)).scalar_one())


async def all_published(sessions: Sessions) -> bool:
    """Every event confirmed by the broker and marked so: the relay marks a batch after its
    confirms, so a consumer can see a message a moment before this holds."""
    return await unpublished(sessions) == 0


async def event_ids(sessions: Sessions) -> list[str]:
    async with sessions() as session:
        rows = await session.execute(text("SELECT id FROM outbox_events ORDER BY seq"))
        return [str(row.id) for row in rows]


@contextlib.asynccontextmanager
async def running_core(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://core") as http:
            yield http
    # Let the AMQP connections' close callbacks (tasks of their own) finish before the loop
    # moves on to the next test or closes.
    await asyncio.sleep(0.1)
