"""The admin API: inspection, stats, reset, and the SQLite state that survives a restart."""

from __future__ import annotations

from pathlib import Path

import httpx

from b24sync.portal.main import serve_portal
from b24sync.settings import Settings
from tests.portal.conftest import Api, MakeApi, StartPortal


async def test_admin_leads_are_the_crm_lead_get_shape(api: Api) -> None:
    lead_id = await api.add_lead(NAME="Ivan", PHONE=[{"VALUE": "+1"}])
    await api.add_lead(NAME="Petr")
    leads = await api.admin("GET", "/admin/leads")
    assert [lead["ID"] for lead in leads] == [str(lead_id), str(lead_id + 1)]
    assert leads[0] == await api.result("crm.lead.get", {"id": lead_id})
    missing = await api.http.get(f"{api.server.base_url}/admin/leads/999")
    assert missing.status_code == 404


async def test_stats_and_calls(api: Api) -> None:
    await api.add_lead(NAME="Ivan")
    await api.call("crm.lead.get", {"id": 999})
    await api.call("nope")
    await api.result("batch", {"cmd": {"a": "crm.lead.add?fields[NAME]=B"}})
    stats = await api.admin("GET", "/admin/stats")
    assert stats["total"] == 4
    assert stats["by_method"] == {
        "crm.lead.add": {"ok": 2},
        "crm.lead.get": {"Not found": 1},
        "nope": {"ERROR_METHOD_NOT_FOUND": 1},
        "batch": {"ok": 1},
    }
    assert stats["bucket"] is None
    calls = await api.admin("GET", "/admin/calls")
    assert [call["method"] for call in calls] == [
        "crm.lead.add",
        "crm.lead.get",
        "nope",
        "crm.lead.add",
        "batch",
    ]
    assert calls[1]["params"] == {"id": 999}


async def test_reset_clears_leads_stats_faults_and_bucket(make_api: MakeApi) -> None:
    api = await make_api(portal_rate_burst=2, portal_rate_per_s=0.01)
    await api.add_lead(NAME="Ivan")
    await api.call("crm.lead.fields")
    assert (await api.call("crm.lead.fields")).status_code == 503
    await api.admin("POST", "/admin/faults/script", {"method": "crm.lead.add"})
    await api.admin("PUT", "/admin/faults", {"latency_ms": 5})
    assert await api.admin("POST", "/admin/reset") == {"status": "reset"}
    assert await api.admin("GET", "/admin/leads") == []
    stats = await api.admin("GET", "/admin/stats")
    assert (stats["total"], stats["by_method"], stats["bucket"]["level"]) == (0, {}, 0)
    faults = await api.admin("GET", "/admin/faults")
    assert (faults["latency_ms"], faults["script"]) == (0, [])
    assert await api.add_lead(NAME="Again") == 1  # ids start over


async def test_state_file_survives_a_restart(start_portal: StartPortal, tmp_path: Path) -> None:
    state_file = str(tmp_path / "portal.sqlite")
    first = await start_portal(portal_state_file=state_file, portal_rate_limit="off")
    async with httpx.AsyncClient() as http:
        api = Api(http, first)
        lead_id = await api.add_lead(NAME="Ivan", PHONE=[{"VALUE": "+1"}])
        await api.result("crm.lead.update", {"id": lead_id, "fields": {"PHONE": [{"VALUE": "+2"}]}})
        gone = await api.add_lead(NAME="Gone")
        await api.result("crm.lead.delete", {"id": gone})
        before = await api.result("crm.lead.get", {"id": lead_id})
        await first.stop()

        second = await start_portal(portal_state_file=state_file, portal_rate_limit="off")
        api = Api(http, second)
        assert await api.admin("GET", "/admin/leads") == [before]
        # Counters survive too: new ids do not reuse old ones.
        assert await api.add_lead(NAME="Next") == gone + 1
        await api.result("crm.lead.update", {"id": lead_id, "fields": {"PHONE": [{"VALUE": "+3"}]}})
        phone_ids = [p["ID"] for p in (await api.result("crm.lead.get", {"id": lead_id}))["PHONE"]]
        assert len(set(phone_ids)) == 3


async def test_serve_portal_yields_the_base_url(settings: Settings) -> None:
    async with serve_portal(settings) as base_url, httpx.AsyncClient() as http:
        assert base_url == f"http://127.0.0.1:{settings.portal_port}"
        assert (await http.get(f"{base_url}/healthz")).json()["status"] == "ok"
        added = await http.post(
            f"{settings.portal_webhook_url}/crm.lead.add", json={"fields": {"NAME": "Ivan"}}
        )
        assert added.json()["result"] == 1
    async with httpx.AsyncClient() as http:
        try:
            await http.get(f"{base_url}/healthz")
        except httpx.ConnectError:
            return
        raise AssertionError("the emulator still answers after the block")
