"""Fixtures of the Bitrix service tests: the emulator, raw RabbitMQ access, services in-process."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import httpx
import pytest
from pamqp import commands as spec
from redis.asyncio import Redis

from b24sync.bitrix.client import BitrixClient
from b24sync.bitrix.main import BitrixService
from b24sync.bitrix.ratelimit import RateLimiter
from b24sync.portal.main import PortalServer
from b24sync.settings import Settings
from tests.conftest import eventually, free_port

# Fast retries and short locks, so that a test waits for behaviour, not for production timings.
FAST: dict[str, Any] = {
    "job_backoff_ms": 50,
    "bitrix_timeout_s": 5.0,
    "bitrix_limit_wait_s": 0.05,
    "bitrix_operation_limit_wait_s": 0.1,
    "user_lease_ttl_ms": 2000,
    "user_busy_delay_ms": 100,
    "shutdown_timeout_s": 5.0,
    "portal_rate_limit": "off",
}


# Bitrix24's answers when a limit is hit: the request bucket, a method's operating time.
LIMIT_ANSWERS = {
    "QUERY_LIMIT_EXCEEDED": (503, "Too many requests"),
    "OPERATION_TIME_LIMIT": (429, "Method is blocked due to operation time limit."),
}


def event(
    action: str,
    user_id: int,
    *,
    reply_queue: str,
    version: int | None = None,
    changed: list[str] | None = None,
    force: bool = False,
    **user: Any,
) -> dict[str, Any]:
    """An event in the seed's envelope; `user` fields default to a complete user. `changed`
    and `force` are sent as our Core sends them."""
    pattern = {"create_card": "user_created", "update_card": "user_updated"}.get(
        action, "user_moved"
    )
    body_user: dict[str, Any] = {
        "id": user_id,
        "full_name": "Иван Иванов",
        "phone": "+77001112233",
        "stage": "NEW",
        **user,
    }
    if version is not None:
        body_user["version"] = version
    data: dict[str, Any] = {"action": action, "user": body_user, "replyQueue": reply_queue}
    if changed is not None:
        data["changed"] = changed
    if force:
        data["force"] = True
    return {"pattern": pattern, "data": data}


class _NoMessageId(spec.Basic.Properties):
    """Properties that keep `message_id` unset: aiormq fills in a random one otherwise."""

    @property
    def message_id(self) -> None:
        return None

    @message_id.setter
    def message_id(self, _value: object) -> None:
        pass


async def publish(
    channel: aio_pika.abc.AbstractChannel,
    queue: str,
    body: dict[str, Any] | bytes,
    *,
    message_id: str | None = None,
) -> None:
    """Publishes a persistent JSON message to `queue`; without `message_id` the message carries
    none, as the seed's NestJS services (amqplib) send theirs."""
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    properties = (
        _NoMessageId
        if message_id is None
        else functools.partial(spec.Basic.Properties, message_id=message_id)
    )(content_type="application/json", delivery_mode=2)
    underlay = await channel.get_underlay_channel()
    await underlay.basic_publish(raw, exchange="", routing_key=queue, properties=properties)


class Bus:
    """Raw AMQP access, as an outside producer and the reply consumer would have it."""

    def __init__(self, settings: Settings, channel: aio_pika.abc.AbstractChannel) -> None:
        self.settings = settings
        self.channel = channel
        self._replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()

    async def open(self) -> None:
        await self.channel.declare_queue(self.settings.rabbitmq_queue, durable=True)
        reply_queue = await self.channel.declare_queue(
            self.settings.rabbitmq_reply_queue, durable=True
        )
        await reply_queue.consume(self._on_reply, no_ack=True)

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await self._replies.put(message)

    async def publish(self, body: dict[str, Any] | bytes, *, message_id: str | None = None) -> None:
        """Publishes an event; without `message_id` the message carries none, as the seed's
        NestJS Core (amqplib) sends it."""
        await publish(self.channel, self.settings.rabbitmq_queue, body, message_id=message_id)

    async def reply_message(self, wait_s: float = 20.0) -> aio_pika.abc.AbstractIncomingMessage:
        return await asyncio.wait_for(self._replies.get(), wait_s)

    async def reply(self, wait_s: float = 20.0) -> dict[str, Any]:
        message = await self.reply_message(wait_s)
        body: dict[str, Any] = json.loads(message.body)
        return body

    async def replies(self, count: int, wait_s: float = 20.0) -> list[dict[str, Any]]:
        return [await self.reply(wait_s) for _ in range(count)]

    async def assert_no_reply(self, within: float = 1.0) -> None:
        await asyncio.sleep(within)
        assert self._replies.empty(), "an unexpected extra reply arrived"

    async def pending_events(self) -> int:
        queue = await self.channel.declare_queue(
            self.settings.rabbitmq_queue, durable=True, passive=True
        )
        return queue.declaration_result.message_count or 0


