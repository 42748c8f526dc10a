"""Events per second through the Bitrix service, from the event on RabbitMQ to its reply.

The emulator (`b24sync portal`) and the service (`b24sync bitrix`) run as subprocesses on
queues and a Redis prefix of their own; this process publishes N `user_created` events for N
new users at once, as a Core would after a bulk import, and times each one until its reply.

With `--rate-limit off` it measures the service itself. With a plan's limit (`standard`: 50
requests of burst, 2 per second) it shows the ceiling Bitrix24 sets, and that the service's
own limiter keeps the portal from ever answering QUERY_LIMIT_EXCEEDED.

    .venv/bin/python bench/bitrix_throughput.py [--events 1500] [--rate-limit off]
                                                  [--concurrency 10] [--batch-size 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from uuid import uuid4

import aio_pika
import httpx
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).parent))

from _common import (
    RABBITMQ_URL,
    b24sync_process,
    cpu_seconds,
    cpu_speed_ms,
    delete_queues,
    free_port,
    percentile,
    write_result,
)

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
# The client-side bucket for the portal's plan (burst, per second), as the README advises.
PLANS = {"standard": (45, 2.0), "enterprise": (240, 5.0), "off": (100_000, 100_000.0)}


def event(user_id: int, reply_queue: str) -> bytes:
    user = {"id": user_id, "full_name": f"Пользователь {user_id}", "phone": "+77001112233",
            "stage": "NEW", "version": 1}  # fmt: skip
    body = {"pattern": "user_created",
            "data": {"action": "create_card", "user": user, "replyQueue": reply_queue}}  # fmt: skip
    return json.dumps(body, ensure_ascii=False).encode()


async def run(queue: str, reply_queue: str, events: int, timeout_s: float) -> dict[str, Any]:
    sent: dict[str, float] = {}
    answered: dict[str, float] = {}
    statuses: Counter[str] = Counter()
    done = asyncio.Event()
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True)
        replies = await channel.declare_queue(reply_queue, durable=True)

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if message.correlation_id in sent and message.correlation_id not in answered:
                answered[message.correlation_id] = time.perf_counter()
                statuses[json.loads(message.body)["data"]["status"]] += 1
                if len(answered) == events:
                    done.set()
            await message.ack()

        await replies.consume(on_reply)
        start = time.perf_counter()
        for user_id in range(1, events + 1):
            message_id = str(uuid4())
            sent[message_id] = time.perf_counter()
            await channel.default_exchange.publish(
                aio_pika.Message(
                    event(user_id, reply_queue),
                    message_id=message_id,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=queue,
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout_s)
        elapsed = max(answered.values(), default=start) - start
    latencies = [answered[key] - sent[key] for key in answered]
    return {"elapsed_s": elapsed, "latencies": latencies, "statuses": dict(statuses)}


async def forget_redis(prefix: str) -> None:
    redis = Redis.from_url(REDIS_URL)
    async with redis:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1500)
    parser.add_argument("--rate-limit", choices=sorted(PLANS), default="off")
    parser.add_argument("--concurrency", type=int, default=10, help="WORKER_CONCURRENCY")
    parser.add_argument("--batch-size", type=int, default=50, help="BITRIX_BATCH_SIZE")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()

    suffix = uuid4().hex[:8]
    queue, reply_queue, prefix = (
        f"bench.events.{suffix}",
        f"bench.replies.{suffix}",
        f"bench-{suffix}",
    )
    portal_port, health_port = free_port(), free_port()
    burst, per_s = PLANS[args.rate_limit]
    env = {
        "RABBITMQ_URL": RABBITMQ_URL,
        "REDIS_URL": REDIS_URL,
        "RABBITMQ_QUEUE": queue,
        "RABBITMQ_REPLY_QUEUE": reply_queue,
        "BULLMQ_PREFIX": prefix,
        "PORTAL_PORT": str(portal_port),
        "BITRIX_HTTP_PORT": str(health_port),
        "HOST": "127.0.0.1",
        "WORKER_CONCURRENCY": str(args.concurrency),
        "BITRIX_BATCH_SIZE": str(args.batch_size),
        "BITRIX_RATE_BURST": str(burst),
        "BITRIX_RATE_PER_S": str(per_s),
    }
    speed_before = cpu_speed_ms()
    portal_url = f"http://127.0.0.1:{portal_port}"
    try:
        with (
            b24sync_process(
                ["portal", "--rate-limit", args.rate_limit],
                env,
                f"{portal_url}/admin/stats",
                prefix,
            ),
            b24sync_process(
                ["bitrix"], env, f"http://127.0.0.1:{health_port}/readyz", prefix
            ) as bitrix,
        ):
            cpu_before = cpu_seconds(bitrix)
            measured = asyncio.run(run(queue, reply_queue, args.events, args.timeout))
            cpu = cpu_seconds(bitrix) - cpu_before
            stats = httpx.get(f"{portal_url}/admin/stats", timeout=10).json()
            leads = len(httpx.get(f"{portal_url}/admin/leads", timeout=10).json())
    finally:
        asyncio.run(delete_queues(queue, reply_queue))
        asyncio.run(forget_redis(prefix))

    latencies = measured["latencies"]
    answered = len(latencies)
    outcomes: Counter[str] = Counter()
    for by_outcome in stats["by_method"].values():
        outcomes.update(by_outcome)
    result = {
        "benchmark": "Bitrix service: event on RabbitMQ -> lead -> reply",
        "events": args.events,
        "answered": answered,
        "replies": measured["statuses"],
        "rate_limit": args.rate_limit,
        "worker_concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "seconds": round(measured["elapsed_s"], 2),
        "events_per_s": round(answered / measured["elapsed_s"], 1) if answered else 0,
        "latency_s": {
            "p50": round(percentile(latencies, 0.50), 3),
            "p99": round(percentile(latencies, 0.99), 3),
        }
        if latencies
        else None,
        "leads_created": leads,
        "portal_calls": stats["total"],
        "portal_calls_by_method": stats["by_method"],
        "portal_limit_answers": outcomes.get("QUERY_LIMIT_EXCEEDED", 0),
        "bitrix_cpu_ms_per_event": round(cpu / answered * 1000, 3) if answered else None,
        "cpu_speed_check_ms": [speed_before, cpu_speed_ms()],
    }
    name = f"bitrix_throughput_{args.rate_limit}_b{args.batch_size}_w{args.concurrency}"
    write_result(name, result)


if __name__ == "__main__":
    main()
