"""RabbitMQ plumbing both services share: one broker factory, one way to publish."""

from __future__ import annotations

from typing import Any

from faststream.rabbit import RabbitBroker, RabbitQueue

from b24sync.logs import mask_secrets


def durable_queue(name: str) -> RabbitQueue:
    return RabbitQueue(name, durable=True)


def make_broker(url: str, **kwargs: Any) -> RabbitBroker:
    """A broker with publisher confirms (FastStream's default channel) and quiet access logs."""
    kwargs.setdefault("log_level", 10)  # FastStream's per-message access log is DEBUG noise.
    return RabbitBroker(url, **kwargs)


async def publish_json(
    broker: RabbitBroker,
    queue: str,
    body: dict[str, Any],
    *,
    message_id: str | None = None,
    correlation_id: str | None = None,
) -> None:
    """Publishes a persistent JSON message to a durable queue and waits for the broker's confirm."""
    await broker.publish(
        body,
        queue=durable_queue(queue),
        persist=True,
        mandatory=True,
        content_type="application/json",
        message_id=message_id,
        correlation_id=correlation_id,
    )


def describe_url(url: str) -> str:
    """A broker URL fit for a log line: no password, no webhook code."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return mask_secrets(f"{parts.scheme}://{host}{port}{parts.path}")
