"""Liveness and readiness probes (never behind the API token)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from b24sync.serving import health_answer, readiness_response

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 2.0


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str | int]:
    return health_answer()


async def _database_ok(engine: AsyncEngine) -> bool:
    async def ping() -> None:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    try:
        await asyncio.wait_for(ping(), CHECK_TIMEOUT_S)
    except Exception:
        return False
    return True


@router.get(
    "/readyz",
    summary="PostgreSQL and RabbitMQ are reachable",
    responses={503: {"description": "A dependency is unreachable"}},
)
async def readyz(request: Request) -> JSONResponse:
    database = await _database_ok(request.app.state.engine)
    try:
        rabbitmq = await request.app.state.broker.ping(timeout=CHECK_TIMEOUT_S)
    except Exception:
        rabbitmq = False
    return readiness_response({"postgresql": database, "rabbitmq": bool(rabbitmq)})
