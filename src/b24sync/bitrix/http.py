"""Health and metrics endpoints of the Bitrix service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from b24sync.serving import readiness_response

ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]


def create_app(readiness: ReadinessCheck) -> FastAPI:
    app = FastAPI(title="b24sync Bitrix service", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        checks = await readiness()
        return readiness_response(checks)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
