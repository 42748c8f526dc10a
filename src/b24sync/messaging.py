"""RabbitMQ plumbing both services share: how queues are declared, and the one way messages
are published (Core's events, the Bitrix service's replies)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import unquote, urlsplit

from faststream.rabbit import QueueType as RabbitQueueType
from faststream.rabbit import RabbitQueue
from pamqp import commands, frame, heartbeat
from pamqp.body import ContentBody
from pamqp.exceptions import UnmarshalingException
from pamqp.header import ContentHeader, ProtocolHeader

from b24sync.core.backoff import Backoff
from b24sync.logs import get_logger, mask_secrets

log = get_logger(__name__)

CONTENT_TYPE = "application/json"
CONNECT_TIMEOUT_S = 10.0


# "quorum" for a RabbitMQ cluster: quorum queues are replicated (classic queues are not, since
# RabbitMQ 4). Every service must declare a queue alike, or the broker refuses it.
QueueType = Literal["classic", "quorum"]


def queue_arguments(queue_type: QueueType) -> dict[str, Any]:
    return {"x-queue-type": queue_type}


def durable_queue(name: str, queue_type: QueueType) -> RabbitQueue:
    """The queue as FastStream declares it (with the same `x-queue-type` argument)."""
    if queue_type == "quorum":
        return RabbitQueue(name, queue_type=RabbitQueueType.QUORUM, durable=True)
    return RabbitQueue(name, queue_type=RabbitQueueType.CLASSIC, durable=True)


class PublishError(Exception):
    """The broker did not take a message: refused it, returned it as unroutable, or closed the
    channel or the connection before confirming it."""


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    body: bytes
    message_id: str | None = None
    correlation_id: str | None = None


# AMQP 0-9-1 wire constants (the spec's numbers) for the one method sent per message.
_FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY, _FRAME_END = 1, 2, 3, b"\xce"
_BASIC_CLASS, _BASIC_PUBLISH = 60, 40
_PERSISTENT = 2
# Property flags, in the spec's order from the highest bit.
_HAS_CONTENT_TYPE, _HAS_DELIVERY_MODE = 1 << 15, 1 << 12
_HAS_CORRELATION_ID, _HAS_MESSAGE_ID = 1 << 10, 1 << 7
_CHANNEL = 1
_FRAME_SIZE = struct.Struct(">I")
# The properties every message has, first in the spec's order: content type, delivery mode.
_COMMON_FLAGS = _HAS_CONTENT_TYPE | _HAS_DELIVERY_MODE


def _frame(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, _CHANNEL, len(payload)) + payload + _FRAME_END


def _short(text: str) -> bytes:
    data = text.encode()
    return bytes((len(data),)) + data


_COMMON_PROPERTIES = _short(CONTENT_TYPE) + bytes((_PERSISTENT,))


def _publish_method(queue: str) -> bytes:
    """The Basic.Publish frame to `queue` through the default exchange, mandatory (an
    unroutable message comes back instead of vanishing): the same for every message to it."""
    return _frame(
        _FRAME_METHOD,
        struct.pack(">HHH", _BASIC_CLASS, _BASIC_PUBLISH, 0) + b"\x00" + _short(queue) + b"\x01",
    )


def _publish_frames(method: bytes, message: OutgoingMessage, frame_max: int) -> bytes:
    """The publish `method`, then the message's header and body frames.

    Encoded here rather than through pamqp's generic marshalling: this runs for every message
    both services send, and the generic path cost several times more CPU than the publish."""
    flags = _COMMON_FLAGS
    properties = _COMMON_PROPERTIES
    if message.correlation_id is not None:
        flags |= _HAS_CORRELATION_ID
        properties += _short(message.correlation_id)
    if message.message_id is not None:
        flags |= _HAS_MESSAGE_ID
        properties += _short(message.message_id)
    body = message.body
    parts = [
        method,
        _frame(_FRAME_HEADER, struct.pack(">HHQH", _BASIC_CLASS, 0, len(body), flags) + properties),
    ]
    room = frame_max - 8  # a frame's header and end byte
    parts.extend(_frame(_FRAME_BODY, body[at : at + room]) for at in range(0, len(body), room))
    return b"".join(parts)


@dataclass(frozen=True, slots=True)
class _Endpoint:
    host: str
    port: int
    username: str
    password: str
    virtual_host: str
    tls: bool

    @classmethod
    def from_url(cls, url: str) -> _Endpoint:
        parts = urlsplit(url)
        tls = parts.scheme == "amqps"
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or (5671 if tls else 5672),
            username=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            virtual_host=unquote(path) or "/",
            tls=tls,
        )


class _Connection(asyncio.Protocol):
    """One AMQP connection with one channel in confirm mode: publishes go out in as few
    socket writes as there are batches, and each waits for its own confirm."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        # The broker's answers to synchronous methods, in order (or the error that ended it).
        self._replies: asyncio.Queue[Any] = asyncio.Queue()
        self._calls = asyncio.Lock()
        self._next_tag = 0
        # delivery tag -> (confirm, the message's ids, to match a return to it)
        self._unconfirmed: dict[int, tuple[asyncio.Future[None], tuple[str | None, ...]]] = {}
        self._returned: Counter[tuple[str | None, ...]] = Counter()
        self._returning: tuple[tuple[str | None, ...], int] | None = None
        self._heartbeat_s = 0
        self._last_received = self._loop.time()
        self._heartbeats: asyncio.TimerHandle | None = None
        self.frame_max = 131072
        self.lost = asyncio.Event()
        self.declared: set[str] = set()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport.write(ProtocolHeader().marshal())

    def data_received(self, data: bytes) -> None:
        self._last_received = self._loop.time()
        buffer = self._buffer
        buffer += data
        # A frame: type (1 byte), channel (2), payload size (4), payload, end byte.
        while len(buffer) >= 8:
            end = 8 + _FRAME_SIZE.unpack_from(buffer, 3)[0]
            if len(buffer) < end:
                return  # the rest of the frame has not arrived yet
            try:
                _, channel, value = frame.unmarshal(bytes(buffer[:end]))
            except UnmarshalingException as exc:
                self._fail(PublishError(f"malformed frame from RabbitMQ: {exc}"))
                if self._transport is not None:
                    self._transport.abort()
                return
            del buffer[:end]
            self._received(channel, value)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(PublishError(f"connection to RabbitMQ lost: {exc or 'closed'}"))

    # the handshake and synchronous methods

    async def open(self, endpoint: _Endpoint) -> None:
        await self._expect(commands.Connection.Start)
        self._send(
            0,
            commands.Connection.StartOk(
                client_properties={
                    "product": "b24sync",
                    "capabilities": {"publisher_confirms": True, "basic.nack": True},
                },
                mechanism="PLAIN",
                response=f"\0{endpoint.username}\0{endpoint.password}",
            ),
        )
        tune = await self._expect(commands.Connection.Tune)
        self.frame_max = tune.frame_max or self.frame_max
        self._heartbeat_s = tune.heartbeat
        self._send(
            0,
            commands.Connection.TuneOk(
                channel_max=tune.channel_max, frame_max=self.frame_max, heartbeat=tune.heartbeat
            ),
        )
        await self.call(0, commands.Connection.Open(virtual_host=endpoint.virtual_host))
        await self.call(_CHANNEL, commands.Channel.Open())
        await self.call(_CHANNEL, commands.Confirm.Select())
        if self._heartbeat_s:
            self._beat()

    async def call(self, channel: int, method: Any) -> Any:
        """Sends a synchronous method and returns the broker's answer to it."""
        async with self._calls:
            self._send(channel, method)
            return await self._expect()

    async def _expect(self, kind: type = object) -> Any:
        answer = await self._replies.get()
        if isinstance(answer, BaseException):
            raise answer
        if not isinstance(answer, kind):
            raise PublishError(f"unexpected answer from RabbitMQ: {answer.name}")
        return answer

    # publishing

    def publish(
        self, queue: str, messages: Sequence[OutgoingMessage]
    ) -> list[asyncio.Future[None]]:
        """Sends the messages in one write; each future resolves on its confirm."""
        if self._transport is None or self.lost.is_set():
            raise PublishError("not connected to RabbitMQ")
        confirms: list[asyncio.Future[None]] = []
        for message in messages:
            self._next_tag += 1
            confirm: asyncio.Future[None] = self._loop.create_future()
            self._unconfirmed[self._next_tag] = (
                confirm,
                (message.message_id, message.correlation_id),
            )
            confirms.append(confirm)
        method = _publish_method(queue)
        self._transport.write(
            b"".join(_publish_frames(method, message, self.frame_max) for message in messages)
        )
        return confirms

    async def close(self) -> None:
        if self._transport is None or self.lost.is_set():
            return
        with contextlib.suppress(PublishError, TimeoutError):
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await self.call(
                    0,
                    commands.Connection.Close(
                        reply_code=200, reply_text="bye", class_id=0, method_id=0
                    ),
                )
        self._transport.close()
        self._fail(PublishError("publisher closed"))

    # what comes in

    def _received(self, channel: int, value: Any) -> None:
        if isinstance(value, commands.Basic.Ack):
            self._confirm(value.delivery_tag, value.multiple, None)
        elif isinstance(value, commands.Basic.Nack):
            self._confirm(value.delivery_tag, value.multiple, "RabbitMQ refused the message")
        elif isinstance(value, commands.Basic.Return):
            self._returning = ((None, None), 0)  # its header names the message
        elif isinstance(value, ContentHeader):
            ids = (value.properties.message_id, value.properties.correlation_id)
            self._returning = (ids, value.body_size)
            self._returned_if_complete(0)
        elif isinstance(value, ContentBody):
            self._returned_if_complete(len(value.value))
        elif isinstance(value, heartbeat.Heartbeat):
            pass
        elif isinstance(value, commands.Connection.Close | commands.Channel.Close):
            # A channel error (a queue declared with other arguments, say) ends the connection
            # too: the next publish opens a fresh one.
            reply = commands.Connection.CloseOk() if channel == 0 else commands.Channel.CloseOk()
            self._send(channel, reply)
            closed = "connection" if channel == 0 else "channel"
            self._fail(
                PublishError(f"RabbitMQ closed the {closed}: {value.reply_code} {value.reply_text}")
            )
            if self._transport is not None:
                self._transport.close()
        elif isinstance(value, commands.Connection.Blocked | commands.Connection.Unblocked):
            log.warning("[RabbitMQ] " + value.name, reason=getattr(value, "reason", ""))
        else:
            self._replies.put_nowait(value)

    def _returned_if_complete(self, received: int) -> None:
        if self._returning is None:
            return
        ids, remaining = self._returning
        remaining -= received
        if remaining > 0:
            self._returning = (ids, remaining)
            return
        # Returned before its confirm: the confirm then reports it as not stored.
        self._returned[ids] += 1
        self._returning = None

    def _confirm(self, tag: int, multiple: bool, refusal: str | None) -> None:
        if multiple:
            # Tags were added in increasing order: those up to `tag` come first.
            tags = list(itertools.takewhile(lambda each: each <= tag, self._unconfirmed))
        else:
            tags = [tag]
        for each in tags:
            entry = self._unconfirmed.pop(each, None)
            if entry is None:
                continue
            confirm, ids = entry
            error = refusal
            if self._returned and self._returned[ids] > 0:
                self._returned[ids] -= 1
                error = "unroutable: no queue took the message"
            if confirm.done():  # its publisher gave up waiting
                continue
            if error is None:
                confirm.set_result(None)
            else:
                confirm.set_exception(PublishError(error))

    def _fail(self, error: PublishError) -> None:
        if self.lost.is_set():
            return
        self.lost.set()
        if self._heartbeats is not None:
            self._heartbeats.cancel()
        self._replies.put_nowait(error)
        unconfirmed, self._unconfirmed = self._unconfirmed, {}
        for confirm, _ in unconfirmed.values():
            if not confirm.done():
                confirm.set_exception(error)

    def _send(self, channel: int, value: Any) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(frame.marshal(value, channel))

    def _beat(self) -> None:
        """Heartbeats at half the agreed interval; a broker silent for two is given up on."""
        if self._loop.time() - self._last_received > 2 * self._heartbeat_s:
            if self._transport is not None:
                self._transport.abort()
            return
        self._send(0, heartbeat.Heartbeat())
        self._heartbeats = self._loop.call_later(self._heartbeat_s / 2, self._beat)


