"""RabbitMQ events -> BullMQ jobs.

Messages are read in queue order and acknowledged only once their job is in Redis (or once a
bad message has been answered): whatever a message holds, its handling ends in an
acknowledgement. One job carries the events that arrived while the previous add was out, and
under load during a short gap after it (up to the prefetch), so BullMQ's cost of a job is
shared by them: two script calls add a group.
Each event is marked in Redis with its job's id under its key, the AMQP `message_id` (see
`marks.EventMarks`): a redelivery after a crash between the add and the ack finds its event
held and makes no second job, while an event sent again after its answer (Core resends an
event whose reply was lost) runs again. Producers that send no `message_id` (the seed's NestJS
Core) get a key derived from the body; see `_place`.

What the service refuses, it answers with an error reply when it can tell whom about: bodies
that are no JSON or nested too deeply, larger than `bitrix_event_max_bytes`, fields beyond the
contract's bounds, user ids outside 1..2^63-1. Replies go only to the configured reply queue:
an event naming another queue is refused with a log line, and no queue is created for it.
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

from b24sync.batching import Coalescer
from b24sync.bitrix import metrics
from b24sync.bitrix.jobs import JOB_NAME, JobPayload, QueuedEvent
from b24sync.bitrix.marks import EventMarks
from b24sync.bitrix.replies import ReplySender
from b24sync.contracts.messages import (
    ACTION_BY_PATTERN,
    Action,
    Event,
    Pattern,
    ReplyData,
    ReplyStatus,
    UserPayload,
)
from b24sync.logs import get_logger, shorten
from b24sync.messaging import queue_arguments
from b24sync.settings import Settings

log = get_logger(__name__)

MISSING_PHONE = "Missing phone number"
MISSING_STAGE = "Missing stage"
# Under load, a job is added no sooner than this after the one before unless it is full: a
# job's Redis cost is shared by its events, and under load its events wait longer than this in
# the queue anyway. A lone event after a quiet spell is added at once.
JOB_FILL_GAP_S = 0.3
# Longest event or value a log line carries.
LOGGED_CHARS = 1000
QUOTED_CHARS = 100


class RejectedEvent(Exception):
    """An event we answer with an error reply instead of a job. `raw` is the body as far as it
    was read (to find whom to reply about)."""

    def __init__(self, reason: str, raw: Any = None) -> None:
        super().__init__(reason)
        self.raw = raw


# An event to queue, and the message it came in.
NewEvent = tuple[AbstractIncomingMessage, Event]


class EventConsumer:
    def __init__(
        self, settings: Settings, queue: Queue, marks: EventMarks, replies: ReplySender
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._marks = marks
        self._replies = replies
        self._connection: AbstractRobustConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._handling: set[asyncio.Task[None]] = set()
        # One add out at a time: jobs are added in the order their messages came. Under load
        # a job waits up to JOB_FILL_GAP_S after the one before to take in more events.
        self._adds: Coalescer[NewEvent, tuple[str, bool]] = Coalescer(
            self._add_jobs,
            max_in_flight=1,
            max_items=max(1, settings.rabbitmq_prefetch),
            gap_s=JOB_FILL_GAP_S,
        )

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
        for task in list(self._handling):
            task.cancel()
        await asyncio.gather(*self._handling, return_exceptions=True)
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
                        # Handled beside the next ones (at most the prefetch at once), so that
                        # their jobs are added together.
                        task = asyncio.create_task(self.handle(message))
                        self._handling.add(task)
                        task.add_done_callback(self._handling.discard)
            except Exception as exc:
                # A channel closed by the broker is not restored by the robust connection. The
                # old channel is closed first: messages it still holds go back to the queue.
                log.error(f"[Bitrix] Consuming stopped ({exc}); resuming in 1s")
                with contextlib.suppress(Exception):
                    await queue.channel.close()
                await asyncio.sleep(1)
                with contextlib.suppress(Exception):
                    queue = await self._open_queue()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Queues the event's job or answers the refusal; acknowledges the message either way."""
        try:
            await self._route(message)
        except RejectedEvent as exc:
            metrics.EVENTS.labels(outcome="rejected").inc()
            log.warning(f"[Bitrix] Rejected event: {shorten(str(exc), LOGGED_CHARS)}")
            await self._reply_rejected(exc, message.message_id)
        except Exception as exc:
            # A bug must not stop the service or redeliver the message forever: answer and drop.
            metrics.EVENTS.labels(outcome="rejected").inc()
            log.exception(f"[Bitrix] Could not handle an event: {type(exc).__name__}")
            await self._reply_rejected(
                RejectedEvent(f"internal error: {type(exc).__name__}"), message.message_id
            )
        try:
            await message.ack()
        except Exception as exc:
            # The channel broke: RabbitMQ redelivers the message and its job id dedupes it.
            log.warning(f"[Bitrix] Could not acknowledge a message ({exc}); it will be redelivered")

    async def _route(self, message: AbstractIncomingMessage) -> None:
        body = message.body
        limit = self._settings.bitrix_event_max_bytes
        if len(body) > limit:
            raise RejectedEvent(
                f"Event too large: {len(body)} bytes, at most {limit}", raw=_readable(body)
            )
        raw = decode(body)
        try:
            event = to_event(raw)
            log.info(
                f"[Bitrix] Received {event.pattern.value} event: "
                + shorten(json.dumps(event.wire(), ensure_ascii=False), LOGGED_CHARS)
            )
            check(event)
        except RejectedEvent as exc:
            raise RejectedEvent(str(exc), raw) from None
        named = event.data.reply_queue if "reply_queue" in event.data.model_fields_set else None
        if named is not None and named != self._settings.rabbitmq_reply_queue:
            metrics.EVENTS.labels(outcome="rejected").inc()
            log.warning(
                f"[Bitrix] Rejected event for user {event.data.user.id}: reply queue "
                f"{shorten(repr(named), QUOTED_CHARS)} is not the configured "
                f"{self._settings.rabbitmq_reply_queue!r}; no reply sent"
            )
            return
        data = event.data.model_copy(update={"reply_queue": self._settings.rabbitmq_reply_queue})
        event = event.model_copy(update={"data": data})
        await self._enqueue(message, event)

    async def _enqueue(self, message: AbstractIncomingMessage, event: Event) -> None:
        job_id, added = await self._adds.submit((message, event))
        if not added:
            metrics.EVENTS.labels(outcome="duplicate").inc()
            log.info(f"[Bitrix] Job {job_id} already holds this event; duplicate dropped")
            return
        metrics.EVENTS.labels(outcome="queued").inc()
        log.info(f"[Bitrix] Job added to queue with ID: {job_id}")

    async def _add_jobs(self, events: list[NewEvent]) -> list[tuple[str, bool]]:
        """Adds one job for the events that no live job holds yet, in the order they came:
        for each event, the id of the job that holds it and whether that is the new one (not
        a duplicate). Waits out Redis outages: the messages stay unacknowledged meanwhile, so
        nothing is lost and a shutdown hands them back to RabbitMQ."""
        job_id = uuid4().hex
        delay_s = 0.5
        while True:
            try:
                placed = await self._place(job_id, [message for message, _ in events])
                new = [
                    QueuedEvent(event=event, message_id=message.message_id or None, key=key)
                    for (message, event), (key, _, added) in zip(events, placed, strict=True)
                    if added
                ]
                if new:
                    await self._queue.add(
                        JOB_NAME, JobPayload(events=new).wire(), {"jobId": job_id}
                    )
                return [(holder, added) for _, holder, added in placed]
            except (RedisError, OSError) as exc:
                log.error(f"[Bitrix] Could not queue jobs ({exc}); retrying in {delay_s}s")
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 10.0)

    async def _place(
        self, job_id: str, messages: list[AbstractIncomingMessage]
    ) -> list[tuple[str, str, bool]]:
        """Each message's event key, the job that holds the event, and whether that is the
        new job `job_id` (False: a duplicate of an event a live job, or an earlier message of
        the group, holds already).

        The key is the message id. Without one, only a redelivery (flagged by RabbitMQ) can
        repeat a message we have seen: a fresh delivery with the body of an earlier one is a
        new event (a user changed back and forth) and gets a key of its own, or it would be
        lost. The keys depend only on the messages and `job_id`, so a retried add marks the
        same ones."""
        keys: list[str] = []
        for index, message in enumerate(messages):
            key = message.message_id or hashlib.sha256(message.body).hexdigest()
            if key in keys and _new_copy(message):
                key = f"{key}-{job_id}-{index}"
            keys.append(key)
        held = await self._marks.mark(job_id, list(dict.fromkeys(keys)))
        holders: dict[str, str] = {}
        placed: list[tuple[str, str, bool]] = []
        taken_over: list[str] = []
        for index, (message, key) in enumerate(zip(messages, keys, strict=True)):
            if key in holders:  # a copy of an earlier message of the group
                placed.append((key, holders[key], False))
                continue
            holder = held.get(key)
            if holder is not None and _new_copy(message):
                key, holder = f"{key}-{job_id}-{index}", None
                taken_over.append(key)
            elif holder is not None and not await self._live(holder):
                log.info(f"[Bitrix] Job {holder} had finished; its event came again, running it")
                taken_over.append(key)
                holder = None
            holders[key] = holder or job_id
            placed.append((key, holders[key], holder is None))
        await self._marks.take_over(job_id, taken_over)
        return placed

    async def _live(self, job_id: str) -> bool:
        """Whether the job still waits, is delayed or runs."""
        return await self._queue.getJobState(job_id) not in ("completed", "failed", "unknown")

    async def _reply_rejected(self, rejected: RejectedEvent, message_id: str | None) -> None:
        """The error reply for a message that makes no job, when it names a user to reply about
        and no other queue than the configured one."""
        target = reply_target(rejected.raw, self._settings.rabbitmq_reply_queue)
        if target is None:
            log.warning("[Bitrix] No user id or no queue of ours in the rejected event; no reply")
            return
        queue, user, action = target
        data = ReplyData(
            status=ReplyStatus.ERROR,
            action=action,
            user=user,
            attempts=1,
            reason=str(rejected),
            retryable=False,
        )
        try:
            await self._replies.send(queue, data, correlation_id=message_id or None)
        except Exception as exc:
            log.error(f"[Bitrix] Could not send the error reply to {queue}: {exc}")


