"""The portal's HTTP face: `/rest/<user_id>/<code>/<method>[.json]` plus the admin API."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from b24sync.apidocs import add_swagger_ui
from b24sync.logs import get_logger
from b24sync.portal.admin import admin_router
from b24sync.portal.errors import PortalError, query_limit_exceeded
from b24sync.portal.faults import html_page
from b24sync.portal.methods import WRITE_METHODS, call_method
from b24sync.portal.params import merge_params, method_name, parse_body, parse_query
from b24sync.portal.state import Portal
from b24sync.settings import Settings

log = get_logger("b24sync.portal")


@dataclass(frozen=True)
class _Reply:
    response: Response
    outcome: str
    # A "timeout after write": the work is done, the answer leaves only after this delay.
    delay_s: float = 0.0


def _error_reply(error: PortalError) -> _Reply:
    return _Reply(JSONResponse(error.body(), status_code=error.status), error.outcome)


def _html_reply(status: int, outcome: str) -> _Reply:
    return _Reply(HTMLResponse(html_page(status), status_code=status), outcome)


async def _params(request: Request) -> dict[str, Any]:
    body = parse_body(await request.body(), request.headers.get("content-type", ""))
    return merge_params(parse_query(request.url.query), body)


async def _answer(
    portal: Portal, params: dict[str, Any], user_id: str, code: str, name: str
) -> _Reply:
    """One REST call through the same gates as a portal: the front (outage, faults), the
    webhook check, the request limit, then the method under its operating limit."""
    started = time.time()
    faults = portal.faults
    if faults.outage() == "html":
        return _html_reply(503, "OUTAGE")
    try:
        portal.check_auth(user_id, code)
    except PortalError as error:
        return _error_reply(error)
    if faults.config.latency_ms:
        await portal.pause(faults.config.latency_ms / 1000)
    scripted = faults.take_scripted(name)
    if scripted is not None and scripted.kind == "error":
        return _error_reply(PortalError(scripted.http_status, scripted.error, scripted.description))
    if scripted is not None and scripted.kind == "html":
        return _html_reply(scripted.http_status, f"HTML_{scripted.http_status}")
    random_error = faults.random_error()
    if random_error is not None and random_error.html:
        return _html_reply(random_error.status, f"HTML_{random_error.status}")
    if random_error is not None:
        return _error_reply(
            PortalError(random_error.status, "INTERNAL_SERVER_ERROR", "Internal server error")
        )
    if portal.bucket is not None and not portal.bucket.try_acquire():
        return _error_reply(query_limit_exceeded())
    try:
        executed = await call_method(portal, name, params)
    except PortalError as error:
        return _error_reply(error)
    body: dict[str, Any] = {"result": executed.outcome.result}
    if executed.outcome.next is not None:
        body["next"] = executed.outcome.next
    if executed.outcome.total is not None:
        body["total"] = executed.outcome.total
    body["time"] = portal.time_info(name, started, executed.processing_s)
    if scripted is not None:  # the only kind left: timeout_after_write
        delay_s = faults.config.timeout_delay_s if scripted.delay_s is None else scripted.delay_s
    elif name in WRITE_METHODS and faults.random_timeout():
        delay_s = faults.config.timeout_delay_s
    else:
        delay_s = 0.0
    return _Reply(JSONResponse(body), "timeout_after_write" if delay_s else "ok", delay_s)


def create_app(settings: Settings, portal: Portal | None = None) -> FastAPI:
    """The emulator as an ASGI app; pass `portal` to share its state with the caller."""
    state = portal or Portal(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.open()
        yield
        await state.close()

    app = FastAPI(
        title="Bitrix24 portal emulator", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    add_swagger_ui(app)
    app.state.portal = state
    app.include_router(admin_router(state))

    # A route per method, so that each has its own operation id on /docs.
    @app.post("/rest/{user_id}/{code}/{method}")
    @app.get("/rest/{user_id}/{code}/{method}")
    async def rest(request: Request, user_id: str, code: str, method: str) -> Response:
        name = method_name(method)
        state.stats.count_request()
        params = await _params(request)
        reply = await _answer(state, params, user_id, code, name)
        state.stats.record(name, reply.outcome, params)
        # The code is a secret: log the method and the outcome, never the path.
        emit = log.debug if reply.outcome == "ok" else log.info
        emit("portal call", method=name, outcome=reply.outcome, status=reply.response.status_code)
        if reply.delay_s:
            await state.pause(reply.delay_s)
        return reply.response

    @app.post("/rest/{path:path}")
    @app.get("/rest/{path:path}")
    async def rest_without_webhook(path: str) -> Response:
        error = PortalError(401, "NO_AUTH_FOUND", "Wrong authorization data")
        return JSONResponse(error.body(), status_code=error.status)

    return app
