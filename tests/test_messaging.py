"""Publishing with confirms on the real RabbitMQ: a queue deleted under a live connection is
declared again by the next attempt, so a publisher never stays stuck on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import aiormq
import pytest

from b24sync.messaging import ConfirmedPublisher, make_broker, publish_json
from b24sync.settings import Settings

Publish = Callable[[str, bytes, str], Awaitable[None]]


@pytest.fixture(params=["aio-pika", "faststream"])
async def publish(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[Publish]:
    """One publish function per publishing path of the project."""
    if request.param == "aio-pika":
        publisher = ConfirmedPublisher(settings.rabbitmq_url, "classic")
        await publisher.connect()

        async def through_publisher(queue: str, body: bytes, message_id: str) -> None:
            await publisher.publish(queue, body, message_id=message_id)

        yield through_publisher
        await publisher.close()
    else:
        broker = make_broker(settings.rabbitmq_url)
        await broker.connect()

        async def through_broker(queue: str, body: bytes, message_id: str) -> None:
            await publish_json(broker, queue, body, queue_type="classic", message_id=message_id)

        yield through_broker
        await broker.stop()


async def test_a_queue_deleted_under_a_publisher_is_declared_again(
    publish: Publish, settings: Settings
) -> None:
    queue = settings.rabbitmq_queue
    await publish(queue, b'{"n": 1}', "1")
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)

        with pytest.raises(aiormq.exceptions.DeliveryError):
            await publish(queue, b'{"n": 2}', "2")  # unroutable: nothing stored it
        await publish(queue, b'{"n": 3}', "3")

        stored = await channel.declare_queue(queue, durable=True, passive=True)
        message = await stored.get(no_ack=True)
        assert message is not None
        assert (message.message_id, message.body) == ("3", b'{"n": 3}')
