"""How far Bitrix24 is behind: `GET /sync` for people, `GET /metrics` for Prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from b24sync.core.dependencies import SessionDep
from b24sync.core.models import SyncStatus
from b24sync.core.sync.schemas import SyncOverview
from b24sync.core.sync.service import sync_overview_service

router = APIRouter(tags=["sync"])
# Open like the probes: counts only, nobody's data.
metrics_router = APIRouter(tags=["health"])


@router.get("/sync", response_model=SyncOverview, summary="Users by sync state, outbox backlog")
async def sync_overview(session: SessionDep) -> SyncOverview:
    return await sync_overview_service.overview(session)


@metrics_router.get("/metrics", summary="The same figures for Prometheus")
async def metrics(session: SessionDep) -> Response:
    overview = await sync_overview_service.overview(session)
    # Read from the database at each scrape: every Core process reports the same figures.
    registry = CollectorRegistry()
    users = Gauge("b24sync_core_users", "Users by sync status.", ["sync_status"], registry=registry)
    for status in SyncStatus:
        users.labels(sync_status=status.value).set(getattr(overview.users, status.value))
    Gauge(
        "b24sync_core_oldest_pending_seconds",
        "Seconds since the least recently changed pending user changed (0 when none).",
        registry=registry,
    ).set(overview.oldest_pending_s or 0)
    Gauge(
        "b24sync_core_outbox_unpublished",
        "Events committed but not yet confirmed by RabbitMQ.",
        registry=registry,
    ).set(overview.outbox.unpublished)
    Gauge(
        "b24sync_core_outbox_oldest_unpublished_seconds",
        "Age of the oldest unpublished event (0 when none).",
        registry=registry,
    ).set(overview.outbox.oldest_unpublished_s or 0)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
