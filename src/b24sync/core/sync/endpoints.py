"""How far Bitrix24 is behind: `GET /sync` for people, `GET /metrics` for Prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi import status as http_status
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from b24sync.core.dependencies import SessionDep, SettingsDep
from b24sync.core.models import SyncStatus
from b24sync.core.sync.schemas import ResyncRequest, ResyncResult, SyncOverview
from b24sync.core.sync.service import resync_service, sync_overview_service

router = APIRouter(tags=["sync"])
# Counts only, nobody's data; behind CORE_API_TOKEN like the API when one is set (core/app.py).
metrics_router = APIRouter(tags=["health"])


@router.get("/sync", response_model=SyncOverview, summary="Users by sync state, outbox backlog")
async def sync_overview(session: SessionDep) -> SyncOverview:
    return await sync_overview_service.overview(session)


@router.post(
    "/sync/resync",
    status_code=http_status.HTTP_202_ACCEPTED,
    response_model=ResyncResult,
    summary="Send users again as they are now",
)
async def resync(session: SessionDep, settings: SettingsDep, data: ResyncRequest) -> ResyncResult:
    """Each user gets a new event (a create while its lead id is unknown, an update otherwise)
    and is pending until its answer. One transaction: for very large sets `b24sync resync`
    commits page by page."""
    if data.user_ids is not None:
        resent = await resync_service.resync(session, settings, data.user_ids, force=data.force)
    else:
        only = SyncStatus.FAILED if data.status is not None else None
        resent = await resync_service.resync_all(session, settings, only=only, force=data.force)
    return ResyncResult(resent=resent)


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
    failed = Gauge(
        "b24sync_core_failed_users",
        "Failed users: retrying (Core sends them again) or permanent (wait for a change).",
        ["kind"],
        registry=registry,
    )
    failed.labels(kind="retrying").set(overview.failed.retrying)
    failed.labels(kind="permanent").set(overview.failed.permanent)
    Gauge(
        "b24sync_core_next_retry_seconds",
        "Seconds until Core's next retry of a failed user is due (0 when due or none waits).",
        registry=registry,
    ).set(max(overview.failed.next_retry_in_s or 0, 0))
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
