"""Replies on the real RabbitMQ: sent concurrently, they are written in groups, and each caller
still learns the fate of its own reply."""

from __future__ import annotations

import asyncio
import json

import aio_pika

from b24sync.bitrix.replies import ReplySender
from b24sync.contracts.messages import ReplyData, ReplyStatus
from b24sync.messaging import ConfirmedPublisher
from b24sync.settings import Settings


async def test_concurrent_replies_each_arrive_once_with_their_correlation_id(
    settings: Settings,
) -> None:
    publisher = ConfirmedPublisher(settings.rabbitmq_url, "classic")
    sender = ReplySender(publisher)
    queue = settings.rabbitmq_reply_queue
    try:
        await asyncio.gather(
            *(
                sender.send(
                    queue,
                    ReplyData(status=ReplyStatus.SUCCESS, user_id=n, bitrix_lead_id=1000 + n),
                    correlation_id=f"event-{n}",
                )
                for n in range(1, 301)
            )
        )
    finally:
        await publisher.close()

    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        stored = await channel.declare_queue(queue, durable=True, passive=True)
        received = {}
        while (message := await stored.get(no_ack=True, fail=False)) is not None:
            received[message.correlation_id] = json.loads(message.body)["data"]
    assert set(received) == {f"event-{n}" for n in range(1, 301)}
    assert all(
        (data["user_id"], data["bitrix_lead_id"]) == (n, 1000 + n)
        for n, data in ((int(key.removeprefix("event-")), data) for key, data in received.items())
    )
