"""Injected failures: the deterministic script, random faults, latency and outages."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.portal.conftest import Api, MakeApi, StartPortal


async def test_script_answers_the_next_calls_with_an_error(api: Api) -> None:
    script = await api.admin(
        "POST",
        "/admin/faults/script",
        {
            "method": "CRM.LEAD.ADD",
            "times": 2,
            "kind": "error",
            "status": 503,
            "error": "QUERY_LIMIT_EXCEEDED",
            "description": "Too many requests",
        },
    )
    assert (script[0]["method"], script[0]["times"]) == ("crm.lead.add", 2)
    assert (await api.call("crm.lead.fields")).status_code == 200  # other methods: untouched
    for _ in range(2):
        refused = await api.call("crm.lead.add", {"fields": {"NAME": "X"}})
        assert refused.status_code == 503
        assert refused.json() == {
            "error": "QUERY_LIMIT_EXCEEDED",
            "error_description": "Too many requests",
        }
    assert isinstance(await api.add_lead(NAME="X"), int)
    assert len(await api.admin("GET", "/admin/leads")) == 1  # refused calls wrote nothing
    assert await api.admin("GET", "/admin/faults/script") == []
    stats = await api.admin("GET", "/admin/stats")
    assert stats["by_method"]["crm.lead.add"] == {"QUERY_LIMIT_EXCEEDED": 2, "ok": 1}


async def test_script_html_page(api: Api) -> None:
    await api.admin("POST", "/admin/faults/script", {"method": "*", "kind": "html", "status": 504})
    response = await api.call("crm.lead.get", {"id": 1})
    assert response.status_code == 504
    assert response.headers["content-type"].startswith("text/html")
    assert "504 Gateway Time-out" in response.text
    assert (await api.call("crm.lead.fields")).status_code == 200


async def test_script_timeout_after_write_writes_then_answers_late(api: Api) -> None:
    await api.admin(
        "POST",
        "/admin/faults/script",
        {"method": "crm.lead.add", "kind": "timeout_after_write", "delay_s": 2},
    )
    with pytest.raises(httpx.ReadTimeout):
        await api.http.post(
            f"{api.webhook_url}/crm.lead.add",
            json={"fields": {"NAME": "Ghost"}},
            timeout=0.3,
        )
    [lead] = await api.admin("GET", "/admin/leads")
    assert lead["NAME"] == "Ghost"


async def test_script_entries_can_be_listed_and_dropped(api: Api) -> None:
    await api.admin("POST", "/admin/faults/script", {"method": "crm.lead.add", "times": 3})
    faults = await api.admin("GET", "/admin/faults")
    assert [(entry["method"], entry["times"]) for entry in faults["script"]] == [
        ("crm.lead.add", 3)
    ]
    assert await api.admin("DELETE", "/admin/faults/script") == []
    assert (await api.call("crm.lead.add", {"fields": {}})).status_code == 200


@pytest.mark.parametrize(
    ("error_format", "content_type"), [("json", "application/json"), ("html", "text/html")]
)
async def test_random_errors(api: Api, error_format: str, content_type: str) -> None:
    await api.admin("PUT", "/admin/faults", {"error_rate": 1.0, "error_format": error_format})
    statuses = set()
    for _ in range(10):
        response = await api.call("crm.lead.fields")
        statuses.add(response.status_code)
        assert response.headers["content-type"].startswith(content_type)
        if error_format == "json":
            assert response.json()["error"] == "INTERNAL_SERVER_ERROR"
    assert statuses <= {500, 502, 504}
    await api.admin("PUT", "/admin/faults", {})
    assert (await api.call("crm.lead.fields")).status_code == 200


async def test_latency(api: Api) -> None:
    await api.admin("PUT", "/admin/faults", {"latency_ms": 300})
    started = time.monotonic()
    assert (await api.call("crm.lead.fields")).status_code == 200
    assert time.monotonic() - started >= 0.3


async def test_random_timeouts_hit_writes_only(api: Api) -> None:
    await api.admin("PUT", "/admin/faults", {"timeout_rate": 1.0, "timeout_delay_s": 2})
    with pytest.raises(httpx.ReadTimeout):
        await api.http.post(
            f"{api.webhook_url}/crm.lead.add", json={"fields": {"NAME": "Late"}}, timeout=0.3
        )
    listed = await api.http.post(f"{api.webhook_url}/crm.lead.list", json={}, timeout=0.3)
    assert [row["NAME"] for row in listed.json()["result"]] == ["Late"]


async def test_html_outage_ends_on_time(api: Api) -> None:
    faults = await api.admin("PUT", "/admin/faults", {"outage_s": 0.8, "outage_mode": "html"})
    assert 0 < faults["outage_remaining_s"] <= 0.8
    down = await api.call("crm.lead.fields")
    assert down.status_code == 503
    assert "<html>" in down.text
    assert (await api.admin("GET", "/healthz"))["status"] == "ok"
    await asyncio.sleep(0.85)
    assert (await api.call("crm.lead.fields")).status_code == 200


async def test_connection_outage_drops_rest_calls_only(api: Api) -> None:
    await api.admin("PUT", "/admin/faults", {"outage_s": 0.8, "outage_mode": "connection"})
    with pytest.raises(httpx.TransportError):
        await api.call("crm.lead.fields")
    assert (await api.admin("GET", "/admin/stats"))["total"] == 0
    await asyncio.sleep(0.85)
    assert (await api.call("crm.lead.fields")).status_code == 200


async def test_faults_from_settings_and_reset_restores_them(make_api: MakeApi) -> None:
    api = await make_api(portal_rate_limit="off", portal_error_rate=1.0, portal_latency_ms=10)
    assert (await api.call("crm.lead.fields")).status_code >= 500
    await api.admin("PUT", "/admin/faults", {})
    assert (await api.call("crm.lead.fields")).status_code == 200
    await api.admin("POST", "/admin/reset")
    faults = await api.admin("GET", "/admin/faults")
    assert (faults["error_rate"], faults["latency_ms"]) == (1.0, 10)


async def test_shutdown_cuts_a_held_answer_short(start_portal: StartPortal) -> None:
    server = await start_portal(portal_rate_limit="off")
    server.portal.faults.configure(
        server.portal.faults.config.model_copy(update={"timeout_rate": 1.0, "timeout_delay_s": 60})
    )
    async with httpx.AsyncClient(timeout=30) as client:
        pending = asyncio.create_task(
            client.post(f"{server.settings.portal_webhook_url}/crm.lead.add", json={})
        )
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 3
        assert (await pending).status_code == 200
