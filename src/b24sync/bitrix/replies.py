"""Replies to the producer of an event: persistent, confirmed, in the NestJS envelope."""

from __future__ import annotations

from faststream.rabbit import RabbitBroker

from b24sync.contracts.messages import Reply, ReplyData
from b24sync.logs import get_logger
from b24sync.messaging import QueueType, publish_json

log = get_logger(__name__)


class ReplySender:
    def __init__(self, broker: RabbitBroker, queue_type: QueueType) -> None:
        self._broker = broker
        self._queue_type = queue_type

    async def send(self, queue: str, data: ReplyData, *, correlation_id: str | None) -> None:
        """Publishes (declaring the queue on first use) and waits for the broker's confirm;
        raises when the reply was not stored."""
        await publish_json(
            self._broker,
            queue,
            Reply(data=data).wire(),
            queue_type=self._queue_type,
            correlation_id=correlation_id,
        )
        log.info(f"[Bitrix] Reply sent to queue: {queue}")
