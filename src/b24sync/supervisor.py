"""`b24sync run`: the whole system in the foreground, for a laptop or a demo.

Migrates the database, then starts the emulator (when no real portal is configured), Core and
the Bitrix service as child processes, prefixes and interleaves their output, and stops them all
on Ctrl-C or SIGTERM. Production runs each service on its own (`b24sync core`, `b24sync bitrix`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
from dataclasses import dataclass, field

import httpx

from b24sync.logs import mask_secrets
from b24sync.serving import die_with_parent
from b24sync.settings import Settings

_READY_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0


# The emulator's request limit for each BITRIX_PLAN.
_PORTAL_LIMIT_BY_PLAN = {"standard": "standard", "enterprise": "enterprise", "unlimited": "off"}


@dataclass
class Service:
    name: str  # also the `b24sync` subcommand that runs it
    health_url: str
    env: dict[str, str] = field(default_factory=dict)  # set for this child only
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)


def plan(settings: Settings) -> list[Service]:
    services = []
    if settings.bitrix_webhook_url is None:
        # The emulator takes the Bitrix service's plan, so that their limits never disagree,
        # unless PORTAL_RATE_LIMIT says otherwise.
        env = (
            {}
            if "portal_rate_limit" in settings.model_fields_set
            else {"PORTAL_RATE_LIMIT": _PORTAL_LIMIT_BY_PLAN[settings.bitrix_plan]}
        )
        services.append(Service("portal", f"http://127.0.0.1:{settings.portal_port}/healthz", env))
    services.append(Service("core", f"http://127.0.0.1:{settings.port}/healthz"))
    services.append(Service("bitrix", f"http://127.0.0.1:{settings.bitrix_http_port}/healthz"))
    return services


def _say(prefix: str, line: str) -> None:
    sys.stdout.write(f"{prefix:<8}| {mask_secrets(line)}\n")
    sys.stdout.flush()


async def _pipe_output(name: str, process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None  # spawned with stdout=PIPE
    async for raw in process.stdout:
        _say(name, raw.decode(errors="replace").rstrip())


async def _spawn(
    command: str, extra_env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "b24sync",
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        # Own session: Ctrl-C reaches only the supervisor, which stops children in order.
        start_new_session=True,
        # Children get SIGTERM if the supervisor itself is killed: nothing is left running.
        preexec_fn=functools.partial(die_with_parent, signal.SIGTERM),
    )


async def _wait_healthy(service: Service, client: httpx.AsyncClient) -> bool:
    assert service.process is not None
    deadline = asyncio.get_running_loop().time() + _READY_TIMEOUT_S
    while asyncio.get_running_loop().time() < deadline:
        if service.process.returncode is not None:
            return False
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get(service.health_url)).status_code == 200:
                return True
        await asyncio.sleep(0.2)
    return False


async def _stop(services: list[Service]) -> None:
    """SIGTERM in reverse start order (Core stops publishing before the worker goes), then wait."""
    for service in reversed(services):
        process = service.process
        if process is None or process.returncode is not None:
            continue
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), _STOP_TIMEOUT_S)
        except TimeoutError:
            _say("run", f"{service.name} did not stop in {_STOP_TIMEOUT_S:.0f}s, killing it")
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        _say("run", f"{service.name} stopped (exit code {process.returncode})")


async def _supervise(settings: Settings) -> int:
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)

    migrate = await _spawn("migrate")
    await _pipe_output("migrate", migrate)
    if await migrate.wait() != 0:
        _say("run", "migration failed; is PostgreSQL reachable at DATABASE_URL?")
        return 1

    services = plan(settings)
    pipes: list[asyncio.Task[None]] = []
    exit_code = 0
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            for service in services:
                service.process = await _spawn(service.name, service.env)
                _say("run", f"started {service.name} (pid {service.process.pid})")
                pipes.append(asyncio.create_task(_pipe_output(service.name, service.process)))
                if not await _wait_healthy(service, client):
                    _say("run", f"{service.name} did not become healthy; stopping")
                    return 1
        _announce(settings)
        exited = [asyncio.create_task(s.process.wait()) for s in services if s.process]
        stop_wait = asyncio.create_task(stop_requested.wait())
        done, _ = await asyncio.wait([stop_wait, *exited], return_when=asyncio.FIRST_COMPLETED)
        if stop_wait not in done:
            crashed = next(s for s in services if s.process and s.process.returncode is not None)
            _say("run", f"{crashed.name} exited unexpectedly; stopping the others")
            exit_code = 1
        stop_wait.cancel()
    finally:
        await _stop(services)
        await asyncio.gather(*pipes, return_exceptions=True)
    return exit_code


def _announce(settings: Settings) -> None:
    lines = [
        f"Core API        http://127.0.0.1:{settings.port}  (docs: /docs, sync state: /sync)",
        f"Bitrix service  http://127.0.0.1:{settings.bitrix_http_port}/metrics",
    ]
    if settings.bitrix_webhook_url is None:
        lines.append(
            f"Emulator        http://127.0.0.1:{settings.portal_port}/admin/leads"
            "  (webhook: /rest/<user>/<code>)"
        )
    else:
        lines.append(f"Bitrix24        {mask_secrets(settings.effective_webhook_url)}")
    lines.append("Ready. Ctrl-C stops everything.")
    for line in lines:
        _say("run", line)


def run_all(settings: Settings) -> int:
    return asyncio.run(_supervise(settings))
