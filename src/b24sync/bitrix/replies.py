"""Replies to the producer of an event: persistent, confirmed, in the NestJS envelope."""

from __future__ import annotations

import functools
import json

from b24sync.batching import Coalescer
from b24sync.contracts.messages import Reply, ReplyData
from b24sync.logs import get_logger
from b24sync.messaging import ConfirmedPublisher, OutgoingMessage

log = get_logger(__name__)

# Replies to one queue written together while earlier ones await their confirms: under load a
# socket write and a confirm per group rather than per reply. Alone, a reply leaves at once.
GROUPS_IN_FLIGHT = 2
MAX_GROUP = 200
# Reply queues are named by the events; past this many, idle groupings are let go.
MAX_QUEUES = 64

PublishResult = BaseException | None


class ReplySender:
    def __init__(self, publisher: ConfirmedPublisher) -> None:
        self._publisher = publisher
        self._groups: dict[str, Coalescer[OutgoingMessage, PublishResult]] = {}

    async def send(self, queue: str, data: ReplyData, *, correlation_id: str | None) -> None:
        """Publishes (declaring the queue on first use) and waits for the broker's confirm;
        raises when the reply was not stored."""
        body = json.dumps(Reply(data=data).wire(), ensure_ascii=False).encode()
        error = await self._group(queue).submit(
            OutgoingMessage(body, correlation_id=correlation_id)
        )
        if error is not None:
            raise error
        log.info(f"[Bitrix] Reply sent to queue: {queue}")

    def _group(self, queue: str) -> Coalescer[OutgoingMessage, PublishResult]:
        group = self._groups.get(queue)
        if group is None:
            if len(self._groups) >= MAX_QUEUES:
                self._groups.clear()  # a running group keeps its own reference
            group = Coalescer(
                functools.partial(self._publisher.publish_many, queue),
                max_in_flight=GROUPS_IN_FLIGHT,
                max_items=MAX_GROUP,
            )
            self._groups[queue] = group
        return group
