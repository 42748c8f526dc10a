"""Our services as real processes (`b24sync core|bitrix|portal`) on a test's settings."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import asyncpg  # type: ignore[import-untyped]

from b24sync.settings import Settings
from tests.conftest import RABBITMQ_URL, REDIS_URL, eventually, forget, free_port

B24SYNC = str(Path(sys.executable).parent / "b24sync")
# What each service prints once it is ready for work.
BITRIX_READY = "[Bitrix] Service started"
CORE_READY = "Application startup complete"
PORTAL_READY = "Bitrix24 portal emulator listening"
# Variables every b24sync process reads: a test sets its own, none come from the shell.
_SETTING_NAMES = {name.upper() for name in Settings.model_fields}


def service_environment(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment of a `b24sync` process on the test's database, queues, Redis prefix and
    ports; `extra` sets or overrides variables (LOG_LEVEL defaults to WARNING)."""
    inherited = {key: value for key, value in os.environ.items() if key not in _SETTING_NAMES}
    return {
        **inherited,
        "DATABASE_URL": settings.database_url,
        "RABBITMQ_URL": settings.rabbitmq_url,
        "RABBITMQ_QUEUE": settings.rabbitmq_queue,
        "RABBITMQ_REPLY_QUEUE": settings.rabbitmq_reply_queue,
        "REDIS_URL": settings.redis_url,
        "BULLMQ_PREFIX": settings.bullmq_prefix,
        "PORT": str(settings.port),
        "BITRIX_HTTP_PORT": str(settings.bitrix_http_port),
        "PORTAL_PORT": str(settings.portal_port),
        "HOST": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        **extra,
    }


def _drop_database(name: str) -> None:
    async def drop() -> None:
        connection = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()

    asyncio.run(drop())


@contextlib.contextmanager
def system_environment(database: str, tag: str, **extra: str) -> Iterator[dict[str, str]]:
    """Environment of a whole system (`b24sync run`) of a test's own: a database made afresh,
    queues and a Redis prefix named `tag`, free ports; all of it removed afterwards."""
    _drop_database(database)
    suffix = f"{tag}-{uuid4().hex[:8]}"
    env = {key: value for key, value in os.environ.items() if key not in _SETTING_NAMES}
    env.update(
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:5432/{database}",
        RABBITMQ_URL=RABBITMQ_URL,
        REDIS_URL=REDIS_URL,
        RABBITMQ_QUEUE=f"{suffix}.bitrix_queue",
        RABBITMQ_REPLY_QUEUE=f"{suffix}.bitrix.responses",
        BULLMQ_PREFIX=suffix,
        PORT=str(free_port()),
        BITRIX_HTTP_PORT=str(free_port()),
        PORTAL_PORT=str(free_port()),
        HOST="127.0.0.1",
        **extra,
    )
    try:
        yield env
    finally:
        asyncio.run(forget([env["RABBITMQ_QUEUE"], env["RABBITMQ_REPLY_QUEUE"]], suffix))
        _drop_database(database)


async def start_command(
    settings: Settings, *args: str, cwd: Path | None = None, **env: str
) -> asyncio.subprocess.Process:
    """`b24sync ARGS` run as an operator runs it, on the test's settings; `env` sets or
    overrides variables. A wide terminal, so that tables are not folded."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "b24sync",
        *args,
        env=service_environment(settings, COLUMNS="200", **env),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finished(process: asyncio.subprocess.Process) -> tuple[int, str, str]:
    """The exit status, standard output and standard error of a command started above."""
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def b24sync_command(
    settings: Settings, *args: str, cwd: Path | None = None, **env: str
) -> tuple[int, str, str]:
    """Runs `b24sync ARGS` to its end; its exit status, stdout and stderr."""
    return await finished(await start_command(settings, *args, cwd=cwd, **env))


class ServiceProcess:
    """One `b24sync <command>` process with its output collected line by line; `start` returns
    once the process printed `ready_line`."""

    def __init__(self, command: str, env: dict[str, str], cwd: Path, ready_line: str) -> None:
        self.command = command
        self.env = env
        self.cwd = cwd
        self.ready_line = ready_line
        self.lines: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            B24SYNC,
            self.command,
            env=self.env,
            cwd=self.cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())
        await self.wait_for(self.ready_line)

    async def _read(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.lines.append(line.decode(errors="replace").rstrip())

    async def wait_for(self, text: str, wait_s: float = 20.0) -> None:
        async def printed() -> bool:
            if self.process is not None and self.process.returncode is not None:
                raise AssertionError(f"the process exited:\n{self.output}")
            return text in self.output

        await eventually(printed, wait_s)

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(sig)
        code = await asyncio.wait_for(self.process.wait(), 30)
        if self._reader is not None:
            await self._reader
        return code

    async def kill(self) -> None:
        """Ends the process if it still runs (a test's clean-up, whatever happened)."""
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        if self._reader is not None:
            await self._reader
