"""`b24sync run`: the whole system in the foreground, for a laptop or a demo.

Checks that the ports it needs are free, migrates the database, then starts the emulator (when
no real portal is configured), Core and the Bitrix service as child processes, each once the one
before answers its health check itself, prefixes and interleaves their output, and stops them
all on Ctrl-C or SIGTERM, or when one exits (naming it, with its exit code and last line).
Production runs each service on its own (`b24sync core`, `b24sync bitrix`).
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

from b24sync.errors import StartupError
from b24sync.logs import mask_secrets
from b24sync.serving import check_port_free, die_with_parent
from b24sync.settings import Settings

_READY_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 30.0


# The emulator's request limit for each BITRIX_PLAN.
_PORTAL_LIMIT_BY_PLAN = {"standard": "standard", "enterprise": "enterprise", "unlimited": "off"}


@dataclass
class Service:
    name: str  # also the `b24sync` subcommand that runs it
    health_url: str
    host: str  # where it listens: the port must be free there before it starts
    port: int
    port_setting: str
    env: dict[str, str] = field(default_factory=dict)  # set for this child only
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)
    # The last line it wrote on stderr: a failed command's one-line reason.
    last_error: str = ""
    pipes: list[asyncio.Task[None]] = field(default_factory=list, repr=False)

    def exit_reason(self) -> str:
        assert self.process is not None
        reason = f": {self.last_error}" if self.last_error else ""
        return f"{self.name} exited with code {self.process.returncode}{reason}"


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
        port = settings.portal_port
        services.append(
            Service(
                "portal",
                f"http://127.0.0.1:{port}/healthz",
                settings.portal_host,
                port,
                "PORTAL_PORT",
                env,
            )
        )
    port = settings.port
    services.append(
        Service("core", f"http://127.0.0.1:{port}/healthz", settings.host, port, "PORT")
    )
    port = settings.bitrix_http_port
    services.append(
        Service(
            "bitrix", f"http://127.0.0.1:{port}/healthz", settings.host, port, "BITRIX_HTTP_PORT"
        )
    )
    return services


def check_ports(services: list[Service]) -> None:
    """Raises `StartupError` naming the port and its setting when one is taken: otherwise a
    health check could reach the other process and take it for ours."""
    for service in services:
        check_port_free(service.host, service.port, service.port_setting)


def _say(prefix: str, line: str) -> None:
    sys.stdout.write(f"{prefix:<8}| {mask_secrets(line)}\n")
    sys.stdout.flush()


async def _pipe_output(
    name: str, stream: asyncio.StreamReader | None, errors: Service | None = None
) -> None:
    """Prints a child's stream line by line; for its stderr (`errors`), keeps the last line."""
    assert stream is not None  # spawned with stdout=PIPE, stderr=PIPE
    async for raw in stream:
        line = raw.decode(errors="replace").rstrip()
        _say(name, line)
        if errors is not None and line.strip():
            errors.last_error = mask_secrets(line.strip())


def _pipe_all(service: Service) -> list[asyncio.Task[None]]:
    assert service.process is not None
    service.pipes = [
        asyncio.create_task(_pipe_output(service.name, service.process.stdout)),
        asyncio.create_task(_pipe_output(service.name, service.process.stderr, service)),
    ]
    return service.pipes


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
        stderr=asyncio.subprocess.PIPE,
        env=env,
        # Own session: Ctrl-C reaches only the supervisor, which stops children in order.
        start_new_session=True,
        # Children get SIGTERM if the supervisor itself is killed: nothing is left running.
        preexec_fn=functools.partial(die_with_parent, signal.SIGTERM),
    )


async def _wait_healthy(service: Service, client: httpx.AsyncClient) -> None:
    """Returns once the child itself answers its health check (the answer names its process id,
    or its parent's for a worker process of it); raises `StartupError` when it exits first or
    does not answer in time."""
    process = service.process
    assert process is not None
    deadline = asyncio.get_running_loop().time() + _READY_TIMEOUT_S
    other = None
    while asyncio.get_running_loop().time() < deadline:
        if process.returncode is not None:
            await asyncio.gather(*service.pipes, return_exceptions=True)
            raise StartupError(service.exit_reason())
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = await client.get(service.health_url)
            if response.status_code == 200:
                answer = response.json()
                if process.pid in (answer.get("pid"), answer.get("ppid")):
                    return
                other = answer.get("pid")
        await asyncio.sleep(0.2)
    elsewhere = (
        f"; another process (pid {other}) answers on {service.port_setting}" if other else ""
    )
    raise StartupError(
        f"{service.name} did not become healthy in {_READY_TIMEOUT_S:.0f}s{elsewhere}"
    )


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

    services = plan(settings)
    check_ports(services)
    migrate = Service("migrate", "", "", 0, "")
    migrate.process = await _spawn("migrate")
    await asyncio.gather(*_pipe_all(migrate))
    if await migrate.process.wait() != 0:
        raise StartupError(migrate.exit_reason())

    pipes: list[asyncio.Task[None]] = []
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            for service in services:
                service.process = await _spawn(service.name, service.env)
                _say("run", f"started {service.name} (pid {service.process.pid})")
                pipes += _pipe_all(service)
                await _wait_healthy(service, client)
        _announce(settings)
        exited = [asyncio.create_task(s.process.wait()) for s in services if s.process]
        stop_wait = asyncio.create_task(stop_requested.wait())
        done, _ = await asyncio.wait([stop_wait, *exited], return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if stop_wait not in done:
            crashed = next(s for s in services if s.process and s.process.returncode is not None)
            # Its last words first, then the reason, once the others are stopped.
            await asyncio.gather(*crashed.pipes, return_exceptions=True)
            _say("run", f"{crashed.exit_reason()}; stopping the others")
            raise StartupError(crashed.exit_reason())
    finally:
        await _stop(services)
        await asyncio.gather(*pipes, return_exceptions=True)
    return 0


def _announce(settings: Settings) -> None:
    lines = [
        f"Core API        http://127.0.0.1:{settings.port}  (docs: /docs, sync state: /sync)",
        f"Dashboard       http://127.0.0.1:{settings.port}/ui",
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
