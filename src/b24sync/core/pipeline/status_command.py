"""`b24sync status`: is every piece up, and how far behind is Bitrix24. Reads the database and
Redis directly (Core need not run) and asks each service's `/healthz`. Exit status 1 when
anything is down."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aio_pika
import httpx
from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table
from rich.text import Text

from b24sync.core.command_session import command_session
from b24sync.core.migrate import check_database
from b24sync.core.pipeline.schemas import PipelineSnapshot
from b24sync.core.pipeline.service import QueueReader, pipeline_service
from b24sync.errors import StartupError, os_reason
from b24sync.messaging import describe_url
from b24sync.settings import Settings

CHECK_WAIT_S = 3.0
UP, DOWN = 0, 1


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    where: str
    problem: str | None  # None: up


async def _probe(name: str, where: str, attempt: Awaitable[object]) -> Check:
    try:
        await asyncio.wait_for(attempt, CHECK_WAIT_S)
    except TimeoutError:
        return Check(name, where, f"no answer within {CHECK_WAIT_S:g} s")
    except StartupError as exc:
        return Check(name, where, str(exc))
    except Exception as exc:
        return Check(name, where, os_reason(exc))
    return Check(name, where, None)


async def _rabbitmq(url: str) -> None:
    connection = await aio_pika.connect(url, timeout=CHECK_WAIT_S)
    await connection.close()


async def _redis(url: str) -> None:
    redis = Redis.from_url(url, socket_connect_timeout=CHECK_WAIT_S)
    try:
        await redis.ping()
    finally:
        await redis.aclose()


async def _http(url: str, *, any_answer: bool = False) -> None:
    """A 2xx answer, or with `any_answer` any HTTP answer at all (a portal's home page)."""
    async with httpx.AsyncClient(timeout=CHECK_WAIT_S) as http:
        response = await http.get(url)
    if not any_answer and not response.is_success:
        raise StartupError(f"answered HTTP {response.status_code}")


def portal_check(settings: Settings) -> tuple[str, str, str, bool]:
    """The portal's name, its address as shown, the URL asked, and whether any answer will do:
    the emulator's /healthz, or a real portal's home page (never the webhook's path)."""
    if settings.bitrix_webhook_url is None:
        where = settings.portal_base_url
        return "Bitrix24 emulator", where, f"{where}/healthz", False
    parts = urlsplit(settings.bitrix_webhook_url.get_secret_value())
    port = f":{parts.port}" if parts.port else ""
    where = f"{parts.scheme}://{parts.hostname}{port}"
    return "Bitrix24 portal", where, f"{where}/", True


async def check_all(settings: Settings) -> list[Check]:
    core = f"http://127.0.0.1:{settings.port}"
    bitrix = f"http://127.0.0.1:{settings.bitrix_http_port}"
    portal_name, portal_where, portal_url, any_answer = portal_check(settings)
    probes = [
        ("PostgreSQL", describe_url(settings.database_url), check_database(settings)),
        ("RabbitMQ", describe_url(settings.rabbitmq_url), _rabbitmq(settings.rabbitmq_url)),
        ("Redis", describe_url(settings.redis_url), _redis(settings.redis_url)),
        ("Core", core, _http(f"{core}/healthz")),
        ("Bitrix service", bitrix, _http(f"{bitrix}/healthz")),
        (portal_name, portal_where, _http(portal_url, any_answer=any_answer)),
    ]
    return list(await asyncio.gather(*(_probe(name, where, work) for name, where, work in probes)))


async def _snapshot(settings: Settings) -> PipelineSnapshot:
    reader = QueueReader(settings)
    try:
        async with command_session(settings) as session:
            return await pipeline_service.snapshot(session, settings, reader)
    finally:
        await reader.aclose()


async def _status(settings: Settings) -> tuple[list[Check], PipelineSnapshot | None]:
    checks = await check_all(settings)
    database_up = checks[0].problem is None
    return checks, await _snapshot(settings) if database_up else None


def _age(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds:.0f} s"


def render(console: Console, checks: list[Check], snapshot: PipelineSnapshot | None) -> None:
    table = Table("dependency", "where", "state", "problem", title="Dependencies")
    for check in checks:
        state = Text("up", style="green") if check.problem is None else Text("down", style="red")
        table.add_row(check.name, check.where, state, check.problem or "")
    console.print(table)
    if snapshot is None:
        console.print("No figures: the database cannot be read.")
        return
    sync = snapshot.sync
    figures = Table.grid(padding=(0, 2))
    users = sync.users
    figures.add_row(
        "users",
        f"{users.total} total: {users.pending} pending, {users.synced} synced, "
        f"{users.failed} failed ({sync.failed.retrying} retrying, "
        f"{sync.failed.permanent} permanent); oldest pending {_age(sync.oldest_pending_s)}",
    )
    figures.add_row(
        "outbox",
        f"{sync.outbox.unpublished} unpublished; oldest {_age(sync.outbox.oldest_unpublished_s)}",
    )
    if snapshot.queue is not None and snapshot.bitrix is not None:
        queue, bitrix = snapshot.queue, snapshot.bitrix
        figures.add_row(
            f"queue {snapshot.queue_name}",
            f"{queue.waiting} waiting, {queue.active} active, {queue.delayed} delayed, "
            f"{queue.failed} failed",
        )
        ceiling = "no limit" if bitrix.ceiling_per_s is None else f"{bitrix.ceiling_per_s:g}/s"
        figures.add_row(
            "Bitrix24",
            f"{bitrix.requests_per_s:g} requests/s over {bitrix.window_s} s "
            f"(plan {bitrix.plan}: {ceiling}); {bitrix.limit_answers} limit answer(s)",
        )
    else:
        figures.add_row(f"queue {snapshot.queue_name}", Text(str(snapshot.redis_error), "red"))
    console.print(figures)
    if snapshot.recent_failures:
        failures = Table("user", "name", "reason", "kind", "attempts", title="Recent failures")
        for failure in snapshot.recent_failures:
            code = f" ({failure.code})" if failure.code else ""
            failures.add_row(
                str(failure.user_id),
                failure.full_name,
                f"{failure.reason}{code}",
                "retrying" if failure.retryable else "permanent",
                str(failure.attempts),
            )
        console.print(failures)


def run(settings: Settings) -> int:
    checks, snapshot = asyncio.run(_status(settings))
    render(Console(), checks, snapshot)
    return UP if all(check.problem is None for check in checks) else DOWN
