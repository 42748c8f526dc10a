"""RabbitMQ events -> BullMQ jobs.

Messages are handled one at a time, in queue order, and acknowledged only once their job is in
Redis (or once a bad message has been answered). The job id is the AMQP `message_id`, so a
redelivery after a crash between the add and the ack finds the job already there. Producers that
send no `message_id` (the seed's NestJS Core) get a job id derived from the body; see `_job_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from typing import Any
from uuid import uuid4

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from bullmq import Queue
from pydantic import ValidationError
from redis.exceptions import RedisError

from b24sync.bitrix import metrics
from b24sync.bitrix.jobs import JOB_NAME, JobPayload
from b24sync.bitrix.replies import ReplySender
from b24sync.bitrix.state import UserLocks
from b24sync.contracts.messages import (
    ACTION_BY_PATTERN,
    Action,
    Event,
    Pattern,
    ReplyData,
    ReplyStatus,
    UserPayload,
)
from b24sync.logs import get_logger
from b24sync.messaging import queue_arguments
from b24sync.settings import Settings

log = get_logger(__name__)

MISSING_PHONE = "Missing phone number"
MISSING_STAGE = "Missing stage"


class RejectedEvent(Exception):
    """An event we answer with an error reply instead of a job."""


class EventConsumer:
    def __init__(
        self, settings: Settings, queue: Queue, locks: UserLocks, replies: ReplySender
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._locks = locks
        self._replies = replies
        self._connection: AbstractRobustConnection | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self._settings.rabbitmq_url)
        queue = await self._open_queue()
        self._task = asyncio.create_task(self._consume(queue))
        log.info(f"[Bitrix] Consuming events from queue: {self._settings.rabbitmq_queue}")

    async def stop(self) -> None:
        """Stops consuming; messages not yet acknowledged go back to the queue."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await self._task
                except Exception as exc:  # The channel broke while closing; nothing to keep.
                    log.warning(f"[Bitrix] Consumer closed with an error: {exc}")
            self._task = None
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def _open_queue(self) -> AbstractQueue:
        assert self._connection is not None
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._settings.rabbitmq_prefetch)
        return await channel.declare_queue(
            self._settings.rabbitmq_queue,
            durable=True,
            arguments=queue_arguments(self._settings.rabbitmq_queue_type),
        )

    async def _consume(self, queue: AbstractQueue) -> None:
        while True:
            try:
                async with queue.iterator() as messages:
                    async for message in messages:
                        await self.handle(message)
            except Exception as exc:
                # A channel closed by the broker is not restored by the robust connection.
                log.error(f"[Bitrix] Consuming stopped ({exc}); resuming in 1s")
                await asyncio.sleep(1)
                with contextlib.suppress(Exception):
                    queue = await self._open_queue()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._route(message)
        except RejectedEvent as exc:
            metrics.EVENTS.labels(outcome="rejected").inc()
            log.warning(f"[Bitrix] Rejected event: {exc}")
            await self._reply_rejected(message.body, str(exc), message.message_id)
        except Exception as exc:
            # A bug must not stop the service or redeliver the message forever: answer and drop.
            metrics.EVENTS.labels(outcome="rejected").inc()
            log.exception(f"[Bitrix] Could not handle an event: {type(exc).__name__}")
            await self._reply_rejected(
                message.body, f"internal error: {type(exc).__name__}", message.message_id
            )
        try:
            await message.ack()
        except Exception as exc:
            # The channel broke: RabbitMQ redelivers the message and its job id dedupes it.
            log.warning(f"[Bitrix] Could not acknowledge a message ({exc}); it will be redelivered")

    async def _route(self, message: AbstractIncomingMessage) -> None:
        event = parse(message.body)
        log.info(
            f"[Bitrix] Received {event.pattern.value} event: "
            + json.dumps(event.wire(), ensure_ascii=False)
        )
        check(event)
        await self._enqueue(message, JobPayload(event=event, message_id=message.message_id or None))

    async def _enqueue(self, message: AbstractIncomingMessage, payload: JobPayload) -> None:
        """Adds the job unless it exists, waiting out Redis outages: the message stays
        unacknowledged meanwhile, so nothing is lost and a shutdown hands it back to RabbitMQ."""
        delay_s = 0.5
        while True:
            try:
                job_id = await self._job_id(message)
                if await self._queue.getJob(job_id) is not None:
                    metrics.EVENTS.labels(outcome="duplicate").inc()
                    log.info(f"[Bitrix] Job {job_id} is already in the queue; duplicate dropped")
                    return
                await self._queue.add(JOB_NAME, payload.wire(), {"jobId": job_id})
                break
            except (RedisError, OSError) as exc:
                log.error(f"[Bitrix] Could not queue the job ({exc}); retrying in {delay_s}s")
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 10.0)
        metrics.EVENTS.labels(outcome="queued").inc()
        log.info(f"[Bitrix] Job added to queue with ID: {job_id}")
        user_id = payload.event.data.user.id
        try:
            # The user's turns follow the queue's order (see UserLocks).
            await self._locks.enqueue(user_id, job_id)
        except (RedisError, OSError) as exc:
            log.warning(f"[Bitrix] Job {job_id} runs without waiting for its turn: {exc}")

    async def _job_id(self, message: AbstractIncomingMessage) -> str:
        if message.message_id:
            return message.message_id
        # Without a message id only a redelivery (flagged by RabbitMQ) can repeat a message we
        # have seen. A fresh delivery with the same body is a new event (a user changed back
        # and forth) and gets its own job, or it would be lost.
        digest = hashlib.sha256(message.body).hexdigest()
        if message.redelivered or await self._queue.getJob(digest) is None:
            return digest
        return f"{digest}-{uuid4().hex[:12]}"

    async def _reply_rejected(self, body: bytes, reason: str, message_id: str | None) -> None:
        """The error reply for a message that makes no job, when it names a user to reply about."""
        target = reply_target(body, self._settings.rabbitmq_reply_queue)
        if target is None:
            log.warning("[Bitrix] No user id in the rejected event; no reply sent")
            return
        queue, user, action = target
        data = ReplyData(
            status=ReplyStatus.ERROR, action=action, user=user, attempts=1, reason=reason
        )
        try:
            await self._replies.send(queue, data, correlation_id=message_id or None)
        except Exception as exc:
            log.error(f"[Bitrix] Could not send the error reply to {queue}: {exc}")


