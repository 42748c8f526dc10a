"""`b24sync core`: checks the schema, then serves the app with uvicorn."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import uvicorn
import uvloop

from b24sync.core.migrate import check_database
from b24sync.core.outbox import process as outbox_process
from b24sync.logs import configure_logging, get_logger
from b24sync.serving import EmbeddedServer, HttpProtocol, check_port_free, wait_for_stop_signal
from b24sync.settings import Settings

log = get_logger(__name__)


def tune_gc() -> None:
    """Fewer, cheaper collections: a request allocates many short-lived objects, and the
    default gen-0 threshold (700) runs a collection every few requests. Objects alive after
    startup (modules, models, the app) are frozen out of every later collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def configure_core_logging(settings: Settings) -> None:
    token = settings.core_api_token.get_secret_value() if settings.core_api_token else None
    configure_logging(
        settings.log_level,
        settings.log_json,
        secrets=[token] if token else [],
        personal_data=settings.log_pii,
    )


def run(settings: Settings) -> None:
    """Raises `StartupError` (one line: the setting to check) when the database is unreachable
    or not migrated, or the port is taken."""
    configure_core_logging(settings)
    asyncio.run(check_database(settings))
    check_port_free(settings.host, settings.port, "PORT")
    options = {
        "http": HttpProtocol,
        "timeout_graceful_shutdown": int(settings.shutdown_timeout_s),
    }
    tune_gc()
    relay = outbox_process.start(settings) if settings.outbox_relay_process else None
    try:
        _serve_http(settings, options)
    finally:
        if relay is not None:
            outbox_process.stop(relay, settings.shutdown_timeout_s)


def _serve_http(settings: Settings, options: dict[str, Any]) -> None:
    if settings.core_workers > 1:
        # uvicorn's process manager forks the workers and forwards signals to them.
        uvicorn.run(
            "b24sync.core.app:app_from_environment",
            host=settings.host,
            port=settings.port,
            factory=True,
            workers=settings.core_workers,
            loop="uvloop",
            access_log=False,
            log_config=None,  # keep the structlog handlers configured above
            **options,
        )
    else:
        uvloop.run(_serve(settings, options))


async def _serve(settings: Settings, options: dict[str, Any]) -> None:
    from b24sync.core.app import create_app

    server = EmbeddedServer(
        create_app(settings), settings.host, settings.port, port_setting="PORT", **options
    )
    await server.start()
    try:
        await wait_for_stop_signal()
    finally:
        await server.stop()
