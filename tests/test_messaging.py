"""Publishing with confirms on the real RabbitMQ (Core's events and the Bitrix service's replies
alike): a queue deleted under a live connection is declared again by the next attempt, so a
publisher never stays stuck on it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import pytest

from b24sync.messaging import ConfirmedPublisher, OutgoingMessage, PublishError
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

        with pytest.raises(PublishError):  # unroutable: nothing stored it
            await publisher.publish(queue, b'{"n": 2}', message_id="2")
        await publisher.publish(queue, b'{"n": 3}', message_id="3")

        stored = await channel.declare_queue(queue, durable=True, passive=True)
        message = await stored.get(no_ack=True)
        assert message is not None
        assert (message.message_id, message.body) == ("3", b'{"n": 3}')


async def test_a_batch_arrives_in_order_with_its_properties(
    publisher: ConfirmedPublisher, settings: Settings
) -> None:
    queue = settings.rabbitmq_queue
    large = b'{"text": "' + b"x" * 300_000 + b'"}'  # more than one frame's worth
    results = await publisher.publish_many(
        queue,
        [
            OutgoingMessage(b'{"n": 1}', message_id="m1"),
            OutgoingMessage(large, message_id="m2"),
            OutgoingMessage(b'{"n": 3}', correlation_id="c3"),
        ],
    )
    assert results == [None, None, None]

    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        stored = await channel.declare_queue(queue, durable=True, passive=True)
        received = []
        for _ in range(3):
            message = await stored.get(no_ack=True)
            assert message is not None
            received.append(message)
    assert [(m.message_id, m.correlation_id, m.body) for m in received] == [
        ("m1", None, b'{"n": 1}'),
        ("m2", None, large),
        (None, "c3", b'{"n": 3}'),
    ]
    assert {(m.content_type, m.delivery_mode) for m in received} == {
        ("application/json", aio_pika.DeliveryMode.PERSISTENT)
    }


async def test_a_channel_closed_by_the_broker_is_an_error_then_a_new_connection(
    publisher: ConfirmedPublisher, settings: Settings
) -> None:
    """Declaring a queue that exists with other arguments makes RabbitMQ close the channel:
    that publish fails, and the next one goes out on a connection opened again."""
    queue = settings.rabbitmq_queue
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(
            queue + ".other", durable=True, arguments={"x-queue-type": "quorum"}
        )
        try:
            with pytest.raises(PublishError, match="PRECONDITION_FAILED"):
                await publisher.publish(queue + ".other", b"{}", message_id="1")
            await publisher.publish(queue, b'{"n": 2}', message_id="2")
            stored = await channel.declare_queue(queue, durable=True, passive=True)
            message = await stored.get(no_ack=True)
            assert message is not None
            assert message.message_id == "2"
        finally:
            await channel.queue_delete(queue + ".other")
