"""Reading what Core put on RabbitMQ, and a TCP proxy that plays a server going away."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from tests.conftest import RABBITMQ_URL, free_port


@dataclass
class Received:
    message_id: str | None
    content_type: str | None
    delivery_mode: aio_pika.DeliveryMode | None
    body: dict[str, Any]

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> Received:
        return cls(
            message_id=message.message_id,
            content_type=message.content_type,
            delivery_mode=message.delivery_mode,
            body=json.loads(message.body),
        )


async def drain(queue_name: str, expected: int, *, timeout_s: float = 20.0) -> list[Received]:
    """Takes messages off the queue until `expected` arrived (the timeout is only a safety
    net: a test then fails on what it did receive)."""
    received: list[Received] = []
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(received) < expected and asyncio.get_running_loop().time() < deadline:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.02)
                continue
            received.append(Received.of(message))
    return received


async def queue_depth(queue_name: str) -> int:
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True)
        return queue.declaration_result.message_count or 0


async def publish_raw(
    queue_name: str, body: bytes | str, *, correlation_id: str | None = None
) -> None:
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue_name, durable=True)
        payload = body.encode() if isinstance(body, str) else body
        message = aio_pika.Message(
            payload, content_type="application/json", correlation_id=correlation_id
        )
        await channel.default_exchange.publish(message, routing_key=queue_name)


class TcpProxy:
    """Forwards a spare port to a shared server (RabbitMQ by default); `stop` cuts every
    connection and refuses new ones, `start` lets them through again. The shared server itself
    is never touched."""

    def __init__(self, target_port: int = 5672) -> None:
        self.port = free_port()
        self.target_port = target_port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def amqp_url(self) -> str:
        # Reconnect quickly: the default robust reconnect interval is 5 s.
        return f"amqp://guest:guest@127.0.0.1:{self.port}/?reconnect_interval=0.3"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                await writer.wait_closed()
