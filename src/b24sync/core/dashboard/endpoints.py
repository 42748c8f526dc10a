"""`/ui`: the page and its files are open (they hold no data); what they show comes from the
API, which with CORE_API_TOKEN set needs the token. The page asks for it, keeps it in the tab's
sessionStorage and sends it as `Authorization: Bearer` with every request."""

from __future__ import annotations

from importlib.resources import files
from string import Template

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse

from b24sync.core.dashboard.schemas import DashboardConfig, LeadBoard
from b24sync.core.dashboard.service import dashboard_service
from b24sync.core.dependencies import SettingsDep
from b24sync.core.exceptions import NotFoundError

_PACKAGE = files("b24sync.core.dashboard")
_PAGE = Template((_PACKAGE / "templates" / "index.html").read_text(encoding="utf-8"))
_STATIC = {
    name: ((_PACKAGE / "static" / name).read_bytes(), media_type)
    for name, media_type in (
        ("dashboard.js", "text/javascript; charset=utf-8"),
        ("dashboard.css", "text/css; charset=utf-8"),
    )
}
# The page may load only its own files and talk only to Core.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}

page_router = APIRouter(prefix="/ui", include_in_schema=False)
router = APIRouter(prefix="/ui", tags=["dashboard"])


@page_router.get("")
async def dashboard(settings: SettingsDep) -> HTMLResponse:
    token = "true" if settings.core_api_token is not None else "false"
    return HTMLResponse(_PAGE.substitute(token_required=token), headers=_HEADERS)


@page_router.get("/static/{name}")
async def static_file(name: str) -> Response:
    if name not in _STATIC:
        raise NotFoundError(f"no file {name!r}")
    content, media_type = _STATIC[name]
    return Response(content, media_type=media_type, headers=_HEADERS)


@router.get("/config", response_model=DashboardConfig, summary="The dashboard's settings")
async def config(settings: SettingsDep) -> DashboardConfig:
    return dashboard_service.config(settings)


@router.get(
    "/leads", response_model=LeadBoard, summary="The emulator's leads by stage (emulator only)"
)
async def leads(settings: SettingsDep) -> LeadBoard:
    if settings.bitrix_webhook_url is not None:
        raise NotFoundError("the leads board shows the emulator's leads; a portal is configured")
    return await dashboard_service.board(settings)
