"""Calls of concurrent jobs sent together as `batch` requests, against the emulator over real
HTTP: one request for many commands, each caller with its own result or error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from b24sync.bitrix.batch import BatchingClient, query_string
from b24sync.bitrix.client import BitrixError
from b24sync.portal.main import PortalServer
from b24sync.portal.params import parse_query
from b24sync.settings import Settings

from .conftest import Admin, Bus, ServiceFactory, event, make_client


def test_query_string_is_what_the_portal_reads_back() -> None:
    params = {
        "filter": {"=ORIGINATOR_ID": "b24sync", "=ORIGIN_ID": "7"},
        "select": ["ID", "TITLE", "PHONE"],
        "fields": {
            "TITLE": "Иван Иванов & Co",
            "PHONE": [{"ID": 11, "VALUE": "+77001112233", "VALUE_TYPE": "WORK"}],
        },
        "left_out": None,
    }
    assert parse_query(query_string(params)) == {
        "filter": {"=ORIGINATOR_ID": "b24sync", "=ORIGIN_ID": "7"},
        "select": ["ID", "TITLE", "PHONE"],
        "fields": {
            "TITLE": "Иван Иванов & Co",
            "PHONE": [{"ID": "11", "VALUE": "+77001112233", "VALUE_TYPE": "WORK"}],
        },
    }


@pytest.fixture
async def batching(portal: PortalServer, fast_settings: Settings) -> AsyncIterator[BatchingClient]:
    client = make_client(fast_settings.portal_webhook_url)
    yield BatchingClient(client, max_commands=50)
    await client.aclose()


async def test_concurrent_calls_share_batch_requests(
    batching: BatchingClient, admin: Admin
) -> None:
    ids = await asyncio.gather(
        *(batching.call("crm.lead.add", {"fields": {"TITLE": f"Lead {n}"}}) for n in range(20))
    )

    assert len(set(ids)) == 20
    titles = {int(lead["ID"]): lead["TITLE"] for lead in await admin.leads()}
    assert [titles[int(lead_id)] for lead_id in ids] == [f"Lead {n}" for n in range(20)]
    stats = (await admin.stats())["by_method"]
    assert stats["crm.lead.add"] == {"ok": 20}
    # The first call went alone, at once; the other 19 waited for it and left together.
    assert stats["batch"] == {"ok": 1}


async def test_a_lone_call_is_sent_as_it_is(batching: BatchingClient, admin: Admin) -> None:
    answer = await batching.request("crm.lead.add", {"fields": {"TITLE": "Alone"}})
    assert isinstance(answer["result"], int)
    assert "time" in answer
    assert "batch" not in (await admin.stats())["by_method"]


async def test_a_command_that_fails_fails_only_its_caller(
    batching: BatchingClient, admin: Admin
) -> None:
    first = await batching.call("crm.lead.add", {"fields": {"TITLE": "Existing"}})
    results = await asyncio.gather(
        batching.call("crm.lead.get", {"id": first}),
        batching.call("crm.lead.update", {"id": 987654, "fields": {"TITLE": "x"}}),
        batching.request("crm.lead.add", {"fields": {"TITLE": "New"}}),
        batching.call("crm.lead.list", {"filter": {"=TITLE": "Existing"}, "select": ["ID"]}),
        return_exceptions=True,
    )

    lead, missing, added, found = results
    assert isinstance(lead, dict)
    assert lead["TITLE"] == "Existing"
    assert isinstance(missing, BitrixError)
    assert (missing.method, missing.not_found) == ("crm.lead.update", True)
    assert not missing.transient
    assert isinstance(added, dict)
    assert isinstance(added["result"], int)
    assert "time" in added
    assert found == [{"ID": str(first)}]
    assert (await admin.stats())["by_method"]["batch"] == {"ok": 1}


async def test_a_failed_batch_fails_each_call_under_its_own_method(
    batching: BatchingClient, admin: Admin
) -> None:
    await admin.script(method="batch", times=1, kind="html", status=502)
    await admin.script(method="crm.lead.list", times=1, kind="html", status=502)
    results = await asyncio.gather(
        batching.call("crm.lead.list", {}),
        batching.call("crm.lead.add", {"fields": {"TITLE": "a"}}),
        batching.call("crm.lead.get", {"id": 1}),
        return_exceptions=True,
    )
    assert all(isinstance(result, BitrixError) for result in results)
    assert [(e.method, e.code, e.transient) for e in results if isinstance(e, BitrixError)] == [
        ("crm.lead.list", "INVALID_RESPONSE", True),
        ("crm.lead.add", "INVALID_RESPONSE", True),
        ("crm.lead.get", "INVALID_RESPONSE", True),
    ]
    assert await admin.leads() == []


async def test_the_service_with_batches_makes_one_lead_per_user(
    start_service: ServiceFactory, portal: object, bus: Bus, admin: Admin, settings: Settings
) -> None:
    await start_service(bitrix_batch_size=50, worker_concurrency=20)
    queue = settings.rabbitmq_reply_queue
    for user_id in range(1, 31):
        await bus.publish(event("create_card", user_id, reply_queue=queue, version=1))
    replies = await bus.replies(30)

    assert {reply["data"]["status"] for reply in replies} == {"success"}
    leads = await admin.leads()
    assert sorted(int(lead["ORIGIN_ID"]) for lead in leads) == list(range(1, 31))
    by_lead = {reply["data"]["user_id"]: reply["data"]["bitrix_lead_id"] for reply in replies}
    assert by_lead == {int(lead["ORIGIN_ID"]): int(lead["ID"]) for lead in leads}

    stats = await admin.stats()
    commands = sum(
        sum(outcomes.values())
        for method, outcomes in stats["by_method"].items()
        if method != "batch"
    )
    assert commands == 60  # a lookup and an add per user
    assert stats["by_method"]["batch"]["ok"] > 0
    assert stats["total"] < commands  # requests the portal saw, a batch counted once


async def test_a_command_blocked_inside_a_batch_waits_and_goes_again(
    settings: Settings,
) -> None:
    # Each add counts 1 s of operating time against a budget of 1.5 s in a 1 s window: the
    # second add blocks crm.lead.add until the first leaves the window.
    limits = {
        "portal_operating_limit_s": 1.5,
        "portal_operating_window_s": 1.0,
        "portal_operating_cost_s": 1.0,
        "portal_rate_limit": "off",
    }
    async with PortalServer(settings.model_copy(update=limits)) as portal:
        client = make_client(
            settings.portal_webhook_url, max_limit_waits=5, operation_limit_wait_s=0.5
        )
        batching = BatchingClient(client)
        try:
            ids = await asyncio.gather(
                *(batching.call("crm.lead.add", {"fields": {"TITLE": f"L{n}"}}) for n in range(4))
            )
        finally:
            await client.aclose()
        stats = portal.portal.stats.snapshot()["by_method"]
    assert len(set(ids)) == 4
    # Adds were refused inside a batch, then went again: no caller saw the limit.
    assert stats["crm.lead.add"]["ok"] == 4
    assert stats["crm.lead.add"]["OPERATION_TIME_LIMIT"] >= 1
