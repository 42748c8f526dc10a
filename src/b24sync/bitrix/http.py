"""Health and metrics endpoints of the Bitrix service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr

from b24sync.serving import bearer_token_matches, health_answer, readiness_response

ReadinessCheck = Callable[[], Awaitable[dict[str, bool | str]]]


def create_app(readiness: ReadinessCheck, token: SecretStr | None = None) -> FastAPI:
    """The probes are open; with a `token`, /metrics requires `Authorization: Bearer <token>`."""
    app = FastAPI(title="b24sync Bitrix service", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str | int]:
        return health_answer()

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        checks = await readiness()
        return readiness_response(checks)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if token is not None and not bearer_token_matches(
            request.headers.get("authorization", ""), token
        ):
            return JSONResponse(
                {"detail": "Missing or invalid bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
