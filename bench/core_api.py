"""Throughput and latency of POST /users on a real Core (PostgreSQL, outbox, relay, RabbitMQ).

Core runs as `b24sync core` in a subprocess; the load comes from another process: N
keep-alive connections, each sending the next request as soon as the previous one is answered.

    .venv/bin/python bench/core_api.py [--connections 16] [--seconds 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).parent))

from _common import (
    KeepAliveConnection,
    core_process,
    cpu_seconds,
    delete_queues,
    free_port,
    percentile,
    prepare_database,
    write_result,
)

BODY = {"full_name": "Иван Иванов", "phone": "+77001112233", "stage": "NEW"}


async def _load(port: int, connections: int, seconds: float, warmup: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    sent = 0
    body = json.dumps(BODY).encode()
    start = time.perf_counter()
    measure_from = start + warmup
    stop = measure_from + seconds

    async def worker() -> None:
        nonlocal errors, sent
        connection = await KeepAliveConnection.open("127.0.0.1", port)
        try:
            while (now := time.perf_counter()) < stop:
                status, _ = await connection.request("POST", "/users", body)
                done = time.perf_counter()
                sent += 1
                if now >= measure_from:
                    if status == 201:
                        latencies.append(done - now)
                    else:
                        errors += 1
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return {"latencies": latencies, "errors": errors, "seconds": seconds, "sent": sent}


def _load_process(port: int, connections: int, seconds: float, warmup: float, out: Any) -> None:
    import uvloop

    out.put(uvloop.run(_load(port, connections, seconds, warmup)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2, help="Core's uvicorn workers")
    parser.add_argument("--log-level", default="INFO", help="Core's LOG_LEVEL")
    args = parser.parse_args()

    prepare_database()
    queue = "bench.core_api"
    env = {"CORE_WORKERS": str(args.workers), "LOG_LEVEL": args.log_level}
    port = free_port()
    try:
        with core_process(port, queue, **env) as core:
            core_cpu_before = cpu_seconds(core)
            psutil.cpu_percent()  # starts the machine-wide measurement
            results: Any = multiprocessing.get_context("spawn").Queue()
            loader = multiprocessing.get_context("spawn").Process(
                target=_load_process,
                args=(port, args.connections, args.seconds, args.warmup, results),
            )
            loader.start()
            run = results.get()
            loader.join()
            machine_busy = psutil.cpu_percent()
            core_cpu = cpu_seconds(core) - core_cpu_before
    finally:
        asyncio.run(delete_queues(queue, f"{queue}.replies"))

    latencies = run["latencies"]
    result = {
        "benchmark": "POST /users",
        "connections": args.connections,
        "core_workers": args.workers,
        "core_log_level": args.log_level,
        "seconds": args.seconds,
        "requests": len(latencies),
        "errors": run["errors"],
        "requests_per_s": round(len(latencies) / run["seconds"], 1),
        "latency_ms": {
            "p50": round(percentile(latencies, 0.50) * 1000, 2),
            "p90": round(percentile(latencies, 0.90) * 1000, 2),
            "p99": round(percentile(latencies, 0.99) * 1000, 2),
            "max": round(max(latencies) * 1000, 2),
        },
        # Where the CPU went: Core's processes per request (HTTP, outbox, relay, logging), and
        # how busy the whole machine (PostgreSQL, RabbitMQ, the load generator...) was.
        "core_cpu_ms_per_request": round(core_cpu / run["sent"] * 1000, 3),
        "machine_cpu_busy_percent": machine_busy,
        "cpus": psutil.cpu_count(),
        "targets": {"requests_per_s": ">= 1000", "p99_ms": "< 50"},
    }
    write_result("core_api", result)


if __name__ == "__main__":
    main()
