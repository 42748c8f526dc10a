"""The reply consumer: Bitrix replies from ``RABBITMQ_REPLY_QUEUE`` applied to the users table.

Acknowledged by hand, after the database commit: a crash before it means a redelivery, which
the rules in `sync.service` make harmless. A reply that cannot be read or applied is logged
and acknowledged, so it never blocks the queue; only an unreachable database (or a conflict
with a concurrent transaction) makes a reply go back to the queue, after a pause so that an
outage does not spin. Up to `REPLY_CONCURRENCY` replies are handled at once.

Replies that arrive together are applied together (`ReplyApplier`): one transaction for a group,
which saves a BEGIN and a COMMIT per reply, a third of what a reply cost Core. A group locks its
users in id order, so two groups never wait for each other in a circle; a user's row lock orders
the replies of one user, and their order never mattered since each is tied to the event it
answers. When a group fails for a reason one reply could cause (a conflict, a bug), each of its
replies is applied again alone, so one bad reply holds up only itself.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from faststream.message import StreamMessage
from faststream.middlewares import AckPolicy
from faststream.rabbit import Channel, RabbitBroker
from faststream.rabbit.message import RabbitMessage
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.batching import Coalescer
from b24sync.contracts import MalformedMessageError, ReplyData, parse_reply
from b24sync.core.db import committing, database_unavailable, one_item_to_blame
from b24sync.core.sync.service import Outcome, reply_service
from b24sync.logs import get_logger, shorten
from b24sync.messaging import durable_queue
from b24sync.settings import Settings

log = get_logger(__name__)

RETRY_PAUSE_S = 1.0
# Groups of replies being applied at once: replies that arrive while one commits make the
# next one fuller (measured cheaper per reply than two at a time).
GROUPS_IN_FLIGHT = 1
_LOGGED_BODY_CHARS = 2000
# SQLSTATEs of a transaction PostgreSQL rolled back for a conflict with another (serialization
# failure, deadlock): the same reply applies once tried again.
_CONFLICT_STATES = frozenset({"40001", "40P01"})


def _is_conflict(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in _CONFLICT_STATES


@dataclass(frozen=True, slots=True)
class IncomingReply:
    reply: ReplyData
    # The AMQP property: the id of the event it answers, when the sender set it.
    correlation_id: str | None


class ReplyApplier:
    """Applies replies, those that arrive together in one transaction (see the module's
    docstring); a reply alone is applied at once."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], settings: Settings) -> None:
        self._sessionmaker = sessionmaker
        self._settings = settings
        self._groups: Coalescer[IncomingReply, Outcome] = Coalescer(
            self._apply_group,
            max_in_flight=GROUPS_IN_FLIGHT,
            max_items=settings.reply_concurrency,
            retry_alone=one_item_to_blame,
        )

    async def apply(self, reply: ReplyData, correlation_id: str | None) -> Outcome:
        return await self._groups.submit(IncomingReply(reply, correlation_id))

    async def _apply_group(self, group: list[IncomingReply]) -> list[Outcome]:
        """The outcomes in the group's order; the replies applied in their users' id order."""
        in_lock_order = sorted(range(len(group)), key=lambda n: group[n].reply.target_user_id)
        async with committing(self._sessionmaker) as session:
            applied = await reply_service.apply_many(
                session,
                self._settings,
                [(group[n].reply, group[n].correlation_id) for n in in_lock_order],
            )
        outcomes = dict(zip(in_lock_order, applied, strict=True))
        return [outcomes[n] for n in range(len(group))]


async def handle_reply(
    body: bytes, applier: ReplyApplier, *, correlation_id: str | None = None
) -> bool:
    """Applies one reply (`correlation_id`: the AMQP property, the id of the event it answers,
    when the sender set it); returns False when it should be retried later."""
    text = body.decode("utf-8", errors="replace")
    log.info(f"[Core] Bitrix Response Received: {shorten(text, _LOGGED_BODY_CHARS)}")
    try:
        reply = parse_reply(body)
    except MalformedMessageError as exc:
        log.warning("[Core] Malformed reply dropped", reason=str(exc))
        return True
    user_id = reply.target_user_id
    try:
        outcome = await applier.apply(reply, correlation_id)
    except Exception as exc:
        if database_unavailable(exc):
            log.warning("[Core] Reply not applied, database unavailable; will retry", error=exc)
            return False
        if not isinstance(exc, DBAPIError):
            raise
        if _is_conflict(exc):
            log.info("[Core] Reply met a concurrent change; will retry", user_id=user_id)
            return False
        log.error("[Core] Reply rejected by the database, dropped", user_id=user_id, error=exc)
        return True
    quiet = (Outcome.APPLIED, Outcome.UNCHANGED, Outcome.DUPLICATE)
    log_method = log.info if outcome in quiet else log.warning
    log_method(
        "[Core] Reply processed",
        outcome=outcome.value,
        user_id=user_id,
        status=reply.status.value,
        version=reply.version,
        correlation_id=correlation_id,
    )
    return True


async def _whole_message(message: StreamMessage[Any]) -> StreamMessage[Any]:
    """The handler gets the delivery itself (the broker injects nothing): the body stays
    undecoded for `parse_reply` to read and report on, and the ack is the handler's."""
    return message


def register_reply_consumer(
    broker: RabbitBroker,
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    slots = asyncio.Semaphore(settings.reply_concurrency)
    applier = ReplyApplier(sessionmaker, settings)
    running: set[asyncio.Task[None]] = set()

    @broker.subscriber(
        durable_queue(settings.rabbitmq_reply_queue, settings.rabbitmq_queue_type),
        # Deliveries beyond the replies being applied wait in RabbitMQ, not in this process.
        channel=Channel(prefetch_count=2 * settings.reply_concurrency),
        ack_policy=AckPolicy.MANUAL,
        decoder=_whole_message,
    )
    async def on_reply(message: RabbitMessage) -> None:
        # Returns once the reply has a slot: the next delivery is read meanwhile.
        await slots.acquire()
        task = asyncio.create_task(_settle(message))
        running.add(task)
        task.add_done_callback(running.discard)
        task.add_done_callback(lambda _: slots.release())

    async def _settle(message: RabbitMessage) -> None:
        # FastStream makes a correlation id up when the message has none: read the real one.
        correlation_id = message.raw_message.correlation_id
        try:
            done = await handle_reply(message.body, applier, correlation_id=correlation_id)
        except Exception as exc:  # a bug must not stall the queue or the consumer
            log.exception("[Core] Reply handling failed, dropped", error=exc)
            done = True
        if done:
            await message.ack()
        else:
            await asyncio.sleep(RETRY_PAUSE_S)
            await message.nack(requeue=True)
