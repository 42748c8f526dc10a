"""The Bitrix24 REST client against the emulator, over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from b24sync.bitrix.client import BitrixClient, BitrixError
from b24sync.bitrix.ratelimit import RateLimiter
from b24sync.portal.main import PortalServer
from b24sync.settings import Settings
from tests.conftest import free_port

from .conftest import Admin, make_client


@pytest.fixture
async def client(portal: PortalServer, fast_settings: Settings) -> AsyncIterator[BitrixClient]:
    bitrix = make_client(fast_settings.portal_webhook_url)
    yield bitrix
    await bitrix.aclose()


async def test_call_returns_the_result(client: BitrixClient) -> None:
    lead_id = await client.call("crm.lead.add", {"fields": {"TITLE": "Иван Иванов"}})
    assert isinstance(lead_id, int)
    lead = await client.call("crm.lead.get", {"id": lead_id})
    assert lead["TITLE"] == "Иван Иванов"


async def test_permanent_errors_keep_code_and_description(
    client: BitrixClient, admin: Admin
) -> None:
    await admin.fail(
        "crm.lead.add",
        status=401,
        error="NO_AUTH_FOUND",
        description="Wrong authorization data",
    )
    with pytest.raises(BitrixError) as caught:
        await client.call("crm.lead.add", {"fields": {}})
    err = caught.value
    assert (err.code, err.http_status, err.transient) == ("NO_AUTH_FOUND", 401, False)
    assert str(err) == "crm.lead.add: NO_AUTH_FOUND: Wrong authorization data"


async def test_not_found_is_a_permanent_crm_error(client: BitrixClient) -> None:
    with pytest.raises(BitrixError) as caught:
        await client.call("crm.lead.update", {"id": 987654, "fields": {"TITLE": "x"}})
    assert caught.value.not_found
    assert not caught.value.transient


async def test_html_error_pages_are_transient(client: BitrixClient, admin: Admin) -> None:
    await admin.script(method="crm.lead.list", times=1, kind="html", status=502)
    with pytest.raises(BitrixError) as caught:
        await client.call("crm.lead.list", {})
    assert (caught.value.code, caught.value.transient) == ("INVALID_RESPONSE", True)
    assert "HTTP 502" in str(caught.value)


async def test_rate_limit_answers_are_waited_out(client: BitrixClient, admin: Admin) -> None:
    await admin.limit("crm.lead.list", "QUERY_LIMIT_EXCEEDED", times=2)
    await admin.limit("crm.lead.list", "OPERATION_TIME_LIMIT")
    assert await client.call("crm.lead.list", {}) == []
    outcomes = (await admin.stats())["by_method"]["crm.lead.list"]
    assert outcomes == {"QUERY_LIMIT_EXCEEDED": 2, "OPERATION_TIME_LIMIT": 1, "ok": 1}


async def test_rate_limit_waits_are_bounded(
    portal: PortalServer, fast_settings: Settings, admin: Admin
) -> None:
    await admin.limit("crm.lead.list", "QUERY_LIMIT_EXCEEDED", times=5)
    client = make_client(fast_settings.portal_webhook_url, max_limit_waits=2)
    with pytest.raises(BitrixError) as caught:
        await client.call("crm.lead.list", {})
    await client.aclose()
    assert caught.value.rate_limited
    assert caught.value.transient
    assert (await admin.stats())["by_method"]["crm.lead.list"] == {"QUERY_LIMIT_EXCEEDED": 3}


async def test_a_blocked_method_waits_in_every_worker_sharing_the_limiter(
    portal: PortalServer, fast_settings: Settings, admin: Admin, redis_client: Redis
) -> None:
    await admin.limit("crm.lead.list", "OPERATION_TIME_LIMIT")
    key = f"{fast_settings.bullmq_prefix}:ratelimit"
    workers = [
        make_client(
            fast_settings.portal_webhook_url,
            limiter=RateLimiter(redis_client, key, burst=50, rate_per_s=50),
            max_limit_waits=0,
            operation_limit_wait_s=1.0,
        )
        for _ in range(2)
    ]
    try:
        with pytest.raises(BitrixError) as told:
            await workers[0].call("crm.lead.list", {})
        assert told.value.http_status == 429
        # The other worker does not ask the portal to hear the same: it is blocked at home.
        with pytest.raises(BitrixError) as blocked:
            await workers[1].call("crm.lead.list", {})
        assert (blocked.value.code, blocked.value.http_status) == ("OPERATION_TIME_LIMIT", None)
        assert 0 < (blocked.value.retry_after_s or 0) <= 1.0
        assert (await admin.stats())["by_method"]["crm.lead.list"] == {"OPERATION_TIME_LIMIT": 1}
        assert await workers[1].call("crm.lead.add", {"fields": {}}) > 0  # other methods run

        await asyncio.sleep(blocked.value.retry_after_s or 0)
        assert await workers[1].call("crm.lead.list", {}) != []
    finally:
        for worker in workers:
            await worker.aclose()


async def test_a_timeout_is_transient_and_the_write_may_have_happened(
    portal: PortalServer, fast_settings: Settings, admin: Admin
) -> None:
    await admin.script(method="crm.lead.add", times=1, kind="timeout_after_write", delay_s=3)
    client = make_client(fast_settings.portal_webhook_url, timeout_s=0.5)
    with pytest.raises(BitrixError) as caught:
        await client.call("crm.lead.add", {"fields": {"TITLE": "late"}})
    await client.aclose()
    assert (caught.value.code, caught.value.transient) == ("TIMEOUT", True)
    assert [lead["TITLE"] for lead in await admin.leads()] == ["late"]


async def test_network_errors_are_transient_and_never_show_the_webhook_code() -> None:
    client = make_client(f"http://127.0.0.1:{free_port()}/rest/1/s3cr3t-code")
    with pytest.raises(BitrixError) as caught:
        await client.call("crm.lead.add", {"fields": {}})
    await client.aclose()
    err = caught.value
    assert (err.code, err.transient) == ("NETWORK_ERROR", True)
    assert (
        str(err)
        == "crm.lead.add: NETWORK_ERROR: cannot reach Bitrix24 (ConnectError: Connection refused)"
    )
    assert err.__cause__ is None


async def test_a_wrong_webhook_code_is_permanent(
    portal: PortalServer, fast_settings: Settings
) -> None:
    client = make_client(f"{portal.base_url}/rest/1/wrong-code")
    with pytest.raises(BitrixError) as caught:
        await client.call("crm.lead.list", {})
    await client.aclose()
    assert not caught.value.transient
    assert "wrong-code" not in str(caught.value)
