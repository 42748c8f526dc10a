"""Throughput and latency of Core's writes on a real Core (PostgreSQL, outbox, relay, RabbitMQ).

Core runs as `b24sync core` in a subprocess; the load comes from another process: N
keep-alive connections, each sending the next request as soon as the previous one is answered.
`--mix create` sends only POST /users; `--mix mixed` sends 60% creates, 30% updates (PATCH, a
new phone and stage) and 10% moves of users created before the measurement.

The outbox's backlog (events not yet published, and the age of the oldest) is sampled every
100 ms while the load runs. Core's CPU is counted until its outbox is empty again, so a relay
that falls behind does not make a request look cheaper.

    .venv/bin/python bench/core_api.py [--connections 16] [--seconds 10] [--mix create|mixed]
                                         [--workers 1] [--create-groups 1] [--relay-process]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psutil

sys.path.insert(0, str(Path(__file__).parent))

from _common import (
    DATABASE_URL,
    KeepAliveConnection,
    add_core_arguments,
    core_description,
    core_environment,
    core_process,
    cpu_seconds_by_name,
    cpu_speed_ms,
    delete_queues,
    free_port,
    outbox_backlog,
    percentile,
    prepare_database,
    service_cpu_seconds,
    write_result,
)
from b24sync.core.db import asyncpg_dsn
from b24sync.core.outbox.process import PROCESS_NAME as RELAY_PROCESS

BODY = {"full_name": "Иван Иванов", "phone": "+77001112233", "stage": "NEW"}
STAGES = ("NEW", "IN_PROCESS", "CONVERTED")
# Share of each write in `--mix mixed`.
MIX = (("create", 0.6), ("update", 0.3), ("move", 0.1))
# Users created before the measurement, for the mixed load to update and move.
MIXED_USERS = 2000


def _requests(mix: str, user_ids: list[int], rng: random.Random) -> Iterator[tuple[str, bytes]]:
    """The next write to send, endlessly: its kind and the encoded request."""
    create = KeepAliveConnection.encode("POST", "/users", json.dumps(BODY).encode())
    kinds = [kind for kind, _ in MIX]
    weights = [share for _, share in MIX]
    while True:
        kind = "create" if mix == "create" else rng.choices(kinds, weights)[0]
        if kind == "create":
            yield kind, create
            continue
        user_id = rng.choice(user_ids)
        stage = rng.choice(STAGES)
        if kind == "update":
            phone = f"+7700{rng.randrange(10**7):07d}"
            body = {"phone": phone, "stage": stage}
            yield (
                kind,
                KeepAliveConnection.encode("PATCH", f"/users/{user_id}", json.dumps(body).encode()),
            )
        else:
            path = f"/users/{user_id}/move"
            yield (
                kind,
                KeepAliveConnection.encode("POST", path, json.dumps({"stage": stage}).encode()),
            )


async def _backlog_sampler(samples: list[tuple[int, float]], stop: asyncio.Event) -> None:
    """Samples the outbox's backlog every 100 ms until `stop` is set."""
    connection = await asyncpg.connect(asyncpg_dsn(DATABASE_URL))
    try:
        while not stop.is_set():
            backlog = await outbox_backlog(connection)
            samples.append((int(backlog["pending"]), backlog["oldest_s"]))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
    finally:
        await connection.close()


async def _create_users(port: int, count: int) -> list[int]:
    """Users for the mixed load to update and move, created before anything is measured."""
    connection = await KeepAliveConnection.open("127.0.0.1", port)
    create = KeepAliveConnection.encode("POST", "/users", json.dumps(BODY).encode())
    user_ids = []
    try:
        for _ in range(count):
            status, answer = await connection.send(create)
            if status != 201:
                raise RuntimeError(f"creating a user answered {status}: {answer!r}")
            user_ids.append(json.loads(answer)["id"])
    finally:
        await connection.close()
    return user_ids


async def _load(
    port: int, connections: int, seconds: float, warmup: float, mix: str, user_ids: list[int]
) -> dict[str, Any]:
    latencies: dict[str, list[float]] = {kind: [] for kind, _ in MIX}
    errors = 0
    sent = 0
    cpu_start = time.process_time()
    start = time.perf_counter()
    measure_from = start + warmup
    stop = measure_from + seconds
    backlog: list[tuple[int, float]] = []
    sampling_done = asyncio.Event()

    async def worker(seed: int) -> None:
        nonlocal errors, sent
        requests = _requests(mix, user_ids, random.Random(seed))
        connection = await KeepAliveConnection.open("127.0.0.1", port)
        try:
            while (now := time.perf_counter()) < stop:
                kind, request = next(requests)
                status, _ = await connection.send(request)
                done = time.perf_counter()
                sent += 1
                if now >= measure_from:
                    if status in (200, 201):
                        latencies[kind].append(done - now)
                    else:
                        errors += 1
        finally:
            await connection.close()

    async def sample_while_measuring() -> None:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        await _backlog_sampler(backlog, sampling_done)

    sampler = asyncio.create_task(sample_while_measuring())
    await asyncio.gather(*(worker(n) for n in range(connections)))
    sampling_done.set()
    await sampler
    return {
        "latencies": latencies,
        "errors": errors,
        "seconds": seconds,
        "sent": sent,
        "backlog": backlog,
        "cpu_s": time.process_time() - cpu_start,
    }


