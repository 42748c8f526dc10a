"""Replies to the producer of an event: persistent, confirmed, in the NestJS envelope."""

from __future__ import annotations

import json

from b24sync.contracts.messages import Reply, ReplyData
from b24sync.logs import get_logger
from b24sync.messaging import ConfirmedPublisher

log = get_logger(__name__)


class ReplySender:
    def __init__(self, publisher: ConfirmedPublisher) -> None:
        self._publisher = publisher

    async def send(self, queue: str, data: ReplyData, *, correlation_id: str | None) -> None:
        """Publishes (declaring the queue on first use) and waits for the broker's confirm;
        raises when the reply was not stored."""
        body = json.dumps(Reply(data=data).wire(), ensure_ascii=False).encode()
        await self._publisher.publish(queue, body, correlation_id=correlation_id)
        log.info(f"[Bitrix] Reply sent to queue: {queue}")