class ConfirmedPublisher:
    """Publishes persistent JSON messages to durable queues (declared on first use), mandatory
    (an unroutable message is an error) and confirmed by the broker.

    It speaks AMQP itself on one connection with one channel: a batch of messages leaves in one
    socket write and its confirms are awaited together. aio-pika wrote and awaited each message
    on its own, which cost the outbox relay more CPU than everything else it did per event.
    After an outage it reconnects in the background, and on the next publish at the latest.
    """

    def __init__(self, url: str, queue_type: QueueType) -> None:
        self.url = url
        self.queue_type = queue_type
        self._endpoint = _Endpoint.from_url(url)
        self._connection: _Connection | None = None
        self._opening: asyncio.Task[_Connection] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.lost.is_set()

    async def connect(self) -> None:
        """Connects, or joins an attempt under way; a no-op while connected. Shielded: an
        attempt cancelled half-way would leave an open connection nobody closes."""
        self._closed = False
        await self._connected()

    async def _connected(self) -> _Connection:
        if self._connection is not None and not self._connection.lost.is_set():
            return self._connection
        if self._opening is None or self._opening.done():
            self._opening = asyncio.create_task(self._open())
        return await asyncio.shield(self._opening)

    async def _open(self) -> _Connection:
        endpoint = self._endpoint
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, connection = await loop.create_connection(
                _Connection,
                endpoint.host,
                endpoint.port,
                ssl=ssl.create_default_context() if endpoint.tls else None,
            )
            try:
                await connection.open(endpoint)
            except BaseException:
                await connection.close()
                raise
        self._connection = connection
        self._reconnecting = asyncio.create_task(self._reconnect_when_lost(connection))
        return connection

    async def _reconnect_when_lost(self, connection: _Connection) -> None:
        await connection.lost.wait()
        backoff = Backoff(initial_s=0.5, max_s=5.0)
        while not self._closed:
            try:
                await self._connected()
                return
            except (OSError, TimeoutError, PublishError) as exc:
                delay = backoff.failed()
                if backoff.should_log:
                    log.warning(
                        "RabbitMQ publisher cannot reconnect, will retry",
                        url=describe_url(self.url),
                        error=exc,
                        retry_in_s=delay,
                    )
                await asyncio.sleep(delay)

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
    ) -> None:
        """Raises `PublishError` (or OSError, TimeoutError) when the message was not stored."""
        (error,) = await self.publish_many(
            queue, [OutgoingMessage(body, message_id, correlation_id)]
        )
        if error is not None:
            raise error

    async def publish_many(
        self, queue: str, messages: Sequence[OutgoingMessage]
    ) -> list[BaseException | None]:
        """Sends the messages in one write and waits for every confirm; for each message, None
        when the broker stored it, else why not. Raises only when nothing could be sent."""
        connection = await self._connected()
        if queue not in connection.declared:
            await connection.call(
                _CHANNEL,
                commands.Queue.Declare(
                    queue=queue, durable=True, arguments=queue_arguments(self.queue_type)
                ),
            )
            connection.declared.add(queue)
        results: list[BaseException | None] = await asyncio.gather(
            *connection.publish(queue, messages), return_exceptions=True
        )
        if any(isinstance(result, PublishError) for result in results):
            # Returned as unroutable, say: the queue was deleted under a live connection.
            # The next attempt declares it again.
            connection.declared.discard(queue)
        return results

    async def close(self) -> None:
        self._closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self._opening is not None:
            await asyncio.wait({self._opening})  # only waits: a failed attempt has raised
        if self._connection is not None:
            await self._connection.close()
        self._connection = None


def describe_url(url: str) -> str:
    """A broker URL fit for a log line: no password, no webhook code."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return mask_secrets(f"{parts.scheme}://{host}{port}{parts.path}")
