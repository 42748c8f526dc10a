"""`GET /sync/pipeline`: the whole pipeline at a glance, for people and the dashboard."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request

from b24sync.core.dependencies import SessionDep, SettingsDep
from b24sync.core.pipeline.schemas import PipelineSnapshot
from b24sync.core.pipeline.service import QueueReader, pipeline_service

router = APIRouter(tags=["sync"])


async def get_queue_reader(request: Request, settings: SettingsDep) -> QueueReader:
    """The app's reader, made on first use (connecting lazily) and closed with the app."""
    state = request.app.state
    if getattr(state, "queue_reader", None) is None:
        state.queue_reader = QueueReader(settings)
    reader: QueueReader = state.queue_reader
    return reader


@router.get(
    "/sync/pipeline",
    response_model=PipelineSnapshot,
    summary="Users by sync state, outbox, BullMQ queue, Bitrix24 requests, recent failures",
)
async def pipeline(
    session: SessionDep,
    settings: SettingsDep,
    reader: Annotated[QueueReader, Depends(get_queue_reader)],
) -> PipelineSnapshot:
    """Redis being unreachable leaves `queue` and `bitrix` null and says why in
    `redis_error`; the rest still answers."""
    return await pipeline_service.snapshot(session, settings, reader)


async def close_queue_reader(app: FastAPI) -> None:
    """Closes the reader when the app stops (a no-op when it was never used)."""
    reader: QueueReader | None = getattr(app.state, "queue_reader", None)
    if reader is not None:
        app.state.queue_reader = None
        await reader.aclose()
