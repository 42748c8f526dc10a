"""The dashboard in a real browser (Debian's chromium driven by Playwright) against real
processes: the emulator, the Bitrix service and Core with an API token. Users created through
the API appear, one fails on the emulator with its reason, is sent again from its row once the
fault is cleared and shows synced; the page's screenshot goes to docs/dashboard.png."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import async_playwright, expect
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.settings import Settings
from tests.conftest import eventually
from tests.interop.conftest import running
from tests.processes import (
    BITRIX_READY,
    CORE_READY,
    PORTAL_READY,
    ServiceProcess,
    b24sync_command,
    service_environment,
)

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
TOKEN = "dashboard-t0ken"
# What the emulator answers to the add of the user made to fail: a validation error, which no
# retry cures.
INVALID_PHONE = "Phone number is not valid"
WAIT_MS = 20_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")


@contextlib.asynccontextmanager
async def system(settings: Settings, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The emulator, the Bitrix service and Core as processes; yields Core's API client."""
    portal = ServiceProcess(
        "portal",
        service_environment(settings, LOG_LEVEL="INFO", PORTAL_RATE_LIMIT="off"),
        tmp_path,
        PORTAL_READY,
    )
    bitrix = ServiceProcess(
        "bitrix",
        service_environment(settings, LOG_LEVEL="INFO", JOB_BACKOFF_MS="50"),
        tmp_path,
        BITRIX_READY,
    )
    core_env = service_environment(
        settings, CORE_API_TOKEN=TOKEN, OUTBOX_POLL_INTERVAL_S="0.2", LOG_LEVEL="INFO"
    )
    core = ServiceProcess("core", core_env, tmp_path, CORE_READY)
    async with (
        running(portal),
        running(bitrix),
        running(core),
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{settings.port}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        ) as api,
    ):

        async def ready() -> bool:
            return (await api.get("/readyz")).status_code == 200

        await eventually(ready)
        yield api


async def test_users_fail_and_are_resynced_from_the_dashboard(
    core_settings: Settings,
    committed: async_sessionmaker[AsyncSession],
    tmp_path: Path,
) -> None:
    portal_admin = f"http://127.0.0.1:{core_settings.portal_port}/admin"
    async with (
        system(core_settings, tmp_path) as api,
        httpx.AsyncClient(base_url=portal_admin, timeout=10) as admin,
        async_playwright() as playwright,
    ):
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        page = await browser.new_page(viewport={"width": 1440, "height": 1000})
        try:
            await page.goto(f"http://127.0.0.1:{core_settings.port}/ui")
            # The token is asked for; a wrong one is refused.
            await page.fill("#token", "wrong")
            await page.click("#login button[type=submit]")
            await expect(page.locator("#login-error")).to_have_text("The token was refused.")
            await page.fill("#token", TOKEN)
            await page.click("#login button[type=submit]")
            await expect(page.locator("#app")).to_be_visible()

            people = [("Иван Иванов", "+77001112233"), ("Мария Петрова", "+77015556677")]
            ids = []
            for name, phone in people:
                created = await api.post("/users", json={"full_name": name, "phone": phone})
                assert created.status_code == 201
                ids.append(created.json()["id"])
            for user_id, (name, _) in zip(ids, people, strict=True):
                user_row = page.locator(f'tr[data-user-id="{user_id}"]')
                await expect(user_row.locator(".name")).to_have_text(name, timeout=WAIT_MS)
                await expect(user_row.locator(".sync")).to_have_text("synced", timeout=WAIT_MS)

            # The emulator refuses the next lead adds as invalid: one user fails for good.
            fault = {"method": "crm.lead.add", "times": 100, "status": 400,
                     "error": "ERROR_CORE", "description": INVALID_PHONE}  # fmt: skip
            assert (await admin.post("/faults/script", json=fault)).is_success
            failing = await api.post(
                "/users", json={"full_name": "Пётр Сбойный", "phone": "+77029998877"}
            )
            failing_id = failing.json()["id"]
            failing_row = page.locator(f'tr[data-user-id="{failing_id}"]')
            await expect(failing_row.locator(".sync")).to_have_text("failed", timeout=WAIT_MS)
            await expect(failing_row.locator(".reason")).to_contain_text(INVALID_PHONE)
            await expect(failing_row.locator(".error-cell")).to_contain_text("permanent")
            await expect(page.locator("#failures")).to_contain_text("Пётр Сбойный")
            await expect(page.locator("#p-permanent")).to_have_text("1", timeout=WAIT_MS)

            # Filter and search narrow the table.
            rows = page.locator("#users tbody tr")
            await page.select_option("#filter-state", "failed")
            await expect(rows.locator(".name")).to_have_text(["Пётр Сбойный"])
            await page.select_option("#filter-state", "")
            await expect(rows).to_have_count(3)
            await page.fill("#search", "петров")
            await expect(rows.locator(".name")).to_have_text(["Мария Петрова"])
            await page.fill("#search", "")
            await expect(rows).to_have_count(3)

            # The fault cleared, its row's resync brings it to synced.
            assert (await admin.delete("/faults/script")).is_success
            await failing_row.locator("button.resync").click()
            await expect(failing_row.locator(".sync")).to_have_text("synced", timeout=WAIT_MS)
            await expect(page.locator("#p-failed")).to_have_text("0", timeout=WAIT_MS)

            # Its history: the failed create, then the resync's success.
            await failing_row.locator("button.history").click()
            history = page.locator("#history tbody tr")
            await expect(history).to_have_count(2, timeout=WAIT_MS)
            await expect(history.nth(0)).to_contain_text("success")
            await expect(history.nth(1)).to_contain_text(INVALID_PHONE)

            # The emulator's board: a user moved in Core moves its card to the next column.
            moved = await api.post(f"/users/{ids[1]}/move", json={"stage": "IN_PROCESS"})
            assert moved.status_code == 200
            columns = page.locator("#board .column")
            await expect(columns.nth(1).locator(".lead")).to_contain_text(
                ["Мария Петрова"], timeout=WAIT_MS
            )
            await expect(columns.nth(0).locator(".lead")).to_have_count(2)
            await expect(page.locator("#q-waiting")).to_have_text("0")
            await expect(page.locator("#b-ceiling")).to_have_text("2/s")

            SCREENSHOT.parent.mkdir(exist_ok=True)
            await page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            await browser.close()

        # Every dependency is up for `b24sync status` too.
        code, out, err = await b24sync_command(core_settings, "status")
        assert code == 0, out + err
        assert "3 total: 0 pending, 3 synced, 0 failed" in out
        assert "Bitrix24 emulator │ http" in out