def parse(body: bytes) -> Event:
    """The event in a message body; `RejectedEvent` with a readable reason otherwise."""
    try:
        raw = json.loads(body)
    except ValueError as exc:
        raise RejectedEvent(f"Invalid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise RejectedEvent("Invalid event: the body is not a JSON object")
    pattern = raw.get("pattern")
    if pattern not in Pattern.__members__.values():
        raise RejectedEvent(f"Unknown pattern: {pattern!r}")
    try:
        return Event.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_url=False)
        )
        raise RejectedEvent(f"Invalid event: {problems}") from None


def check(event: Event) -> None:
    """What Bitrix24 cannot act on, answered at once without calling it."""
    action = event.data.action
    user = event.data.user
    if ACTION_BY_PATTERN[event.pattern] is not action:
        raise RejectedEvent(
            f"Invalid event: action {action.value!r} does not match pattern {event.pattern.value!r}"
        )
    if action is Action.CREATE_CARD and not (user.phone or "").strip():
        raise RejectedEvent(MISSING_PHONE)
    if action is Action.MOVE_CARD and not (user.stage or "").strip():
        raise RejectedEvent(MISSING_STAGE)


def reply_target(body: bytes, default_queue: str) -> tuple[str, UserPayload, Action | None] | None:
    """Reply queue, user and action of a rejected message, as far as they can be read."""
    try:
        raw = json.loads(body)
    except ValueError:
        return None
    data: Any = raw.get("data") if isinstance(raw, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("user"), dict):
        return None
    raw_user: dict[str, Any] = data["user"]
    try:
        user = UserPayload.model_validate(raw_user)
    except ValidationError:
        try:
            user = UserPayload.model_validate({"id": raw_user.get("id")})
        except ValidationError:
            return None
    queue = data.get("replyQueue")
    action = data.get("action")
    return (
        queue if isinstance(queue, str) and queue else default_queue,
        user,
        Action(action) if isinstance(action, str) and action in set(Action) else None,
    )
