"""The dashboard's settings for the browser and the emulator's leads by stage."""

from __future__ import annotations

from collections import defaultdict
from typing import Any
from urllib.parse import urlsplit

import httpx

from b24sync.core.dashboard.schemas import DashboardConfig, LeadBoard, LeadCard, StageColumn
from b24sync.settings import Settings

# Cards shown per column; the count tells the rest.
CARDS_PER_COLUMN = 50
EMULATOR_WAIT_S = 2.0


def lead_url(settings: Settings) -> str | None:
    """`https://PORTAL/crm/lead/details/{id}/` from BITRIX_WEBHOOK_URL, without its path (the
    webhook's user and code) or credentials; None on the emulator, which has no lead pages."""
    if settings.bitrix_webhook_url is None:
        return None
    parts = urlsplit(settings.bitrix_webhook_url.get_secret_value())
    if not parts.hostname:
        return None
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}/crm/lead/details/{{id}}/"


def _card(lead: dict[str, Any]) -> LeadCard:
    phones = lead.get("PHONE") or []
    origin = str(lead.get("ORIGIN_ID") or "")
    return LeadCard(
        id=int(lead["ID"]),
        title=str(lead.get("TITLE") or lead.get("NAME") or ""),
        phone=str(phones[0].get("VALUE")) if phones else None,
        user_id=int(origin) if origin.isdigit() else None,
    )


class DashboardService:
    def config(self, settings: Settings) -> DashboardConfig:
        return DashboardConfig(
            lead_url=lead_url(settings),
            emulator=settings.bitrix_webhook_url is None,
            stages=list(settings.stages),
        )

    async def board(self, settings: Settings) -> LeadBoard:
        """The emulator's leads in a column per stage (Core's stages first, in their order)."""
        url = f"{settings.portal_base_url}/admin/leads"
        try:
            async with httpx.AsyncClient(timeout=EMULATOR_WAIT_S) as http:
                response = await http.get(url)
                response.raise_for_status()
                leads: list[dict[str, Any]] = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            return LeadBoard(
                columns=[],
                error=f"the emulator at {settings.portal_base_url} ({type(exc).__name__})",
            )
        by_status: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        for lead in leads:
            by_status[str(lead.get("STATUS_ID") or "")].append(lead)
        names = {settings.stage_map.get(stage, stage): stage for stage in settings.stages}
        order = list(names) + sorted(set(by_status) - set(names))
        return LeadBoard(
            columns=[
                StageColumn(
                    stage=names.get(status_id, status_id),
                    status_id=status_id,
                    count=len(by_status[status_id]),
                    leads=[
                        _card(lead)
                        for lead in sorted(by_status[status_id], key=lambda lead: -int(lead["ID"]))[
                            :CARDS_PER_COLUMN
                        ]
                    ],
                )
                for status_id in order
            ],
            error=None,
        )


dashboard_service = DashboardService()
