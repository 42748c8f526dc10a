"""Commit-to-publish latency of the outbox: from the API's 201 to the event arriving at a
consumer of the Core -> Bitrix queue.

Core runs as `b24sync core` in a subprocess; this process sends POST /users at a steady rate
and consumes the queue at the same time, so both timestamps come from one clock.

    .venv/bin/python bench/outbox_latency.py [--rate 200] [--seconds 10] [--workers 1]
                                              [--no-relay-process]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika
import uvloop

sys.path.insert(0, str(Path(__file__).parent))

from _common import (
    RABBITMQ_URL,
    KeepAliveConnection,
    add_core_arguments,
    core_description,
    core_environment,
    core_process,
    cpu_speed_ms,
    delete_queues,
    free_port,
    percentile,
    prepare_database,
    write_result,
)

BODY = json.dumps({"full_name": "Иван Иванов", "phone": "+77001112233", "stage": "NEW"}).encode()


async def measure(port: int, queue_name: str, rate: float, seconds: float) -> dict[str, Any]:
    answered: dict[int, float] = {}
    arrived: dict[int, float] = {}
    total = int(rate * seconds)
    all_arrived = asyncio.Event()

    connection = await aio_pika.connect(RABBITMQ_URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=1000)
    queue = await channel.declare_queue(queue_name, durable=True)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        now = time.perf_counter()
        user_id = json.loads(message.body)["data"]["user"]["id"]
        arrived.setdefault(user_id, now)
        await message.ack()
        if len(arrived) >= total:
            all_arrived.set()

    await queue.consume(on_message)

    # Open loop: request n is sent at start + n / rate, whatever the previous answers did.
    clients = [await KeepAliveConnection.open("127.0.0.1", port) for _ in range(16)]
    idle: asyncio.Queue[KeepAliveConnection] = asyncio.Queue()
    for client in clients:
        idle.put_nowait(client)
    errors = 0

    async def create() -> None:
        nonlocal errors
        client = await idle.get()
        try:
            status, body = await client.request("POST", "/users", BODY)
            now = time.perf_counter()
        finally:
            idle.put_nowait(client)
        if status == 201:
            answered[json.loads(body)["id"]] = now
        else:
            errors += 1

    start = time.perf_counter()
    tasks = []
    for n in range(total):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(create()))
    await asyncio.gather(*tasks)
    with contextlib.suppress(TimeoutError):  # whatever did not arrive is reported missing
        await asyncio.wait_for(all_arrived.wait(), 30)
    for client in clients:
        await client.close()
    await connection.close()

    latencies = [arrived[user] - at for user, at in answered.items() if user in arrived]
    return {
        "latencies": latencies,
        "sent": total,
        "errors": errors,
        "missing": len(set(answered) - set(arrived)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=200.0, help="POST /users per second")
    parser.add_argument("--seconds", type=float, default=10.0)
    add_core_arguments(parser)
    args = parser.parse_args()

    prepare_database()
    speed_before = cpu_speed_ms()
    queue = "bench.outbox_latency"
    port = free_port()
    env = core_environment(args)
    try:
        with core_process(port, queue, **env):
            run = uvloop.run(measure(port, queue, args.rate, args.seconds))
    finally:
        asyncio.run(delete_queues(queue, f"{queue}.replies"))

    latencies = run["latencies"]
    result = {
        "benchmark": "outbox: API 201 -> message on the queue",
        "rate_per_s": args.rate,
        "seconds": args.seconds,
        **core_description(args),
        "sent": run["sent"],
        "errors": run["errors"],
        "missing": run["missing"],
        "latency_ms": {
            "p50": round(percentile(latencies, 0.50) * 1000, 2),
            "p90": round(percentile(latencies, 0.90) * 1000, 2),
            "p99": round(percentile(latencies, 0.99) * 1000, 2),
            "max": round(max(latencies) * 1000, 2),
        },
        # The same work's CPU time before and after the run (lower is a faster machine).
        "cpu_speed_check_ms": [speed_before, cpu_speed_ms()],
        "targets": {"p50_ms": "< 20"},
    }
    write_result("outbox_latency", result)


if __name__ == "__main__":
    main()
