"""From Core's HTTP API to every `bitrix_lead_id` stored in Core, against the emulator.

Core, the Bitrix service and the emulator run as subprocesses with their defaults (the plan given
by `--plan`; the emulator's limit follows it). N users are created through `POST /users` from
16 keep-alive connections, as fast as Core takes them; the bench database is read every 0.2 s
until every user has its lead id and is `synced`. Then each user's phone and stage are changed
with `PATCH /users/{id}` and the same is timed until every user's `synced_version` is its
version. Rates are stated overall and sustained (between half and 90% of the users done, after
the burst of the bucket), with the portal's limit answers, leads per user and the CPU per user
of Core and of the Bitrix service.

    .venv/bin/python bench/sync_end_to_end.py [--plan standard] [--users 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).parent))

from _common import (
    DATABASE_URL,
    KeepAliveConnection,
    core_process,
    cpu_seconds,
    cpu_speed_ms,
    free_port,
    prepare_database,
    write_result,
)
from b24sync.core.db import asyncpg_dsn
from bitrix_throughput import PORTAL_LIMIT, System

CONNECTIONS = 16
DONE_CREATES = (
    "SELECT count(*) FROM users WHERE bitrix_lead_id IS NOT NULL AND sync_status = 'synced'"
)
DONE_CHANGES = "SELECT count(*) FROM users WHERE synced_version = version AND version > 1"


async def send_all(port: int, requests: list[bytes], expected_status: int) -> int:
    """Sends the requests over CONNECTIONS keep-alive connections; returns how many failed."""
    pending = iter(requests)
    errors = 0

    async def connection() -> None:
        nonlocal errors
        client = await KeepAliveConnection.open("127.0.0.1", port)
        try:
            for request in pending:
                status, _ = await client.send(request)
                errors += status != expected_status
        finally:
            await client.close()

    await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))
    return errors


async def timed(
    users: int, send: Callable[[], Any], done_query: str, timeout_s: float
) -> dict[str, Any]:
    """Runs `send` and samples `done_query` until it counts every user; rates from the start."""
    database = await asyncpg.connect(asyncpg_dsn(DATABASE_URL))
    samples: list[tuple[float, int]] = []
    start = time.perf_counter()
    sent_s = 0.0

    async def sending_all() -> int:
        nonlocal sent_s
        errors: int = await send()
        sent_s = time.perf_counter() - start
        return errors

    sending = asyncio.ensure_future(sending_all())
    try:
        while True:
            done = await database.fetchval(done_query)
            now = time.perf_counter() - start
            samples.append((now, done))
            if (done >= users and sending.done()) or now > timeout_s:
                break
            await asyncio.sleep(0.2)
    finally:
        await database.close()
    errors = await sending

    def reached(count: int) -> float:
        return next(at for at, done in samples if done >= count)

    done = samples[-1][1]
    result: dict[str, Any] = {
        "users": users,
        "http_errors": errors,
        "sent_s": round(sent_s, 2),
        "done": done,
        "seconds": round(samples[-1][0], 2),
        "per_s": round(done / samples[-1][0], 1),
    }
    if done >= users:
        half, most = reached(users // 2), reached(int(users * 0.9))
        if most > half:
            result["sustained_per_s"] = round((int(users * 0.9) - users // 2) / (most - half), 1)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    prepare_database()
    system = System(args.plan, 1)
    port = free_port()
    with (
        system.running(),
        core_process(
            port, system.queue, RABBITMQ_REPLY_QUEUE=system.reply_queue, LOG_LEVEL="WARNING"
        ) as core,
    ):
        bitrix = system.bitrix[0]
        users: int = args.users

        def per_user(cpu_s: float) -> float:
            return round(cpu_s / users * 1000, 3)

        async def scenario() -> dict[str, Any]:
            creates = [
                KeepAliveConnection.encode(
                    "POST",
                    "/users",
                    json.dumps(
                        {"full_name": f"Пользователь {n}", "phone": f"+7700{n:07d}"},
                        ensure_ascii=False,
                    ).encode(),
                )
                for n in range(1, args.users + 1)
            ]
            changes = [
                KeepAliveConnection.encode(
                    "PATCH",
                    f"/users/{n}",
                    json.dumps({"phone": f"+7701{n:07d}", "stage": "IN_PROCESS"}).encode(),
                )
                for n in range(1, args.users + 1)
            ]
            phases = {}
            for phase, requests, status, done_query in (
                ("creates", creates, 201, DONE_CREATES),
                ("updates", changes, 200, DONE_CHANGES),
            ):
                cpu = cpu_seconds(core), cpu_seconds(bitrix)
                phases[phase] = figures = await timed(
                    args.users,
                    lambda: send_all(port, requests, status),  # noqa: B023 (awaited here)
                    done_query,
                    args.timeout,
                )
                figures["core_cpu_ms_per_user"] = per_user(cpu_seconds(core) - cpu[0])
                figures["bitrix_cpu_ms_per_user"] = per_user(cpu_seconds(bitrix) - cpu[1])
            return phases

        result = asyncio.run(scenario())
        result["portal"] = system.portal_report()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plan", choices=sorted(PORTAL_LIMIT), default="standard")
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    speed_before = cpu_speed_ms()
    started = time.time()
    result: dict[str, Any] = {
        "benchmark": "Core's API to every lead id stored",
        "plan": args.plan,
        "command": " ".join(["bench/sync_end_to_end.py", *sys.argv[1:]]),
        **run(args),
        "wall_s": round(time.time() - started, 1),
        "cpu_speed_check_ms": [speed_before, cpu_speed_ms()],
    }
    write_result(f"sync_end_to_end_{args.plan}_{args.users}", result)


if __name__ == "__main__":
    main()
