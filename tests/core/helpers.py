"""Committed writes through Core's own service, and the whole Core running in the test's loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import httpx
import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.contracts import Pattern, ReplyData
from b24sync.core.app import create_app
from b24sync.core.models import User
from b24sync.core.outbox.service import EventDraft, UserState, outbox_service
from b24sync.core.sync.service import Outcome, reply_service
from b24sync.core.users.repository import grouped_creates
from b24sync.core.users.schemas import UserCreate, UserMove, UserUpdate
from b24sync.core.users.service import WriteGroups, WriteTarget, grouped_changes, user_service
from b24sync.settings import Settings
from tests.core.rabbit import TcpProxy

Sessions = async_sessionmaker[AsyncSession]


def grouped_writes(pool: asyncpg.Pool, settings: Settings, in_flight: int) -> WriteGroups:
    """The groups of writes as the app makes them, `in_flight` groups of each kind at a time."""
    settings = settings.model_copy(update={"change_groups_in_flight": in_flight})
    return WriteGroups(grouped_creates(pool, in_flight), grouped_changes(pool, settings))


async def _committed(
    writes: Sessions | WriteGroups, write: Callable[[WriteTarget], Awaitable[User]]
) -> User:
    """`write` done through the app's groups, or in a session of its own, committed."""
    if isinstance(writes, WriteGroups):
        return await write(writes)
    async with writes() as session, session.begin():
        return await write(session)


async def create_user(
    writes: Sessions | WriteGroups, settings: Settings, name: str = "Иван Иванов"
) -> User:
    data = UserCreate(full_name=name, phone="+77001112233", stage="NEW")
    return await _committed(writes, lambda target: user_service.create(target, settings, data))


async def change_user(
    writes: Sessions | WriteGroups, settings: Settings, user_id: int, **fields: str
) -> User:
    data = UserUpdate(**fields)
    return await _committed(
        writes, lambda target: user_service.update(target, settings, user_id, data)
    )


async def rename_user(
    writes: Sessions | WriteGroups, settings: Settings, user_id: int, name: str
) -> User:
    return await change_user(writes, settings, user_id, full_name=name)


async def move_user(
    writes: Sessions | WriteGroups, settings: Settings, user_id: int, stage: str
) -> User:
    data = UserMove(stage=stage)
    return await _committed(
        writes, lambda target: user_service.move(target, settings, user_id, data)
    )


async def unpublished(sessions: Sessions) -> int:
    async with sessions() as session:
        query = text("SELECT count(*) FROM outbox_events WHERE published_at IS NULL")
        return int((await session.execute(query)).scalar_one())


async def all_published(sessions: Sessions) -> bool:
    """Every event confirmed by the broker and marked so: the relay marks a batch after its
    confirms, so a consumer can see a message a moment before this holds."""
    return await unpublished(sessions) == 0


@dataclass
class StoredEvent:
    id: str
    pattern: str
    version: int
    body: dict[str, Any]
    published_at: datetime | None
    answer_status: str | None
    answer_reason: str | None


async def events_of(sessions: Sessions, user_id: int) -> list[StoredEvent]:
    """The user's events in seq order."""
    async with sessions() as session:
        rows = await session.execute(
            text(
                "SELECT id, pattern, version, body, published_at, answer_status, answer_reason"
                " FROM outbox_events WHERE user_id = :id ORDER BY seq"
            ),
            {"id": user_id},
        )
        return [StoredEvent(str(row[0]), *row[1:]) for row in rows]


async def publish_all(sessions: Sessions) -> None:
    """Marks every waiting event published, as the relay would once RabbitMQ confirmed it."""
    async with sessions() as session, session.begin():
        await session.execute(
            text(
                "UPDATE outbox_events SET published_at = now()"
                " WHERE published_at IS NULL AND answered_at IS NULL"
            )
        )


async def read_user(sessions: Sessions, user_id: int) -> User:
    async with sessions() as session:
        statement = select(User).where(User.id == user_id)
        return (
            await session.scalars(statement, execution_options={"populate_existing": True})
        ).one()


async def answer(
    sessions: Sessions, settings: Settings, reply: dict[str, Any], event_id: str | None = None
) -> Outcome:
    """Applies a reply (the `data` object) as the consumer would; `event_id` as its
    correlation id."""
    async with sessions() as session, session.begin():
        return await reply_service.apply(
            session, settings, ReplyData.model_validate(reply), correlation_id=event_id
        )


def success(
    user_id: int, version: int | None = None, lead: int = 456, **extra: Any
) -> dict[str, Any]:
    """A success as our Bitrix service sends it (the user echoed, with its version when set)."""
    user: dict[str, Any] = {"id": user_id, "full_name": "Иван Иванов", "phone": "+77001112233",
                            "stage": "NEW"}  # fmt: skip
    if version is not None:
        user["version"] = version
    return {"status": "success", "action": "create_card", "user": user, "user_id": user_id,
            "bitrix_lead_id": lead, "attempts": 1, **extra}  # fmt: skip


def error(
    user_id: int, version: int | None = None, reason: str = "Network error", **extra: Any
) -> dict[str, Any]:
    """An error as our Bitrix service sends it."""
    user: dict[str, Any] = {"id": user_id, "full_name": "Иван Иванов", "stage": "NEW"}
    if version is not None:
        user["version"] = version
    return {"status": "error", "action": "create_card", "reason": reason, "user": user,
            "user_id": user_id, "attempts": 3, **extra}  # fmt: skip


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


async def proxied_database(settings: Settings) -> tuple[TcpProxy, Settings]:
    """A started proxy in front of the settings' PostgreSQL, and the settings that reach the
    database through it: stopping the proxy cuts every connection and refuses new ones."""
    proxy = TcpProxy(target_port=make_url(settings.database_url).port or 5432)
    await proxy.start()
    url = make_url(settings.database_url).set(host="127.0.0.1", port=proxy.port)
    return proxy, settings.model_copy(
        update={"database_url": url.render_as_string(hide_password=False)}
    )


def clash_events_of(name: str, taken_event_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every event drafted from now on for a user named `name` takes the id of an event that
    exists: the database refuses its insert."""
    draft = outbox_service.draft

    def clashing(
        user: UserState, pattern: Pattern, reply_queue: str, *, force: bool = False
    ) -> EventDraft:
        event = draft(user, pattern, reply_queue, force=force)
        if user.full_name != name:
            return event
        return dataclasses.replace(event, id=UUID(taken_event_id))

    monkeypatch.setattr(outbox_service, "draft", clashing)


async def first_answer_after_503s(send: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
    """Sends again while the answer is 503 (after an outage, the pool finds the connections it
    cut dead one by one), at most 50 times; the first other answer."""
    for _ in range(50):
        answer = await send()
        if answer.status_code != 503:
            return answer
    raise AssertionError("still 503 after 50 requests")