class Admin:
    """The emulator's admin API."""

    def __init__(self, http: httpx.AsyncClient, webhook_url: str) -> None:
        self.http = http
        self.webhook_url = webhook_url

    async def leads(self) -> list[dict[str, Any]]:
        response = await self.http.get("/admin/leads")
        response.raise_for_status()
        leads: list[dict[str, Any]] = response.json()
        return leads

    async def until_a_lead_exists(self) -> None:
        """Waits until the portal holds a lead: a create held after its write is in flight."""

        async def written() -> bool:
            return bool(await self.leads())

        await eventually(written)

    async def stats(self) -> dict[str, Any]:
        response = await self.http.get("/admin/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    async def calls(self, method: str | None = None) -> list[dict[str, Any]]:
        """The latest calls the portal served (commands inside a batch each on their own),
        all of them or those of one method."""
        response = await self.http.get("/admin/calls")
        response.raise_for_status()
        calls: list[dict[str, Any]] = response.json()
        return [call for call in calls if method is None or call["method"] == method]

    async def script(self, **entry: Any) -> None:
        response = await self.http.post("/admin/faults/script", json=entry)
        response.raise_for_status()

    async def fail(
        self,
        method: str,
        *,
        status: int,
        error: str,
        description: str | None = None,
        times: int = 1,
    ) -> None:
        """The next `times` calls of `method` answer with this Bitrix24 error."""
        answer = {"error": error} | ({"description": description} if description else {})
        await self.script(method=method, times=times, kind="error", status=status, **answer)

    async def limit(self, method: str, code: str, times: int = 1) -> None:
        """The next `times` calls of `method` answer with one of Bitrix24's limits, as it does."""
        status, description = LIMIT_ANSWERS[code]
        await self.fail(method, status=status, error=code, description=description, times=times)

    async def rest(self, method: str, params: dict[str, Any]) -> Any:
        """A REST call as someone else working in the portal would make it."""
        response = await self.http.post(f"{self.webhook_url}/{method}", json=params)
        response.raise_for_status()
        return response.json()["result"]


def make_client(
    webhook_url: str,
    *,
    timeout_s: float = 5.0,
    max_limit_waits: int = 3,
    limiter: RateLimiter | None = None,
    operation_limit_wait_s: float = 0.05,
) -> BitrixClient:
    return BitrixClient(
        webhook_url,
        limiter=limiter,
        timeout_s=timeout_s,
        limit_wait_s=0.02,
        operation_limit_wait_s=operation_limit_wait_s,
        max_limit_waits=max_limit_waits,
    )


@pytest.fixture
def fast_settings(settings: Settings) -> Settings:
    return settings.model_copy(update=FAST)


@pytest.fixture
async def redis_client(settings: Settings) -> AsyncIterator[Redis]:
    """A client for the test's Redis; the `settings` fixture removes the test's keys."""
    client = Redis.from_url(settings.redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def portal(fast_settings: Settings) -> AsyncIterator[PortalServer]:
    async with PortalServer(fast_settings) as server:
        yield server


@pytest.fixture
async def admin(portal: PortalServer, fast_settings: Settings) -> AsyncIterator[Admin]:
    async with httpx.AsyncClient(base_url=portal.base_url, timeout=10) as http:
        yield Admin(http, fast_settings.portal_webhook_url)


@pytest.fixture
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        bus = Bus(settings, channel)
        await bus.open()
        yield bus


ServiceFactory = Callable[..., Awaitable[BitrixService]]


@pytest.fixture
async def start_service(
    fast_settings: Settings, redis_client: Redis
) -> AsyncIterator[ServiceFactory]:
    """Starts Bitrix services in this process (`await start_service(**setting_overrides)`)."""
    services: list[BitrixService] = []

    async def start(**overrides: Any) -> BitrixService:
        # Each service of the test gets its own health port.
        port = {"bitrix_http_port": free_port()} if services else {}
        service = BitrixService(fast_settings.model_copy(update={**port, **overrides}))
        await service.start()
        services.append(service)
        return service

    yield start
    for service in services:
        await service.stop()


@pytest.fixture
async def service(start_service: ServiceFactory, portal: PortalServer) -> BitrixService:
    return await start_service()
