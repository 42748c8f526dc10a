"""The system under trouble, as real processes on the suite's infrastructure: the emulator,
Core and two Bitrix service processes, each with its log file."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx

from b24sync.settings import Settings
from tests.chaos.infra import Infrastructure, wait_ready
from tests.chaos.managed import ManagedProcess
from tests.chaos.profiles import CLIENT_TIMEOUT_S, HELD_ANSWER_S
from tests.conftest import free_port
from tests.processes import B24SYNC, service_environment

DATABASE = "core_db"
BITRIX_PROCESSES = 2
# Everything else is the services' default.
CHAOS_ENVIRONMENT = {
    "LOG_LEVEL": "INFO",
    "PORTAL_RATE_LIMIT": "standard",
    "BITRIX_PLAN": "standard",
    "BITRIX_TIMEOUT_S": str(CLIENT_TIMEOUT_S),
    "PORTAL_TIMEOUT_DELAY_S": str(HELD_ANSWER_S),
}


class Service:
    """One `b24sync <command>` process and the URL that says it is ready."""

    def __init__(
        self, name: str, command: str, env: dict[str, str], ready_url: str, run_dir: Path
    ) -> None:
        self.name = name
        self.ready_url = ready_url
        self.process = ManagedProcess(
            name, [B24SYNC, command], run_dir / "logs" / f"{name}.log", env=env, cwd=run_dir
        )

    async def start(self) -> None:
        self.process.start()
        await wait_ready(self.process, self._ready)

    async def _ready(self) -> None:
        async with httpx.AsyncClient(timeout=2) as client:
            (await client.get(self.ready_url)).raise_for_status()

    def kill(self) -> None:
        self.process.kill()


class System:
    """The services of one run. They run in `run_dir`, so no `.env` of the developer's (a real
    portal's webhook, say) reaches them; their logs go to `run_dir/logs`."""

    def __init__(self, infra: Infrastructure, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            database_url=infra.postgres.url(DATABASE),
            rabbitmq_url=infra.rabbitmq.url,
            redis_url=infra.redis.url,
            port=free_port(),
            portal_port=free_port(),
            bitrix_http_port=free_port(),
        )
        self.environment = service_environment(self.settings, **CHAOS_ENVIRONMENT)
        self.core_url = f"http://127.0.0.1:{self.settings.port}"
        self.portal_url = f"http://127.0.0.1:{self.settings.portal_port}"
        self.portal = Service(
            "portal", "portal", self.environment, f"{self.portal_url}/healthz", run_dir
        )
        self.core = Service("core", "core", self.environment, f"{self.core_url}/readyz", run_dir)
        self.bitrix: list[Service] = []
        for number in range(1, BITRIX_PROCESSES + 1):
            port = self.settings.bitrix_http_port if number == 1 else free_port()
            env = {**self.environment, "BITRIX_HTTP_PORT": str(port)}
            url = f"http://127.0.0.1:{port}/readyz"
            self.bitrix.append(Service(f"bitrix-{number}", "bitrix", env, url, run_dir))

    @property
    def services(self) -> list[Service]:
        return [self.portal, self.core, *self.bitrix]

    @property
    def variables(self) -> dict[str, str]:
        """The services' settings as the suite set them (the rest are the defaults)."""
        return {
            name: value
            for name, value in self.environment.items()
            if name.lower() in Settings.model_fields or name in CHAOS_ENVIRONMENT
        }

    @property
    def log_files(self) -> dict[str, str]:
        return {service.name: str(service.process.log_path) for service in self.services}

    async def migrate(self) -> None:
        migrate = ManagedProcess(
            "migrate",
            [B24SYNC, "migrate"],
            self.run_dir / "logs" / "migrate.log",
            env=self.environment,
            cwd=self.run_dir,
        )
        migrate.start()
        code = await asyncio.to_thread(migrate.wait, 120.0)
        if code != 0:
            raise RuntimeError(f"b24sync migrate failed ({code}); see {migrate.log_path}")

    async def start(self) -> None:
        await self.migrate()
        for service in self.services:
            await service.start()

    def stop(self) -> None:
        """Core first (it stops publishing), the workers, the emulator last."""
        for service in [self.core, *self.bitrix, self.portal]:
            with contextlib.suppress(Exception):
                service.process.stop(wait_s=15)
