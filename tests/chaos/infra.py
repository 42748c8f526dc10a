"""The suite's own PostgreSQL, Redis and RabbitMQ: spare ports, data in a temporary directory,
started, restarted and stopped by the suite. The machine's shared services are never touched
(RabbitMQ even gets an epmd of its own)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

import aio_pika
import asyncpg
from redis.asyncio import Redis

from tests.chaos.managed import ManagedProcess
from tests.conftest import free_port

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # the scripts themselves: /usr/sbin's wrappers
# switch to the rabbitmq user and the machine's own cookie.
# PostgreSQL refuses to run as root: root runs it as the postgres user, anyone else as themselves.
POSTGRES_USER = "postgres" if os.geteuid() == 0 else None
_READY_WAIT_S = 90.0


def postgres_bin() -> Path:
    """The newest PostgreSQL installed under /usr/lib/postgresql."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda path: [int(part) for part in re.findall(r"\d+", path.parent.parent.name)],
    )
    if not found:
        raise RuntimeError("no PostgreSQL under /usr/lib/postgresql/*/bin")
    return found[-1].parent


async def wait_ready(
    process: ManagedProcess, check: Callable[[], Awaitable[None]], wait_s: float = _READY_WAIT_S
) -> None:
    """Until `check()` passes; fails at once when the process exited."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        process.check_running()
        try:
            await check()
            return
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.25)


class Postgres:
    def __init__(self, data_root: Path, logs: Path) -> None:
        self.port = free_port()
        self.data = data_root / "postgres"
        self.bin = postgres_bin()
        self.process = ManagedProcess(
            "postgres",
            [
                str(self.bin / "postgres"),
                *("-D", str(self.data), "-p", str(self.port)),
                *("-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="),
                # Nothing here outlives the run; a restart is a clean (fast) shutdown.
                *("-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200"),
            ],
            logs / "postgres.log",
            user=POSTGRES_USER,
            stop_signal=signal.SIGINT,  # fast shutdown: clients are cut off, nothing is lost
        )

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def start(self) -> None:
        if not self.data.exists():
            self.data.mkdir()
            if POSTGRES_USER is not None:
                shutil.chown(self.data, POSTGRES_USER, POSTGRES_USER)
            with self.process.log_path.open("ab") as log:
                initdb = await asyncio.create_subprocess_exec(
                    *(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres"),
                    *("--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "-N"),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    user=POSTGRES_USER,
                )
                if await initdb.wait() != 0:
                    raise RuntimeError(f"initdb failed; see {self.process.log_path}")
        self.process.start()
        await wait_ready(self.process, self._accepts)

    async def _accepts(self) -> None:
        connection = await asyncpg.connect(self.url("postgres"), timeout=2)
        await connection.close()

    def stop(self) -> None:
        self.process.stop()


class RedisServer:
    def __init__(self, data_root: Path, logs: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        data = data_root / "redis"
        data.mkdir()
        self.process = ManagedProcess(
            "redis",
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(data)),
            ],
            logs / "redis.log",
        )

    async def start(self) -> None:
        self.process.start()
        await wait_ready(self.process, self._pings)

    async def _pings(self) -> None:
        async with Redis.from_url(self.url, socket_timeout=2) as redis:
            await redis.ping()

    def stop(self) -> None:
        self.process.stop()


class RabbitMQ:
    """A second RabbitMQ node: own name, ports, Mnesia and logs, own epmd and cookie, no
    plugins; `rabbitmq-server` in the foreground, stopped with SIGTERM (its script then stops
    the node cleanly)."""

    def __init__(self, data_root: Path, logs: Path) -> None:
        self.port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}"
        self.node = f"b24sync-chaos-{secrets.token_hex(4)}@localhost"
        home = data_root / "rabbitmq"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        (home / "enabled_plugins").write_text("")
        (home / "rabbitmq-env.conf").write_text("")
        (home / "rabbitmq.conf").write_text("")
        epmd_port = free_port()
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "LANG": "C.UTF-8",
            "HOME": str(home),  # the node's cookie, and rabbitmqctl's
            "ERL_EPMD_PORT": str(epmd_port),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(home / "log"),
            "RABBITMQ_LOGS": "-",  # into rabbitmq.log with the rest of its output
            "RABBITMQ_PID_FILE": str(home / "rabbitmq.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
            # Not the machine's /etc/rabbitmq files, which name the shared node and port.
            "RABBITMQ_CONF_ENV_FILE": str(home / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq.conf"),
        }
        self.epmd = ManagedProcess(
            "epmd",
            ["epmd", "-port", str(epmd_port), "-address", "127.0.0.1"],
            logs / "epmd.log",
            env=env,
        )
        self.process = ManagedProcess(
            "rabbitmq", [str(RABBITMQ_BIN / "rabbitmq-server")], logs / "rabbitmq.log", env=env
        )

    async def start(self) -> None:
        if not self.epmd.running:
            self.epmd.start()
        self.process.start()
        await wait_ready(self.process, self._connects)

    async def _connects(self) -> None:
        # The port opens once the node is ready; only then a client, whose failures are logged.
        _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.close()
        await writer.wait_closed()
        connection = await aio_pika.connect(self.url, timeout=5)
        await connection.close()

    def stop(self) -> None:
        self.process.stop(wait_s=60)

    def close(self) -> None:
        self.stop()
        self.epmd.stop()


class Infrastructure:
    """`async with Infrastructure(logs) as infra:` all three, removed again at the end."""

    def __init__(self, logs: Path) -> None:
        self.data_root = Path(tempfile.mkdtemp(prefix="b24sync-chaos-"))
        # PostgreSQL runs as its own user and must reach its data directory.
        self.data_root.chmod(0o711)
        self.postgres = Postgres(self.data_root, logs)
        self.redis = RedisServer(self.data_root, logs)
        self.rabbitmq = RabbitMQ(self.data_root, logs)

    async def __aenter__(self) -> Infrastructure:
        try:
            await asyncio.gather(self.postgres.start(), self.redis.start(), self.rabbitmq.start())
        except BaseException:
            self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for stop in (self.rabbitmq.close, self.redis.stop, self.postgres.stop):
            with contextlib.suppress(Exception):
                stop()
        shutil.rmtree(self.data_root, ignore_errors=True)
