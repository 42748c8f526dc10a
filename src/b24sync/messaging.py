"""RabbitMQ plumbing both services share: one broker factory, one way to publish."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit
from weakref import WeakKeyDictionary

from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

from b24sync.logs import mask_secrets


def durable_queue(name: str) -> RabbitQueue:
    return RabbitQueue(name, durable=True)


# Queues each broker has declared already: publishing to the default exchange does not create
# the queue, and an unroutable message would be dropped by RabbitMQ.
_declared: WeakKeyDictionary[RabbitBroker, set[str]] = WeakKeyDictionary()


def make_broker(url: str, **kwargs: Any) -> RabbitBroker:
    """A broker whose publishes wait for the broker's confirm and fail when unroutable."""
    kwargs.setdefault("log_level", 10)  # FastStream's per-message access log is DEBUG noise.
    kwargs.setdefault("default_channel", Channel(publisher_confirms=True, on_return_raises=True))
    return RabbitBroker(url, **kwargs)


async def publish_json(
    broker: RabbitBroker,
    queue: str,
    body: dict[str, Any] | bytes,
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
) -> None:
    """Publishes a persistent JSON message to a durable queue and waits for the broker's confirm.
    `body` is a JSON object, or one already encoded (sent as it is)."""
    target = durable_queue(queue)
    declared = _declared.setdefault(broker, set())
    if queue not in declared:
        await broker.declare_queue(target)
        declared.add(queue)
    await broker.publish(
        body,
        queue=target,
        persist=True,
        mandatory=True,
        content_type="application/json",
        message_id=message_id,
        correlation_id=correlation_id,
    )


def describe_url(url: str) -> str:
    """A broker URL fit for a log line: no password, no webhook code."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return mask_secrets(f"{parts.scheme}://{host}{port}{parts.path}")
