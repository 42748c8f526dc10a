"""Reading every lead of this system from the emulator over HTTP: pages of 50, many pages to a
`batch` request, counted in the bucket the Bitrix service uses."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from b24sync.bitrix.client import BitrixClient
from b24sync.bitrix.main import BitrixService, create_client
from b24sync.portal.main import PortalServer
from b24sync.reconcile.leads import LeadScan, PortalLead
from b24sync.settings import Settings
from tests.bitrix.conftest import Admin

from .conftest import add_leads

# A bucket that barely drains while the test runs: its level counts our requests.
COUNTING_BUCKET = {"bitrix_rate_burst": 10_000, "bitrix_rate_per_s": 0.001}


def lead(user_id: int, originator: str = "b24sync") -> dict[str, Any]:
    return {
        "TITLE": f"Пользователь {user_id}",
        "NAME": "Пользователь",
        "LAST_NAME": str(user_id),
        "STATUS_ID": "NEW",
        "ORIGINATOR_ID": originator,
        "ORIGIN_ID": str(user_id),
        "PHONE": [{"VALUE": f"+7700{user_id:07d}", "VALUE_TYPE": "WORK"}],
    }


@pytest.fixture
async def client(
    portal: PortalServer, fast_settings: Settings, redis_client: Redis
) -> AsyncIterator[BitrixClient]:
    client = create_client(fast_settings.model_copy(update=COUNTING_BUCKET), redis_client)
    yield client
    await client.aclose()


async def bucket_level(redis: Redis, settings: Settings) -> float:
    """The level of the request bucket all Bitrix service processes share."""
    key = f"{BitrixService(settings).key_prefix}:ratelimit"
    return float(await redis.hget(key, "level") or 0)


@pytest.mark.parametrize(
    ("ours", "batches"),
    [
        pytest.param(30, 0, id="one-page"),
        pytest.param(260, 1, id="six-pages"),
        pytest.param(2_600, 2, id="fifty-two-pages"),
    ],
)
async def test_every_lead_of_ours_in_few_requests(
    client: BitrixClient,
    admin: Admin,
    fast_settings: Settings,
    redis_client: Redis,
    ours: int,
    batches: int,
) -> None:
    await add_leads(admin, [lead(n) for n in range(1, ours + 1)])
    await add_leads(admin, [lead(n, originator="someone-else") for n in range(1, 61)])
    before = (await admin.stats())["by_method"].get("batch", {}).get("ok", 0)

    leads = await LeadScan(client, "b24sync").all()

    assert sorted(found.origin_id for found in leads) == sorted(str(n) for n in range(1, ours + 1))
    assert (
        PortalLead(
            id=min(found.id for found in leads),
            origin_id="1",
            title="Пользователь 1",
            name="Пользователь",
            last_name="1",
            status_id="NEW",
            phones=("+77000000001",),
        )
        in leads
    )
    stats = (await admin.stats())["by_method"]
    # The first page alone (it tells the total), then up to 50 pages to a batch.
    assert stats["crm.lead.list"]["ok"] == -(-ours // 50)
    assert stats.get("batch", {}).get("ok", 0) - before == batches
    # Each request was taken from the bucket the Bitrix service's workers share.
    assert round(await bucket_level(redis_client, fast_settings)) == 1 + batches


async def test_pages_refused_inside_a_batch_wait_for_the_limit_and_go_again(
    settings: Settings, tmp_path: Path
) -> None:
    stored = settings.model_copy(
        update={"portal_state_file": str(tmp_path / "portal.sqlite"), "portal_rate_limit": "off"}
    )
    async with PortalServer(stored) as portal, httpx.AsyncClient(base_url=portal.base_url) as http:
        await add_leads(Admin(http, stored.portal_webhook_url), [lead(n) for n in range(1, 201)])
    # The same leads on a portal where each list counts 1 s of operating time against 1.5 s in
    # a 1 s window: pages of a batch are refused with OPERATION_TIME_LIMIT until the earlier
    # ones leave the window.
    limited = stored.model_copy(
        update={
            "portal_operating_limit_s": 1.5,
            "portal_operating_window_s": 1.0,
            "portal_operating_cost_s": 1.0,
            "bitrix_operation_limit_wait_s": 0.5,
            "bitrix_limit_max_waits": 20,
        }
    )
    async with PortalServer(limited) as portal, Redis.from_url(limited.redis_url) as redis:
        client = create_client(limited, redis)
        try:
            leads = await LeadScan(client, "b24sync").all()
        finally:
            await client.aclose()
        stats = portal.portal.stats.snapshot()["by_method"]
    assert sorted(int(found.origin_id) for found in leads) == list(range(1, 201))
    assert stats["crm.lead.list"]["ok"] == 4
    assert stats["crm.lead.list"]["OPERATION_TIME_LIMIT"] >= 1
