"""Fixtures every test shares: settings that isolate a test on the real local services."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from uuid import uuid4

import aio_pika
import pytest
from redis.asyncio import Redis

from b24sync.logs import configure_logging
from b24sync.settings import Settings

TEST_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/b24sync_test"
)
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")

configure_logging("DEBUG")


def _below_ephemeral_ports() -> range:
    """Ports for the services a test starts: below the kernel's ephemeral range, from which
    outgoing connections take theirs (one could otherwise take a port between the pick and
    the service's bind)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            lowest, highest = (int(port) for port in ranges.read().split())
    except (OSError, ValueError):
        lowest, highest = 32768, 60999  # Linux's default
    if lowest - 1024 < 1000:  # the range starts low: use the ports above it
        return range(highest + 1, 65536)
    return range(max(1024, lowest - 12768), lowest)


_TEST_PORTS = _below_ephemeral_ports()
_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, never handed out before in this test run."""
    for port in random.sample(_TEST_PORTS, len(_TEST_PORTS)):
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))  # noqa: S104 - the services bind every interface
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port left for tests")


@pytest.fixture
async def settings() -> AsyncIterator[Settings]:
    """One test's settings: own queues, BullMQ prefix and ports; the queues are deleted after."""
    suffix = uuid4().hex[:10]
    test_settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=TEST_DATABASE_URL,
        rabbitmq_url=RABBITMQ_URL,
        redis_url=REDIS_URL,
        rabbitmq_queue=f"test.bitrix_queue.{suffix}",
        rabbitmq_reply_queue=f"test.bitrix.responses.{suffix}",
        bullmq_prefix=f"test-{suffix}",
        port=free_port(),
        bitrix_http_port=free_port(),
        portal_port=free_port(),
        outbox_poll_interval_s=0.2,
        # The app built in a test runs its relay in its lifespan; `b24sync core` processes
        # started by tests take the default (a relay process) from their environment.
        outbox_relay_process=False,
    )
    yield test_settings
    await forget(
        [test_settings.rabbitmq_queue, test_settings.rabbitmq_reply_queue],
        test_settings.bullmq_prefix,
    )


async def forget(queues: list[str], redis_prefix: str) -> None:
    """Removes what a test left on the shared broker and Redis: its queues, and every key under
    its BullMQ prefix (BullMQ's and the Bitrix service's own)."""
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        for name in queues:
            channel = await connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(name)
    await wipe_redis(redis_prefix)


async def wipe_redis(prefix: str) -> int:
    """Deletes every key under `prefix`: for the services using it, Redis lost everything.
    Returns how many keys there were."""
    redis = Redis.from_url(REDIS_URL)
    async with redis:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)
    return len(keys)


async def eventually(check: Callable[[], Awaitable[bool]], wait_s: float = 20.0) -> None:
    """Waits until `check()` holds (state of another task or process), failing after `wait_s`."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{check} did not hold within {wait_s}s")
        await asyncio.sleep(0.05)
