"""The outbox relay: publishes committed events to RabbitMQ, each user's in commit order, at
least once.

A child process of `b24sync core` runs it (``OUTBOX_RELAY_PROCESS``, the default; see
`core/outbox/process.py`), or else every HTTP worker runs one. In each batch transaction a relay
takes a transaction-level advisory lock, so only one publishes at a time, reading pending
events in ``seq`` order (for one user that is commit order: its changes are serialised by the
row lock); lock, read and mark are one statement. A batch goes out in waves with at most one
event per user; the next wave starts only once the broker confirmed the previous one, and the
transaction commits its marks only then (those of events that did not go out are taken back
first). A crash anywhere before the commit leaves the batch unpublished, and whichever relay
runs next sends it again (same message_id): duplicates are possible, losses are not.

The relay publishes through a connection of its own (`ConfirmedPublisher`): a wave leaves in
one socket write and its confirms are awaited together. It keeps trying while RabbitMQ or
PostgreSQL is down, and the publisher reconnects after an outage.

At least once means end to end, too: a user's latest event that the Bitrix service never
answered (its job lost with Redis's data, its reply lost) is sent again after
``sync_resend_after_s``, with the same message_id, and again after twice as long, until an
answer comes (`resend_unanswered`).

Beyond the Bitrix service's own attempts, users whose latest change failed for a transient
reason are sent again by the relay as new events, when their retry is due (`retry_due`); while
retries wait, one goes early now and then as a probe of the portal. Both sweeps run under the
relay lock, so one relay does them at a time.

A relay is woken by NOTIFY from the write transactions (a raw asyncpg LISTEN connection) and
polls every ``outbox_poll_interval_s`` in case a notification was missed. Under load it does not
listen: each batch is followed by a wait for company (the gap), and the batch after it reads
whatever was committed meanwhile, so every write's notification would only wake it for nothing
(a sixth of the relay's CPU, and a twentieth of PostgreSQL's, at 2,000 writes a second). When the
load stops it listens again, and reads the outbox once more before it waits: what was committed
while it did not listen was never notified.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import suppress
from typing import Any
from uuid import UUID

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from b24sync.batching import LoadGap
from b24sync.contracts import event_body
from b24sync.core.backoff import Backoff
from b24sync.core.db import asyncpg_dsn
from b24sync.core.outbox import repository
from b24sync.core.outbox.repository import PendingEvent
from b24sync.core.sync.service import resync_service
from b24sync.logs import get_logger
from b24sync.messaging import ConfirmedPublisher, OutgoingMessage, describe_url
from b24sync.settings import Settings

log = get_logger(__name__)

PUBLISH_TIMEOUT_S = 10.0
# Unanswered events are looked for every sync_resend_after_s / 2, and at least this often.
RESEND_CHECK_MAX_INTERVAL_S = 60.0
# Users whose retry is due are looked for this often.
RETRY_CHECK_INTERVAL_S = 1.0
# After a batch of n events the next one begins no sooner than n times this (at most
# OUTBOX_BATCH_GAP_MS) after it (`LoadGap`): above about 500 events a second batches grow until
# the gap is the whole of the setting (fewer transactions and confirms per event); below it
# they shrink towards one event, which leaves at once.
BATCH_GAP_PER_EVENT_S = 0.002
# A relay whose batch set a gap at least this long (see `LoadGap`) does not listen until the next
# batch: every write's notification would wake it for nothing. A shorter gap (a batch of a few
# events) is not worth the LISTEN, UNLISTEN and extra read it costs.
QUIET_FROM_GAP_S = 0.01
# The longest LISTEN or UNLISTEN may take before the connection is given up (and opened again).
LISTEN_TIMEOUT_S = 5.0
_LISTEN = f'LISTEN "{repository.NOTIFY_CHANNEL}"'
_UNLISTEN = f'UNLISTEN "{repository.NOTIFY_CHANNEL}"'


def waves(events: list[PendingEvent]) -> list[list[PendingEvent]]:
    """Groups seq-ordered events so that a user's k-th event is in group k: a group holds at
    most one event per user and can be published all at once."""
    result: list[list[PendingEvent]] = []
    depth: dict[int, int] = {}
    for event in events:
        level = depth.get(event.user_id, 0)
        depth[event.user_id] = level + 1
        if level == len(result):
            result.append([])
        result[level].append(event)
    return result


def wire_body(stored: dict[str, Any], bitrix_lead_id: int | None) -> dict[str, Any]:
    """The stored event in the contract's key order (jsonb keeps its own order), with the
    user's lead id as it is now: one learnt after the event was recorded goes out with it.

    Core wrote the body in the contract's shape (`event_body`), so only the order needs
    restoring, not a second validation; that is one model build less per event on the relay.
    """
    try:
        data = stored["data"]
        return event_body(
            stored["pattern"],
            data["action"],
            {**data["user"], "bitrix_lead_id": bitrix_lead_id},
            data["replyQueue"],
            data.get("changed"),
            force=bool(data.get("force")),
        )
    except (KeyError, TypeError):
        return stored  # only Core writes the outbox; never hold the queue up over one event


class Relay:
    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine
        self._publisher = ConfirmedPublisher(settings.rabbitmq_url, settings.rabbitmq_queue_type)
        self._wakeup = asyncio.Event()
        # The LISTEN connection, once it listens (None while it is being opened), and whether
        # the relay listens on it: not while it waits out a gap under load (`run`).
        self._listener: asyncpg.Connection | None = None
        self._listening = True
        # Set once first connected; later outages are the publisher's own to recover from.
        self.connected = asyncio.Event()
        self._next_resend_check = 0.0
        self._next_retry_check = 0.0
        self._last_retry_sent = 0.0
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._gap = LoadGap(settings.outbox_batch_gap_ms / 1000, BATCH_GAP_PER_EVENT_S)
        # Bound once, with the logging configured when the relay is built: the line per
        # message costs a third less than through the module's lazy logger.
        self._log = log.bind()

    async def run(self) -> None:
        """Publishes until cancelled; failures (broker or database down) only delay it."""
        listener = asyncio.create_task(self._listen(), name="outbox-listen")
        backoff = Backoff()
        loop = asyncio.get_running_loop()
        try:
            while True:
                self._wakeup.clear()
                try:
                    await self._resend_when_due()
                    await self._retry_when_due()
                    started = loop.time()
                    sent = await self.publish_batch()
                    while sent >= self.settings.outbox_batch_size:
                        sent = await self.publish_batch()
                    # Under load, the next batch waits to take in the events of the next moments.
                    self._gap.left(sent, started)
                except Exception as exc:
                    delay = backoff.failed()
                    if backoff.should_log:
                        log.warning(
                            "[Core] Outbox relay cannot publish, will retry",
                            error=exc,
                            failures=backoff.failures,
                            retry_in_s=delay,
                        )
                    await asyncio.sleep(delay)
                    continue
                if backoff.reset():
                    log.info("[Core] Outbox relay publishing again")
                if self._gap.last_gap_s >= QUIET_FROM_GAP_S:
                    # Under load: the next batch reads whatever is committed meanwhile.
                    await self._set_listening(False)
                    await asyncio.sleep(self._gap.wait_s(loop.time()))
                    continue
                if await self._set_listening(True):
                    continue  # what was committed while it did not listen was never notified
                with suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wakeup.wait(), self.settings.outbox_poll_interval_s
                    )
                if wait_s := self._gap.wait_s(loop.time()):
                    await asyncio.sleep(wait_s)
        finally:
            listener.cancel()
            with suppress(asyncio.CancelledError):
                await listener
            await self._publisher.close()

    async def _resend_when_due(self) -> None:
        after_s = self.settings.sync_resend_after_s
        now = asyncio.get_running_loop().time()
        if after_s <= 0 or now < self._next_resend_check:
            return
        self._next_resend_check = now + min(after_s / 2, RESEND_CHECK_MAX_INTERVAL_S)
        if total := await self.resend_unanswered():
            log.warning(
                "[Core] Sending again events that got no answer from the Bitrix service",
                events=total,
                after_s=after_s,
            )

    async def resend_unanswered(self) -> int:
        """Queues again every user's latest published event that got no answer long after it
        was published: a job lost with Redis's data, a reply lost on the way. The same
        message_id comes back, so a job still in BullMQ is not duplicated, and re-applying a
        version to its lead changes nothing. Returns how many."""
        total = 0
        while True:  # a chunk per transaction
            async with repository.relay_transaction(self.engine) as transaction:
                count = await repository.requeue_unanswered(
                    transaction, self.settings.sync_resend_after_s, self.settings.outbox_batch_size
                )
            total += count
            if count < self.settings.outbox_batch_size:
                return total

    async def _retry_when_due(self) -> None:
        if self.settings.sync_retry_initial_s <= 0:
            return
        now = asyncio.get_running_loop().time()
        if now < self._next_retry_check:
            return
        self._next_retry_check = now + RETRY_CHECK_INTERVAL_S
        probe = now - self._last_retry_sent >= self.settings.sync_retry_probe_s
        if total := await self.retry_due(probe=probe):
            self._last_retry_sent = now
            log.info("[Core] Sending again users whose last change failed", users=total)

    async def retry_due(self, *, probe: bool = False) -> int:
        """Sends again the users whose retry is due (a bounded number), or with `probe` and
        none due, the one whose retry comes next; returns how many (none while another relay
        holds the lock: it does this too)."""
        async with self._sessions() as session, session.begin():
            if not await repository.try_relay_lock(session):
                return 0
            return await resync_service.retry_due(session, self.settings, probe=probe)

    async def publish_batch(self) -> int:
        """Publishes one batch of pending events; returns how many went out (none while
        another relay holds the lock: it publishes ours too).

        The batch is sent in waves holding at most one event per user, each wave's publishes
        confirmed together: a user's events still leave one after another, in seq order.
        Events confirmed before a failure stay marked published, then the failure is raised.
        """
        await self._connect()
        published: set[UUID] = set()
        failure: BaseException | None = None
        async with repository.relay_transaction(self.engine) as transaction:
            events = await repository.claim_batch(
                transaction,
                self.settings.outbox_batch_size,
                hold=self.settings.hold_until_lead_id,
            )
            for wave in waves(events):
                results = await self._publish(wave)
                published_before = len(published)
                for event, result in zip(wave, results, strict=True):
                    if result is not None:
                        failure = failure or result
                    else:
                        published.add(event.id)
                if confirmed := len(published) - published_before:
                    # One line per wave: per message it cost the relay as much as publishing.
                    log.info("[Core] Message emitted successfully", messages=confirmed)
                if failure is not None:
                    break
            if failure is not None:
                left = [event.id for event in events if event.id not in published]
                await repository.unmark_published(transaction, left)
        if failure is not None:
            raise failure
        return len(published)

    async def _connect(self) -> None:
        """Connects the first time; a no-op after that (the publisher reconnects by itself)."""
        if self.connected.is_set():
            return
        async with asyncio.timeout(PUBLISH_TIMEOUT_S):
            await self._publisher.connect()
        log.info(
            "[Core] Connected to RabbitMQ successfully",
            url=describe_url(self.settings.rabbitmq_url),
        )
        self.connected.set()

    async def _publish(self, wave: list[PendingEvent]) -> list[BaseException | None]:
        """Publishes a wave in one write; for each event, None once confirmed, else why not."""
        messages = []
        for event in wave:
            # Encoded once, for the log line and the message alike.
            text = json.dumps(wire_body(event.body, event.bitrix_lead_id), ensure_ascii=False)
            message_id = str(event.id)
            self._log.info(
                "[Core] About to emit message to BITRIX_SERVICE: " + text, message_id=message_id
            )
            messages.append(OutgoingMessage(text.encode(), message_id=message_id))
        async with asyncio.timeout(PUBLISH_TIMEOUT_S):
            return await self._publisher.publish_many(self.settings.rabbitmq_queue, messages)

    async def _set_listening(self, listening: bool) -> bool:
        """Starts or stops listening on the LISTEN connection (when it is open); returns whether
        it started again. A connection that fails to is cut, and `_listen` opens another, which
        listens."""
        if listening == self._listening:
            return False
        self._listening = listening
        connection = self._listener
        if connection is not None:
            try:
                async with asyncio.timeout(LISTEN_TIMEOUT_S):
                    await connection.execute(_LISTEN if listening else _UNLISTEN)
            except Exception as exc:
                log.warning("[Core] Outbox LISTEN connection lost", error=exc)
                connection.terminate()
        return listening

    async def _listen(self) -> None:
        """Keeps a LISTEN connection open; reconnects when it drops (polling covers the gap)."""
        backoff = Backoff(initial_s=0.5, max_s=30.0)
        dsn = asyncpg_dsn(self.settings.database_url)
        while True:
            try:
                connection = await asyncpg.connect(dsn, timeout=10)
            except Exception as exc:
                delay = backoff.failed()
                if backoff.should_log:
                    log.warning("[Core] Outbox LISTEN connection failed", error=exc)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            lost = asyncio.Event()
            try:
                connection.add_termination_listener(lambda _, lost=lost: lost.set())
                await connection.add_listener(
                    repository.NOTIFY_CHANNEL, lambda *_: self._wakeup.set()
                )
                # Catch up on whatever was committed while nobody was listening.
                self._wakeup.set()
                self._listener = connection
                await lost.wait()
            except Exception as exc:
                log.warning("[Core] Outbox LISTEN connection lost", error=exc)
            finally:
                self._listener = None
                with suppress(Exception):
                    await asyncio.wait_for(connection.close(), 5)
