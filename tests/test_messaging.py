"""Publishing with confirms on the real RabbitMQ (Core's events and the Bitrix service's replies
alike): a queue deleted under a live connection is declared again by the next attempt, so a
publisher never stays stuck on it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import aiormq
import pytest

from b24sync.messaging import ConfirmedPublisher
from b24sync.settings import Settings


@pytest.fixture
async def publisher(settings: Settings) -> AsyncIterator[ConfirmedPublisher]:
    publisher = ConfirmedPublisher(settings.rabbitmq_url, "classic")
    await publisher.connect()
    yield publisher
    await publisher.close()


async def test_a_queue_deleted_under_a_publisher_is_declared_again(
    publisher: ConfirmedPublisher, settings: Settings
) -> None:
    queue = settings.rabbitmq_queue
    await publisher.publish(queue, b'{"n": 1}', message_id="1")
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)

        with pytest.raises(aiormq.exceptions.DeliveryError):  # unroutable: nothing stored it
            await publisher.publish(queue, b'{"n": 2}', message_id="2")
        await publisher.publish(queue, b'{"n": 3}', message_id="3")

        stored = await channel.declare_queue(queue, durable=True, passive=True)
        message = await stored.get(no_ack=True)
        assert message is not None
        assert (message.message_id, message.body) == ("3", b'{"n": 3}')
