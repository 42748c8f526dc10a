"""What both benchmarks share: a migrated bench database and a Core subprocess."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import psutil

from b24sync.core.db import asyncpg_dsn
from b24sync.core.migrate import upgrade_head
from b24sync.settings import Settings

RESULTS = Path(__file__).parent / "results"
DATABASE_URL = os.environ.get(
    "BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/b24sync_bench"
)
RABBITMQ_URL = os.environ.get("BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")
B24SYNC = str(Path(sys.executable).parent / "b24sync")


def add_core_arguments(parser: argparse.ArgumentParser) -> None:
    """How the benchmarked Core runs: the same options for every benchmark."""
    parser.add_argument("--workers", type=int, default=1, help="Core's HTTP worker processes")
    parser.add_argument(
        "--relay-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the outbox relay in a process of its own (OUTBOX_RELAY_PROCESS)",
    )
    parser.add_argument(
        "--create-groups",
        type=int,
        default=Settings.model_fields["create_groups_in_flight"].default,
        help="Core's CREATE_GROUPS_IN_FLIGHT",
    )
    parser.add_argument(
        "--change-groups",
        type=int,
        default=Settings.model_fields["change_groups_in_flight"].default,
        help="Core's CHANGE_GROUPS_IN_FLIGHT",
    )
    parser.add_argument("--log-level", default="INFO", help="Core's LOG_LEVEL")


def core_environment(args: argparse.Namespace) -> dict[str, str]:
    """The Core settings that `add_core_arguments` chose, as environment variables."""
    return {
        "CORE_WORKERS": str(args.workers),
        "OUTBOX_RELAY_PROCESS": str(args.relay_process).lower(),
        "CREATE_GROUPS_IN_FLIGHT": str(args.create_groups),
        "CHANGE_GROUPS_IN_FLIGHT": str(args.change_groups),
        "LOG_LEVEL": args.log_level,
    }


def core_description(args: argparse.Namespace) -> dict[str, Any]:
    """The same settings, for the result file."""
    return {
        "core_workers": args.workers,
        "outbox_relay_process": args.relay_process,
        "create_groups_in_flight": args.create_groups,
        "change_groups_in_flight": args.change_groups,
        "core_log_level": args.log_level,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def prepare_database() -> None:
    """Migrates the bench database and empties it, so every run starts alike."""

    async def prepare() -> None:
        await upgrade_head(DATABASE_URL)
        connection = await asyncpg.connect(asyncpg_dsn(DATABASE_URL))
        try:
            await connection.execute("TRUNCATE users, outbox_events RESTART IDENTITY")
        finally:
            await connection.close()

    asyncio.run(prepare())


@contextlib.contextmanager
def core_process(port: int, queue: str, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """Runs `b24sync core` until the block ends, ready to serve."""
    environment = {
        "DATABASE_URL": DATABASE_URL,
        "RABBITMQ_URL": RABBITMQ_URL,
        "RABBITMQ_QUEUE": queue,
        "RABBITMQ_REPLY_QUEUE": f"{queue}.replies",
        "PORT": str(port),
        "HOST": "127.0.0.1",
        **env,
    }
    with b24sync_process(["core"], environment, f"http://127.0.0.1:{port}/readyz", queue) as core:
        yield core


@contextlib.contextmanager
def b24sync_process(
    args: list[str], env: dict[str, str], ready_url: str, log_name: str
) -> Iterator[subprocess.Popen[bytes]]:
    """Runs `b24sync <args>` until the block ends, once `ready_url` answers 200."""
    # The service's own log (at INFO, lines per event) stays out of the results folder.
    log = (Path(tempfile.gettempdir()) / f"b24sync-{args[0]}-{log_name}.log").open("w")
    process = subprocess.Popen([B24SYNC, *args], env={**os.environ, **env}, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{args[0]} exited with {process.returncode}; see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{args[0]} did not become ready in 30 s")
            time.sleep(0.2)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


async def delete_queues(*names: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)


class KeepAliveConnection:
    """A minimal HTTP/1.1 keep-alive client for load generation.

    httpx spends ~1.5 ms of CPU per request here, more than Core itself: on a 2-core machine
    the load generator would be the bottleneck. This one only writes a request and reads a
    Content-Length response, which is all the benchmarks need.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> KeepAliveConnection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    @staticmethod
    def encode(method: str, path: str, body: bytes = b"") -> bytes:
        """A whole request, ready to send again and again."""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        return await self.send(self.encode(method, path, body))

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """Sends an encoded request and reads its response (no pipelining)."""
        self.writer.write(request)
        header = await self.reader.readuntil(b"\r\n\r\n")
        status = int(header[9:12])
        length = 0
        for line in header.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def cpu_seconds(process: subprocess.Popen[bytes]) -> float:
    """CPU time used so far by a process and its children (uvicorn's workers)."""
    return sum(cpu_seconds_by_name(process).values())


def cpu_seconds_by_name(process: subprocess.Popen[bytes]) -> dict[str, float]:
    """The same, by process name: Core's outbox relay names its process `b24sync-relay`."""
    root = psutil.Process(process.pid)
    totals: dict[str, float] = {}
    for member in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = member.cpu_times()
            name = member.name()
            totals[name] = totals.get(name, 0.0) + times.user + times.system
    return totals


def service_cpu_seconds() -> dict[str, float]:
    """CPU time used so far by the PostgreSQL and RabbitMQ servers (all their processes, so
    whatever else uses them on this machine counts too)."""
    totals = {"postgresql": 0.0, "rabbitmq": 0.0}
    for process in psutil.process_iter(["username", "cpu_times"]):
        service = {"postgres": "postgresql", "rabbitmq": "rabbitmq"}.get(
            process.info["username"] or ""
        )
        times = process.info["cpu_times"]
        if service is not None and times is not None:
            totals[service] += times.user + times.system
    return totals


async def outbox_backlog(connection: Any = None) -> dict[str, float]:
    """Events in the bench database's outbox: all of them, those waiting to be published, and
    the age in seconds of the oldest waiting one (0 when none waits). On `connection` when
    given (an asyncpg connection), otherwise on one of its own."""
    if connection is None:
        connection = await asyncpg.connect(asyncpg_dsn(DATABASE_URL))
        try:
            return await outbox_backlog(connection)
        finally:
            await connection.close()
    row = await connection.fetchrow(
        "SELECT count(*) AS events, count(*) FILTER (WHERE waiting) AS pending,"
        " coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE waiting)), 0)"
        " AS oldest_s"
        " FROM (SELECT created_at, published_at IS NULL AND answered_at IS NULL AS waiting"
        "       FROM outbox_events) AS events"
    )
    return {"events": row["events"], "pending": row["pending"], "oldest_s": float(row["oldest_s"])}


def cpu_speed_ms() -> float:
    """CPU time of a fixed piece of pure Python work, best of five: on a shared virtual machine
    the same code runs measurably slower at times, and this tells such runs apart."""
    best = float("inf")
    for _ in range(5):
        start = time.process_time()
        sum(n * n for n in range(300_000))
        best = min(best, time.process_time() - start)
    return round(best * 1000, 2)


def write_result(name: str, result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {path}")
