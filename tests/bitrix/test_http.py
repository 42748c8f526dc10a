"""The Bitrix service's HTTP endpoints: probes open, /metrics behind BITRIX_HTTP_TOKEN when set."""

from __future__ import annotations

import httpx
from pydantic import SecretStr

from b24sync.bitrix.http import create_app
from b24sync.logs import mask_secrets
from b24sync.portal.main import PortalServer
from b24sync.settings import Settings

from .conftest import ServiceFactory

TOKEN = "m3trics-t0ken"


async def ready() -> dict[str, bool]:
    return {"rabbitmq": True, "redis": True}


async def test_without_a_token_everything_is_open() -> None:
    transport = httpx.ASGITransport(app=create_app(ready))
    async with httpx.AsyncClient(transport=transport, base_url="http://bitrix") as http:
        assert (await http.get("/metrics")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200


async def test_metrics_require_the_token(
    start_service: ServiceFactory, portal: PortalServer, settings: Settings
) -> None:
    await start_service(bitrix_http_token=SecretStr(TOKEN))
    base = f"http://127.0.0.1:{settings.bitrix_http_port}"
    async with httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
            refused = await http.get("/metrics", headers=headers)
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in refused.text
        scraped = await http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert scraped.status_code == 200
        assert "b24sync_bitrix_jobs_total" in scraped.text
        assert (await http.get("/openapi.json")).status_code == 404
    # Registered as a secret: masked wherever it would be printed.
    assert TOKEN not in mask_secrets(f"Authorization: Bearer {TOKEN}")
