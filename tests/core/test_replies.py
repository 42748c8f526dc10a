"""Bitrix replies applied to the users' sync state: the rules on a rolled-back database, and
the consumer end to end on the real RabbitMQ."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.core.models import User
from b24sync.core.sync.consumer import handle_reply
from b24sync.settings import Settings
from tests.core.helpers import create_user, move_user, rename_user, running_core
from tests.core.rabbit import publish_raw, queue_depth

Sessions = async_sessionmaker[AsyncSession]


def success(user_id: int, version: int | None, lead: int = 456, **extra: Any) -> dict[str, Any]:
    user: dict[str, Any] = {"id": user_id, "full_name": "Иван Иванов", "phone": "+77001112233",
                            "stage": "NEW"}  # fmt: skip
    if version is not None:
        user["version"] = version
    return {"status": "success", "action": "create_card", "user": user, "user_id": user_id,
            "bitrix_lead_id": lead, "attempts": 1, **extra}  # fmt: skip


def error(
    user_id: int, version: int | None, reason: str = "Missing phone number"
) -> dict[str, Any]:
    user: dict[str, Any] = {"id": user_id, "full_name": "Пользователь без телефона",
                            "stage": "NEW"}  # fmt: skip
    if version is not None:
        user["version"] = version
    return {"status": "error", "action": "create_card", "reason": reason, "user": user,
            "user_id": user_id, "attempts": 3}  # fmt: skip


def envelope(data: dict[str, Any]) -> bytes:
    return json.dumps({"pattern": "bitrix.responses", "data": data}).encode()


def bare(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


async def state(sessions: Sessions, user_id: int) -> dict[str, Any]:
    async with sessions() as session:
        user = (await session.scalars(select(User).where(User.id == user_id))).one()
        return {
            "version": user.version,
            "bitrix_lead_id": user.bitrix_lead_id,
            "sync_status": user.sync_status,
            "sync_error": user.sync_error,
            "sync_attempts": user.sync_attempts,
            "synced_version": user.synced_version,
            "synced_at": user.synced_at,
            "full_name": user.full_name,
        }


@pytest.fixture
def sessions(rollback_sessionmaker: Sessions) -> Sessions:
    return rollback_sessionmaker


@pytest.mark.parametrize("wrap", [envelope, bare], ids=["envelope", "bare"])
async def test_success_marks_synced(sessions: Sessions, core_settings: Settings, wrap: Any) -> None:
    user = await create_user(sessions, core_settings)
    assert await handle_reply(wrap(success(user.id, 1)), sessions)
    after = await state(sessions, user.id)
    assert after["sync_status"] == "synced"
    assert after["bitrix_lead_id"] == 456
    assert after["synced_version"] == 1
    assert after["sync_attempts"] == 1
    assert after["synced_at"] is not None


@pytest.mark.parametrize("wrap", [envelope, bare], ids=["envelope", "bare"])
async def test_error_marks_failed(sessions: Sessions, core_settings: Settings, wrap: Any) -> None:
    user = await create_user(sessions, core_settings)
    assert await handle_reply(wrap(error(user.id, 1)), sessions)
    after = await state(sessions, user.id)
    assert after["sync_status"] == "failed"
    assert after["sync_error"] == "Missing phone number"
    assert after["sync_attempts"] == 3
    assert after["synced_version"] is None
    assert after["bitrix_lead_id"] is None


async def test_error_reason_with_nul_is_stored_without_it(
    sessions: Sessions, core_settings: Settings
) -> None:
    user = await create_user(sessions, core_settings)
    assert await handle_reply(envelope(error(user.id, 1, reason="Bad\x00 answer")), sessions)
    after = await state(sessions, user.id)
    assert (after["sync_status"], after["sync_error"]) == ("failed", "Bad answer")


async def test_same_reply_twice_changes_nothing(
    sessions: Sessions, core_settings: Settings
) -> None:
    user = await create_user(sessions, core_settings)
    await handle_reply(envelope(success(user.id, 1)), sessions)
    once = await state(sessions, user.id)
    await handle_reply(envelope(success(user.id, 1)), sessions)
    assert await state(sessions, user.id) == once

    await rename_user(sessions, core_settings, user.id, "Иван Петров")
    await handle_reply(envelope(error(user.id, 2)), sessions)
    failed = await state(sessions, user.id)
    await handle_reply(envelope(error(user.id, 2)), sessions)
    assert await state(sessions, user.id) == failed


async def test_stale_success_stores_lead_but_stays_pending(
    sessions: Sessions, core_settings: Settings
) -> None:
    user = await create_user(sessions, core_settings)
    await rename_user(sessions, core_settings, user.id, "Иван Петров")
    await move_user(sessions, core_settings, user.id, "CONVERTED")  # now at version 3
    await handle_reply(envelope(success(user.id, 1, lead=777)), sessions)
    after = await state(sessions, user.id)
    assert after["bitrix_lead_id"] == 777
    assert after["sync_status"] == "pending"
    assert after["version"] == 3

    await handle_reply(envelope(success(user.id, 3, lead=777)), sessions)
    assert (await state(sessions, user.id))["sync_status"] == "synced"
    # A late reply about version 2 (error or success) cannot undo version 3's success.
    await handle_reply(envelope(error(user.id, 2)), sessions)
    await handle_reply(envelope(success(user.id, 2, lead=999)), sessions)
    final = await state(sessions, user.id)
    assert final["sync_status"] == "synced"
    assert final["synced_version"] == 3
    assert final["bitrix_lead_id"] == 777


async def test_stale_error_is_ignored(sessions: Sessions, core_settings: Settings) -> None:
    user = await create_user(sessions, core_settings)
    await rename_user(sessions, core_settings, user.id, "Иван Петров")
    before = await state(sessions, user.id)
    await handle_reply(envelope(error(user.id, 1)), sessions)
    assert await state(sessions, user.id) == before


async def test_reply_without_version_applies_to_current(
    sessions: Sessions, core_settings: Settings
) -> None:
    user = await create_user(sessions, core_settings)
    await rename_user(sessions, core_settings, user.id, "Иван Петров")
    # The seed's own Bitrix service sends exactly this: no version, no user_id, no attempts.
    seed_reply = {"status": "success", "action": "create_card", "bitrix_lead_id": 456,
                  "user": {"id": user.id, "full_name": "Иван Иванов",
                           "phone": "+77001112233", "stage": "NEW"}}  # fmt: skip
    assert await handle_reply(bare(seed_reply), sessions)
    after = await state(sessions, user.id)
    assert after["sync_status"] == "synced"
    assert after["synced_version"] == 2
    assert after["full_name"] == "Иван Петров"  # a reply never changes the user's own data


async def test_reply_about_a_future_version_is_ignored(
    sessions: Sessions, core_settings: Settings
) -> None:
    user = await create_user(sessions, core_settings)
    before = await state(sessions, user.id)
    assert await handle_reply(envelope(success(user.id, 5)), sessions)
    assert await state(sessions, user.id) == before


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'{"status": "maybe", "user": {"id": 1}}', id="bad-status"),
        pytest.param(b'{"status": "success"}', id="no-user"),
        pytest.param(b'{"pattern": "bitrix.responses", "data": {"user": {"id": "x"}}}', id="env"),
        pytest.param(b'{"status": "success", "user": {"id": 1, "version": 0}}', id="version-0"),
    ],
)
async def test_malformed_reply_is_dropped(
    sessions: Sessions, body: bytes, capfd: pytest.CaptureFixture[str]
) -> None:
    assert await handle_reply(body, sessions) is True
    assert "[Core] Malformed reply dropped" in capfd.readouterr().out


async def test_reply_for_unknown_user_is_dropped(
    sessions: Sessions, capfd: pytest.CaptureFixture[str]
) -> None:
    assert await handle_reply(envelope(success(987654321, 1)), sessions) is True
    logged = capfd.readouterr().out
    assert "[Core] Bitrix Response Received: " in logged
    assert "outcome=unknown_user" in logged


async def test_consumer_applies_replies_and_acks_everything(
    core_settings: Settings, committed: Sessions
) -> None:
    user = await create_user(committed, core_settings)
    queue = core_settings.rabbitmq_reply_queue
    async with running_core(core_settings) as http:
        await publish_raw(queue, b"garbage that is not json")
        await publish_raw(queue, envelope(success(123456789, 1)))  # unknown user
        await publish_raw(queue, envelope(success(user.id, 1, lead=4242)))
        for _ in range(200):
            body = (await http.get(f"/users/{user.id}")).json()
            if body["sync"]["status"] != "pending":
                break
            await asyncio.sleep(0.05)
        assert body["bitrix_lead_id"] == 4242
        assert body["sync"]["status"] == "synced"
        assert body["sync"]["synced_version"] == 1
    # After Core disconnected, anything left unacknowledged would be back on the queue.
    assert await queue_depth(queue) == 0


async def test_consumer_survives_a_huge_lead_id(
    core_settings: Settings, committed: Sessions
) -> None:
    user = await create_user(committed, core_settings)
    async with running_core(core_settings) as http:
        await publish_raw(core_settings.rabbitmq_reply_queue,
                          envelope(success(user.id, 1, lead=10**30)))  # fmt: skip
        await publish_raw(core_settings.rabbitmq_reply_queue, envelope(success(user.id, 1)))
        for _ in range(200):
            body = (await http.get(f"/users/{user.id}")).json()
            if body["sync"]["status"] != "pending":
                break
            await asyncio.sleep(0.05)
        assert body["bitrix_lead_id"] == 456
    assert await queue_depth(core_settings.rabbitmq_reply_queue) == 0
