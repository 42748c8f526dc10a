"""Throughput and latency of POST /users on a real Core (PostgreSQL, outbox, relay, RabbitMQ).

Core runs as `b24sync core` in a subprocess; the load comes from another process: N
keep-alive connections, each sending the next request as soon as the previous one is answered.

    .venv/bin/python bench/core_api.py [--connections 16] [--seconds 10] [--workers 1]
                                         [--create-groups 2] [--no-relay-process]
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
    add_core_arguments,
    core_description,
    core_environment,
    core_process,
    cpu_seconds,
    cpu_speed_ms,
    delete_queues,
    free_port,
    outbox_backlog,
    percentile,
    prepare_database,
    service_cpu_seconds,
    write_result,
)

BODY = {"full_name": "Иван Иванов", "phone": "+77001112233", "stage": "NEW"}


async def _load(port: int, connections: int, seconds: float, warmup: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    sent = 0
    request = KeepAliveConnection.encode("POST", "/users", json.dumps(BODY).encode())
    cpu_start = time.process_time()
    start = time.perf_counter()
    measure_from = start + warmup
    stop = measure_from + seconds

    async def worker() -> None:
        nonlocal errors, sent
        connection = await KeepAliveConnection.open("127.0.0.1", port)
        try:
            while (now := time.perf_counter()) < stop:
                status, _ = await connection.send(request)
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
    return {
        "latencies": latencies,
        "errors": errors,
        "seconds": seconds,
        "sent": sent,
        "cpu_s": time.process_time() - cpu_start,
    }


def _load_process(port: int, connections: int, seconds: float, warmup: float, out: Any) -> None:
    import uvloop

    out.put(uvloop.run(_load(port, connections, seconds, warmup)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    add_core_arguments(parser)
    args = parser.parse_args()

    prepare_database()
    speed_before = cpu_speed_ms()
    queue = "bench.core_api"
    env = core_environment(args)
    port = free_port()
    try:
        with core_process(port, queue, **env) as core:
            core_cpu_before = cpu_seconds(core)
            services_before = service_cpu_seconds()
            machine_before = psutil.cpu_times()
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
            services_after = service_cpu_seconds()
            machine_after = psutil.cpu_times()
            # The API's throughput only counts if the relay keeps up: what is still unpublished
            # when the load stops, and how long the relay then takes to catch up.
            backlog = asyncio.run(outbox_backlog())
            stopped = time.perf_counter()
            while asyncio.run(outbox_backlog())["pending"] and time.perf_counter() < stopped + 60:
                time.sleep(0.05)
            drain_s = time.perf_counter() - stopped
    finally:
        asyncio.run(delete_queues(queue, f"{queue}.replies"))

    latencies = run["latencies"]
    spent = {
        "core": core_cpu,
        "load_generator": run["cpu_s"],
        **{name: services_after[name] - used for name, used in services_before.items()},
    }
    busy = sum(machine_after) - sum(machine_before) - (machine_after.idle - machine_before.idle)
    # Anything else that ran meanwhile (the kernel's own threads, other programs): noise.
    spent["everything_else"] = max(0.0, busy - sum(spent.values()))
    result = {
        "benchmark": "POST /users",
        "connections": args.connections,
        **core_description(args),
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
        "cpu_ms_per_request": {
            name: round(seconds / run["sent"] * 1000, 3) for name, seconds in spent.items()
        },
        "machine_cpu_busy_percent": machine_busy,
        "outbox": {
            "events": backlog["events"],
            "pending_when_load_stopped": backlog["pending"],
            "drain_s": round(drain_s, 2),
        },
        "cpus": psutil.cpu_count(),
        # The same work's CPU time before and after the run (lower is a faster machine).
        "cpu_speed_check_ms": [speed_before, cpu_speed_ms()],
        "targets": {"requests_per_s": ">= 1000", "p99_ms": "< 50"},
    }
    write_result("core_api", result)


if __name__ == "__main__":
    main()
