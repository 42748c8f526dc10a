"""The Core application: the users API, plus the outbox relay and the reply consumer running
beside it for the lifetime of the app."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from faststream.rabbit import RabbitBroker
from sqlalchemy.exc import DBAPIError
from starlette.types import ASGIApp, Receive, Scope, Send

from b24sync.apidocs import add_swagger_ui
from b24sync.core.backoff import Backoff
from b24sync.core.dashboard.endpoints import page_router as dashboard_page_router
from b24sync.core.dashboard.endpoints import router as dashboard_router
from b24sync.core.db import (
    DATABASE_UNAVAILABLE_ERRORS,
    close_write_pool,
    create_engine,
    create_sessionmaker,
    create_write_pool,
    database_unavailable,
)
from b24sync.core.dependencies import require_token
from b24sync.core.exceptions import (
    CoreError,
    database_unavailable_response,
    error_response,
    sendable_error,
)
from b24sync.core.health import router as health_router
from b24sync.core.middleware import (
    AccessLogMiddleware,
    BodySizeLimitMiddleware,
    QueryEncodingMiddleware,
)
from b24sync.core.migrate import check_schema
from b24sync.core.outbox.relay import Relay
from b24sync.core.pipeline.endpoints import close_queue_reader
from b24sync.core.pipeline.endpoints import router as pipeline_router
from b24sync.core.sync.consumer import register_reply_consumer
from b24sync.core.sync.endpoints import metrics_router as sync_metrics_router
from b24sync.core.sync.endpoints import router as sync_router
from b24sync.core.users.endpoints import router as users_router
from b24sync.core.users.repository import grouped_creates
from b24sync.core.users.service import WriteGroups, grouped_changes
from b24sync.core.users.write_path import UserWritePath
from b24sync.logs import get_logger
from b24sync.messaging import describe_url
from b24sync.settings import Settings, get_settings

log = get_logger(__name__)

DESCRIPTION = """Users kept in sync with Bitrix24 CRM leads.

Every change is stored together with its event in one transaction (a transactional outbox);
the event reaches the Bitrix service through RabbitMQ, and its reply updates the user's `sync`
state. With `CORE_API_TOKEN` set, send `Authorization: Bearer <token>`.
"""


async def connect_broker(broker: RabbitBroker, url: str) -> None:
    """Connects and starts the reply consumer, retrying until RabbitMQ answers.

    Core serves writes meanwhile (the relay has connections of its own), and the robust
    connection reconnects by itself after that.
    """
    backoff = Backoff(initial_s=0.5, max_s=15.0)
    while True:
        try:
            await broker.start()
        except Exception as exc:
            delay = backoff.failed()
            if backoff.should_log:
                log.warning(
                    "[Core] RabbitMQ unreachable, will retry: check RABBITMQ_URL",
                    url=describe_url(url),
                    error=exc,
                    retry_in_s=delay,
                )
            with suppress(Exception):
                await broker.stop()
            await asyncio.sleep(delay)
            continue
        log.info("[Core] Connected to RabbitMQ successfully", url=describe_url(url))
        return


class CoreApp(FastAPI):
    """FastAPI behind `front`: the users API's writes and the access log run in front of
    Starlette's own middleware stack (its error and exception layers, a tenth of a write's
    CPU), which a write answered on its own does not need; an error they do not answer is the
    server's 500, as Starlette's would be."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.front: ASGIApp = self.serve

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app as FastAPI serves it."""
        await super().__call__(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.front(scope, receive, send)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        try:
            await check_schema(engine)
        except BaseException:
            await engine.dispose()
            raise
        # A pool for each kind of group: a failed group's items retried one by one never hold
        # up the other kind.
        create_pool = await create_write_pool(settings, settings.create_groups_in_flight)
        change_pool = await create_write_pool(settings, settings.change_groups_in_flight)
        write_groups = WriteGroups(
            grouped_creates(create_pool, settings.create_groups_in_flight),
            grouped_changes(change_pool, settings),
        )
        sessionmaker = create_sessionmaker(engine)
        # Only the reply consumer's: its per-message access log at INFO would be noise. No
        # dependency injection: it handed every delivery to a worker thread and back (the
        # message's context field is a synchronous call), a tenth of Core's CPU on replies.
        broker = RabbitBroker(settings.rabbitmq_url, log_level=logging.DEBUG, apply_types=False)
        register_reply_consumer(broker, settings, sessionmaker)
        app.state.engine = engine
        app.state.sessionmaker = sessionmaker
        app.state.write_groups = write_groups
        app.state.broker = broker
        tasks = [asyncio.create_task(connect_broker(broker, settings.rabbitmq_url), name="broker")]
        if not settings.outbox_relay_process:  # otherwise core/outbox/process.py runs it
            relay = Relay(settings, engine)
            tasks.append(asyncio.create_task(relay.run(), name="outbox-relay"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with suppress(Exception):
                await broker.stop()
            await close_queue_reader(app)
            for pool in (create_pool, change_pool):
                await close_write_pool(pool, settings.shutdown_timeout_s)
            await engine.dispose()

    app = CoreApp(
        title="b24sync Core",
        description=DESCRIPTION,
        version="0.1.0",
        lifespan=lifespan,
        # Served below, behind the token like every route but the probes.
        docs_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.state.write_groups = None  # until the lifespan starts them
    app.add_middleware(BodySizeLimitMiddleware)
    app.add_middleware(QueryEncodingMiddleware)
    app.front = UserWritePath(app.serve, app.state)
    if settings.access_log:  # outermost: it sees the answers of the checks above too
        app.front = AccessLogMiddleware(app.front)
    app.include_router(health_router)
    # Without CORE_API_TOKEN there is nothing to check: no dependency to run on every request.
    token_check = [Depends(require_token)] if settings.core_api_token is not None else []
    # The figures tell how many users there are and how the sync fares: not for everybody.
    app.include_router(sync_metrics_router, dependencies=token_check)
    app.include_router(users_router, dependencies=token_check)
    app.include_router(sync_router, dependencies=token_check)
    app.include_router(pipeline_router, dependencies=token_check)
    # The page and its files hold no data: it asks for the token and sends it with its calls.
    app.include_router(dashboard_page_router)
    app.include_router(dashboard_router, dependencies=token_check)
    docs = APIRouter(dependencies=token_check, include_in_schema=False)

    @docs.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    app.include_router(docs)
    add_swagger_ui(app, dependencies=token_check)

    @app.exception_handler(CoreError)
    async def core_error(_: Request, exc: CoreError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes every input, and fails with a 500 on one that JSON in
        # UTF-8 cannot carry (NaN, Infinity, a lone surrogate).
        errors = [sendable_error(error) for error in jsonable_encoder(exc.errors())]
        return JSONResponse({"detail": errors}, status_code=422)

    async def database_error(_: Request, exc: Exception) -> JSONResponse:
        if not database_unavailable(exc):
            raise exc  # a bug: the server's 500, with its traceback in the log
        return database_unavailable_response(exc)

    for error in (*DATABASE_UNAVAILABLE_ERRORS, DBAPIError):
        app.add_exception_handler(error, database_error)

    return app


def app_from_environment() -> FastAPI:
    """Factory for uvicorn worker processes, which read their settings from the environment."""
    from b24sync.core.main import configure_core_logging, tune_gc

    settings = get_settings()
    configure_core_logging(settings)
    app = create_app(settings)
    tune_gc()
    return app