def _new_copy(message: AbstractIncomingMessage) -> bool:
    """A first delivery without a message id: a body seen before is a new event all the same."""
    return not message.message_id and not message.redelivered


def _readable(body: bytes) -> Any:
    """The JSON in a body, or None when there is none to read."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def decode(body: bytes) -> Any:
    """The JSON in a message body; `RejectedEvent` when there is none."""
    try:
        return json.loads(body)
    except RecursionError:
        # CPython's decoder recurses per level: a deep enough body exhausts the stack.
        raise RejectedEvent("Invalid JSON: nested too deeply") from None
    except ValueError as exc:
        raise RejectedEvent(f"Invalid JSON: {exc}") from None


def to_event(raw: Any) -> Event:
    """The event in a decoded body; `RejectedEvent` with a readable reason otherwise."""
    if not isinstance(raw, dict):
        raise RejectedEvent("Invalid event: the body is not a JSON object")
    pattern = raw.get("pattern")
    if pattern not in Pattern.__members__.values():
        raise RejectedEvent(f"Unknown pattern: {shorten(repr(pattern), QUOTED_CHARS)}")
    try:
        return Event.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_url=False)
        )
        raise RejectedEvent(f"Invalid event: {problems}") from None


def parse(body: bytes) -> Event:
    """The event in a message body; `RejectedEvent` with a readable reason otherwise."""
    return to_event(decode(body))


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


def reply_target(raw: Any, reply_queue: str) -> tuple[str, UserPayload, Action | None] | None:
    """Reply queue, user and action of a rejected message, as far as they can be read; None
    when it names no valid user or a reply queue other than `reply_queue`."""
    data: Any = raw.get("data") if isinstance(raw, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("user"), dict):
        return None
    named = data.get("replyQueue", reply_queue)
    if named != reply_queue:
        return None
    raw_user: dict[str, Any] = data["user"]
    try:
        user = UserPayload.model_validate(raw_user)
    except ValidationError:
        try:
            user = UserPayload.model_validate({"id": raw_user.get("id")})
        except ValidationError:
            return None
    action = data.get("action")
    return (
        reply_queue,
        user,
        Action(action) if isinstance(action, str) and action in set(Action) else None,
    )
