"""The dashboard's own routes without a browser: its files, its settings for the page, and the
lead link made from BITRIX_WEBHOOK_URL without the webhook's secret."""

from __future__ import annotations

import httpx
from pydantic import SecretStr

from b24sync.core.app import create_app
from b24sync.core.dashboard.service import lead_url
from b24sync.settings import Settings

WEBHOOK = "https://admin:pa55@example.bitrix24.kz:8443/rest/1/s3cr3tc0de/"


def test_the_lead_link_keeps_only_the_portal() -> None:
    settings = Settings(_env_file=None, bitrix_webhook_url=SecretStr(WEBHOOK))  # type: ignore[call-arg]
    assert lead_url(settings) == "https://example.bitrix24.kz:8443/crm/lead/details/{id}/"
    assert lead_url(Settings(_env_file=None)) is None  # type: ignore[call-arg]


async def test_page_files_and_config_for_a_real_portal(core_settings: Settings) -> None:
    settings = core_settings.model_copy(update={"bitrix_webhook_url": SecretStr(WEBHOOK)})
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://core") as client:
        page = await client.get("/ui")
        script = await client.get("/ui/static/dashboard.js")
        style = await client.get("/ui/static/dashboard.css")
        missing = await client.get("/ui/static/secrets.txt")
        config = (await client.get("/ui/config")).json()
        leads = await client.get("/ui/leads")

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'data-token-required="false"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert script.headers["content-type"].startswith("text/javascript")
    assert "sessionStorage" in script.text
    assert style.headers["content-type"].startswith("text/css")
    assert missing.status_code == 404
    assert config["lead_url"] == "https://example.bitrix24.kz:8443/crm/lead/details/{id}/"
    assert config["emulator"] is False
    # The board shows the emulator's leads only.
    assert leads.status_code == 404
    for answer in (page.text, script.text, str(config)):
        assert "s3cr3tc0de" not in answer
        assert "pa55" not in answer


async def test_the_board_says_when_the_emulator_cannot_be_read(core_settings: Settings) -> None:
    transport = httpx.ASGITransport(app=create_app(core_settings))  # nothing on portal_port
    async with httpx.AsyncClient(transport=transport, base_url="http://core") as client:
        board = (await client.get("/ui/leads")).json()

    assert board["columns"] == []
    assert board["error"] == (
        f"the emulator at http://127.0.0.1:{core_settings.portal_port} (ConnectError)"
    )
