"""The leaky bucket (503 QUERY_LIMIT_EXCEEDED) and the operating-time limit (429)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from b24sync.portal.limits import OperatingTime
from b24sync.portal.state import Portal
from b24sync.settings import Settings
from tests.portal.conftest import MakeApi


async def test_bucket_refuses_after_the_burst_and_drains(make_api: MakeApi) -> None:
    api = await make_api(portal_rate_burst=3, portal_rate_per_s=1.0)
    statuses = [(await api.call("crm.lead.fields")).status_code for _ in range(4)]
    assert statuses[:3] == [200, 200, 200]
    assert statuses[3] == 503
    refused = await api.call("crm.lead.fields")
    assert refused.json() == {
        "error": "QUERY_LIMIT_EXCEEDED",
        "error_description": "Too many requests",
    }
    await asyncio.sleep(1.1)  # drains one request
    assert (await api.call("crm.lead.fields")).status_code == 200
    stats = await api.admin("GET", "/admin/stats")
    assert stats["by_method"]["crm.lead.fields"] == {"ok": 4, "QUERY_LIMIT_EXCEEDED": 2}


async def test_a_batch_counts_as_one_request(make_api: MakeApi) -> None:
    api = await make_api(portal_rate_burst=2, portal_rate_per_s=0.01)
    cmd = {f"a{n}": "crm.lead.add?fields[NAME]=X" for n in range(10)}
    batch = await api.result("batch", {"cmd": cmd})
    assert len(batch["result"]) == 10
    assert (await api.call("crm.lead.fields")).status_code == 200
    assert (await api.call("crm.lead.fields")).status_code == 503


@pytest.mark.parametrize(
    ("plan", "expected"), [("standard", (50, 2.0)), ("enterprise", (250, 5.0)), ("off", None)]
)
def test_plans(settings: Settings, plan: str, expected: tuple[int, float] | None) -> None:
    bucket = Portal(settings.model_copy(update={"portal_rate_limit": plan})).bucket
    assert (bucket and (bucket.capacity, bucket.drain_per_s)) == expected


async def test_standard_plan_allows_a_burst_of_50(make_api: MakeApi) -> None:
    api = await make_api(portal_rate_limit="standard", portal_rate_per_s=0.01)
    responses = await asyncio.gather(*(api.call("crm.lead.fields") for _ in range(51)))
    assert sorted(response.status_code for response in responses) == [200] * 50 + [503]


async def test_operating_limit_blocks_one_method_until_the_window_passes(
    make_api: MakeApi,
) -> None:
    api = await make_api(
        portal_rate_limit="off",
        portal_operating_limit_s=2.5,
        portal_operating_cost_s=1.0,
        portal_operating_window_s=1.5,
    )
    answers = [(await api.call("crm.lead.list")).json() for _ in range(3)]
    assert answers[-1]["time"]["operating"] >= 3.0
    reset_at = answers[-1]["time"]["operating_reset_at"]
    assert time.time() < reset_at <= math.ceil(time.time() + 1.5)

    blocked = await api.call("crm.lead.list")
    assert blocked.status_code == 429
    assert blocked.json() == {
        "error": "OPERATION_TIME_LIMIT",
        "error_description": "Method is blocked due to operation time limit.",
    }
    assert (await api.call("crm.lead.fields")).status_code == 200  # other methods are not
    batch = await api.result("batch", {"cmd": {"a": "crm.lead.list", "b": "crm.lead.fields"}})
    assert batch["result_error"]["a"]["error"] == "OPERATION_TIME_LIMIT"
    assert "b" in batch["result"]
    await asyncio.sleep(1.55)
    assert (await api.call("crm.lead.list")).status_code == 200


def test_operating_time_sums_only_the_calls_inside_the_window() -> None:
    now = [100.0]
    limit = OperatingTime(budget_s=1.0, window_s=10.0, cost_s=0.0, clock=lambda: now[0])
    limit.record("crm.lead.add", 0.4)
    now[0] += 4
    limit.record("crm.lead.add", 0.5)
    limit.record("crm.lead.list", 2.0)
    assert limit.used("crm.lead.add") == pytest.approx(0.9)
    assert not limit.is_blocked("crm.lead.add")
    assert limit.is_blocked("crm.lead.list")
    now[0] += 6.5  # the first call leaves the window
    assert limit.used("crm.lead.add") == pytest.approx(0.5)
    now[0] += 4  # so do the rest
    assert limit.used("crm.lead.add") == 0.0
    assert not limit.is_blocked("crm.lead.list")
    limit.record("crm.lead.add", 0.25)
    assert limit.used("crm.lead.add") == pytest.approx(0.25)