def _load_process(*args: Any) -> None:
    import uvloop

    *arguments, out = args
    out.put(uvloop.run(_load(*arguments)))


def _latency_ms(samples: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(samples, 0.50) * 1000, 2),
        "p90": round(percentile(samples, 0.90) * 1000, 2),
        "p99": round(percentile(samples, 0.99) * 1000, 2),
        "max": round(max(samples) * 1000, 2),
    }


async def _wait_until_published(deadline_s: float) -> float:
    """Waits until the outbox holds no unpublished event; returns how long that took."""
    started = time.perf_counter()
    connection = await asyncpg.connect(asyncpg_dsn(DATABASE_URL))
    try:
        while time.perf_counter() < started + deadline_s:
            if not (await outbox_backlog(connection))["pending"]:
                break
            await asyncio.sleep(0.05)
    finally:
        await connection.close()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--mix", choices=("create", "mixed"), default="create")
    add_core_arguments(parser)
    args = parser.parse_args()

    prepare_database()
    speed_before = cpu_speed_ms()
    queue = "bench.core_api"
    env = core_environment(args)
    port = free_port()
    try:
        with core_process(port, queue, **env) as core:
            user_ids: list[int] = []
            if args.mix == "mixed":
                user_ids = asyncio.run(_create_users(port, MIXED_USERS))
                asyncio.run(_wait_until_published(60))
            core_cpu_before = cpu_seconds_by_name(core)
            services_before = service_cpu_seconds()
            machine_before = psutil.cpu_times()
            psutil.cpu_percent()  # starts the machine-wide measurement
            results: Any = multiprocessing.get_context("spawn").Queue()
            loader = multiprocessing.get_context("spawn").Process(
                target=_load_process,
                args=(
                    port,
                    args.connections,
                    args.seconds,
                    args.warmup,
                    args.mix,
                    user_ids,
                    results,
                ),
            )
            loader.start()
            run = results.get()
            loader.join()
            machine_busy = psutil.cpu_percent()
            # The API's throughput only counts if the relay keeps up: what is still unpublished
            # when the load stops, and how long the relay then takes to catch up. Core's CPU
            # counts until then: publishing is part of what a write costs.
            backlog = asyncio.run(outbox_backlog())
            drain_s = asyncio.run(_wait_until_published(60))
            core_spent = {
                name: seconds - core_cpu_before.get(name, 0.0)
                for name, seconds in cpu_seconds_by_name(core).items()
            }
            core_cpu = sum(core_spent.values())
            relay_cpu = core_spent.get(RELAY_PROCESS, 0.0)
            services_after = service_cpu_seconds()
            machine_after = psutil.cpu_times()
    finally:
        asyncio.run(delete_queues(queue, f"{queue}.replies"))

    latencies: dict[str, list[float]] = run["latencies"]
    measured = [sample for samples in latencies.values() for sample in samples]
    spent = {
        "core": core_cpu,
        "load_generator": run["cpu_s"],
        **{name: services_after[name] - used for name, used in services_before.items()},
    }
    busy = sum(machine_after) - sum(machine_before) - (machine_after.idle - machine_before.idle)
    # Anything else that ran meanwhile (the kernel's own threads, other programs): noise.
    spent["everything_else"] = max(0.0, busy - sum(spent.values()))
    backlog_samples: list[tuple[int, float]] = run["backlog"] or [(0, 0.0)]
    result = {
        "benchmark": "Core's writes" if args.mix == "mixed" else "POST /users",
        "mix": dict(MIX) if args.mix == "mixed" else {"create": 1.0},
        "connections": args.connections,
        **core_description(args),
        "seconds": args.seconds,
        "requests": len(measured),
        "errors": run["errors"],
        "requests_per_s": round(len(measured) / run["seconds"], 1),
        "latency_ms": _latency_ms(measured),
        "latency_ms_by_write": {
            kind: _latency_ms(samples) for kind, samples in latencies.items() if samples
        },
        # Where the CPU went: Core's processes per request (HTTP, outbox, relay, logging), and
        # how busy the whole machine (PostgreSQL, RabbitMQ, the load generator...) was.
        "core_cpu_ms_per_request": round(core_cpu / run["sent"] * 1000, 3),
        "core_cpu_ms_per_request_by_part": {
            "http": round((core_cpu - relay_cpu) / run["sent"] * 1000, 3),
            "outbox_relay_process": round(relay_cpu / run["sent"] * 1000, 3),
        },
        "cpu_ms_per_request": {
            name: round(seconds / run["sent"] * 1000, 3) for name, seconds in spent.items()
        },
        "machine_cpu_busy_percent": machine_busy,
        "outbox": {
            "events": backlog["events"],
            "largest_backlog_events": max(events for events, _ in backlog_samples),
            "largest_backlog_s": round(max(age for _, age in backlog_samples), 2),
            "pending_when_load_stopped": backlog["pending"],
            "drain_s": round(drain_s, 2),
        },
        "cpus": psutil.cpu_count(),
        # The same work's CPU time before and after the run (lower is a faster machine).
        "cpu_speed_check_ms": [speed_before, cpu_speed_ms()],
        "targets": {
            "requests_per_s": ">= 2000 at 64 connections",
            "p99_ms": "< 50 at 64 connections",
            "core_cpu_ms_per_request": "<= 0.40",
            "largest_backlog_s": "<= 1",
        },
    }
    write_result(f"core_api_{args.mix}_{args.connections}", result)


if __name__ == "__main__":
    main()
