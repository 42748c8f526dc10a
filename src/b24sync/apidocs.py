"""The OpenAPI page (`/docs`) of every service, with Swagger UI served from the installed
`fastapi-offline` package rather than a CDN: the page works without internet access."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_PATH = "/docs/assets"
SWAGGER_UI_FILES = files("fastapi_offline") / "static"


def add_swagger_ui(
    app: FastAPI, *, openapi_url: str = "/openapi.json", dependencies: Sequence[Any] = ()
) -> None:
    """`/docs` for `app` (behind `dependencies`, e.g. a token check) and Swagger UI's own
    scripts and styles under `/docs/assets/`, which are the same for everybody."""
    router = APIRouter(dependencies=list(dependencies), include_in_schema=False)

    @router.get("/docs")
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=app.title,
            swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_PATH}/favicon.png",
        )

    app.include_router(router)
    app.mount(ASSETS_PATH, StaticFiles(directory=str(SWAGGER_UI_FILES)), name="swagger-ui")
