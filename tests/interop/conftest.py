"""Our services as real processes (`b24sync core`, `b24sync bitrix`, the emulator `b24sync portal`)
beside the stand-ins for the seed's original NestJS services, all on the test's queues, BullMQ
prefix and ports; Core on the run's own database."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.settings import Settings
from tests.bitrix.conftest import Admin
from tests.conftest import eventually
from tests.core.conftest import committed, core_settings, database_url, engine
from tests.interop.original_bitrix import OriginalBitrixService
from tests.interop.original_core import OriginalCore
from tests.processes import (
    BITRIX_READY,
    CORE_READY,
    PORTAL_READY,
    ServiceProcess,
    service_environment,
)

__all__ = ["committed", "core_settings", "database_url", "engine"]

# Core's setting for a Bitrix service that needs the lead id in every update and move.
HOLD_SETTING = "HOLD_UNTIL_LEAD_ID"
# The stand-in's retries 50 ms and 100 ms apart instead of the seed's 2 s and 4 s.
ORIGINAL_BACKOFF_S = 0.05
# What a test shows of each process's output when it fails.
_SHOWN_LINES = 150


@contextlib.asynccontextmanager
async def running(process: ServiceProcess) -> AsyncIterator[ServiceProcess]:
    """Starts the process and stops it after the block; its output's tail goes to the test's
    captured output, shown when the test fails."""
    try:
        await process.start()
        yield process
    finally:
        if process.process is not None:
            with contextlib.suppress(TimeoutError):
                await process.stop()
            await process.kill()
        tail = "\n".join(process.lines[-_SHOWN_LINES:])
        print(f"\n----- b24sync {process.command} -----\n{tail}")


@pytest.fixture
async def portal(settings: Settings, tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    """`b24sync portal` on Bitrix24's standard plan (50 requests, then 2 per second)."""
    env = service_environment(settings, LOG_LEVEL="INFO", PORTAL_RATE_LIMIT="standard")
    async with running(ServiceProcess("portal", env, tmp_path, PORTAL_READY)) as process:
        yield process


@pytest.fixture
async def admin(settings: Settings, portal: ServiceProcess) -> AsyncIterator[Admin]:
    base_url = f"http://127.0.0.1:{settings.portal_port}"
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        yield Admin(http, settings.portal_webhook_url)


@pytest.fixture
async def our_bitrix(
    settings: Settings, portal: ServiceProcess, tmp_path: Path
) -> AsyncIterator[ServiceProcess]:
    """`b24sync bitrix` against the emulator, retrying after 50 ms instead of 2 s."""
    env = service_environment(
        settings, LOG_LEVEL="INFO", JOB_BACKOFF_MS="50", USER_BUSY_DELAY_MS="100"
    )
    async with running(ServiceProcess("bitrix", env, tmp_path, BITRIX_READY)) as process:
        yield process


@pytest.fixture
async def our_core(
    core_settings: Settings,
    committed: async_sessionmaker[AsyncSession],
    tmp_path: Path,
) -> AsyncIterator[httpx.AsyncClient]:
    """`b24sync core` in hold mode; yields a client of its HTTP API. (`committed` empties the
    tables once Core has stopped.)"""
    env = service_environment(
        core_settings, LOG_LEVEL="INFO", OUTBOX_POLL_INTERVAL_S="0.2", **{HOLD_SETTING: "true"}
    )
    async with (
        running(ServiceProcess("core", env, tmp_path, CORE_READY)),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{core_settings.port}", timeout=10) as api,
    ):

        async def ready() -> bool:  # connected to RabbitMQ: replies are read from now on
            return (await api.get("/readyz")).status_code == 200

        await eventually(ready)
        yield api


StartOriginalBitrix = Callable[[], Awaitable[OriginalBitrixService]]


@pytest.fixture
async def start_their_bitrix(
    settings: Settings, portal: ServiceProcess
) -> AsyncIterator[StartOriginalBitrix]:
    """Starts the stand-in for the original Bitrix service when the test says so."""
    started: list[OriginalBitrixService] = []

    async def start() -> OriginalBitrixService:
        service = OriginalBitrixService(
            amqp_url=settings.rabbitmq_url,
            queue=settings.rabbitmq_queue,
            webhook_url=settings.portal_webhook_url,
            backoff_s=ORIGINAL_BACKOFF_S,
        )
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        await service.stop()


@pytest.fixture
async def their_bitrix(start_their_bitrix: StartOriginalBitrix) -> OriginalBitrixService:
    return await start_their_bitrix()


@pytest.fixture
async def their_core(settings: Settings) -> AsyncIterator[OriginalCore]:
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        core = OriginalCore(settings, await connection.channel())
        await core.open()
        yield core


async def core_user(api: httpx.AsyncClient, user_id: int) -> dict[str, Any]:
    response = await api.get(f"/users/{user_id}")
    response.raise_for_status()
    user: dict[str, Any] = response.json()
    return user


async def user_in_state(
    api: httpx.AsyncClient, user_id: int, status: str, wait_s: float = 30.0
) -> dict[str, Any]:
    """Waits until Core shows the user `status` ("synced": for its latest version)."""
    seen: dict[str, Any] = {}

    async def reached() -> bool:
        seen.update(await core_user(api, user_id))
        if status == "synced":
            return bool(seen["sync"]["synced_version"] == seen["version"])
        return bool(seen["sync"]["status"] == status)

    try:
        await eventually(reached, wait_s)
    except AssertionError as exc:
        raise AssertionError(f"user {user_id} never {status}; last seen: {seen}") from exc
    assert seen["sync"]["status"] == status, seen
    return seen


def phones(lead: dict[str, Any]) -> list[str]:
    return [entry["VALUE"] for entry in lead.get("PHONE", [])]
