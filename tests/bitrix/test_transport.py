"""Commands sent as `batch` requests, against the emulator over real HTTP: one request for
many commands, each caller with its own outcome, limits waited out, a hung request holding only
its own commands."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from b24sync.bitrix.batch import query_string
from b24sync.bitrix.client import BitrixClient, BitrixError
from b24sync.bitrix.ratelimit import RateLimiter
from b24sync.bitrix.transport import Command, Transport
from b24sync.portal.main import PortalServer
from b24sync.portal.params import parse_query
from b24sync.settings import Settings
from tests.conftest import eventually, free_port

from .conftest import Admin, make_client

MakeTransport = Callable[..., Transport]


def test_query_string_is_what_the_portal_reads_back() -> None:
    params = {
        "filter": {"=ORIGINATOR_ID": "b24sync", "@ORIGIN_ID": ["7", "8"]},
        "select": ["ID", "TITLE", "PHONE"],
        "fields": {
            "TITLE": "Иван Иванов & Co",
            "PHONE": [{"ID": 11, "VALUE": "+77001112233", "VALUE_TYPE": "WORK"}],
        },
        "left_out": None,
    }
    assert parse_query(query_string(params)) == {
        "filter": {"=ORIGINATOR_ID": "b24sync", "@ORIGIN_ID": ["7", "8"]},
        "select": ["ID", "TITLE", "PHONE"],
        "fields": {
            "TITLE": "Иван Иванов & Co",
            "PHONE": [{"ID": "11", "VALUE": "+77001112233", "VALUE_TYPE": "WORK"}],
        },
    }


@pytest.fixture
async def make_transport(
    portal: PortalServer, fast_settings: Settings
) -> AsyncIterator[MakeTransport]:
    """Transports over clients of their own (`make_transport(client=..., max_in_flight=...)`),
    stopped after the test."""
    made: list[tuple[Transport, BitrixClient]] = []

    def make(client: BitrixClient | None = None, **options: Any) -> Transport:
        client = client or make_client(fast_settings.portal_webhook_url)
        transport = Transport(client, **({"max_in_flight": 4} | options))
        transport.start()
        made.append((transport, client))
        return transport

    yield make
    for transport, client in made:
        await transport.stop()
        await client.aclose()


async def outcomes(transport: Transport, *calls: tuple[str, dict[str, Any]]) -> list[Any]:
    """Submits the calls at once and returns their outcomes, in order."""
    commands = [Command(method, params) for method, params in calls]
    for command in commands:
        transport.submit(command)
    return [await command.future for command in commands]


async def test_commands_submitted_together_leave_in_one_request(
    make_transport: MakeTransport, admin: Admin
) -> None:
    transport = make_transport()
    answers = await outcomes(
        transport, *(("crm.lead.add", {"fields": {"TITLE": f"Lead {n}"}}) for n in range(20))
    )

    ids = [answer["result"] for answer in answers]
    titles = {int(lead["ID"]): lead["TITLE"] for lead in await admin.leads()}
    assert [titles[lead_id] for lead_id in ids] == [f"Lead {n}" for n in range(20)]
    stats = (await admin.stats())["by_method"]
    assert stats == {"batch": {"ok": 1}, "crm.lead.add": {"ok": 20}}
    assert all("time" in answer for answer in answers)


async def test_a_lone_command_is_sent_as_it_is(make_transport: MakeTransport, admin: Admin) -> None:
    answer = await make_transport().call("crm.lead.add", {"fields": {"TITLE": "Alone"}})
    assert isinstance(answer["result"], int)
    assert "time" in answer
    assert "batch" not in (await admin.stats())["by_method"]


async def test_a_command_that_fails_fails_only_itself(
    make_transport: MakeTransport, admin: Admin
) -> None:
    transport = make_transport()
    first = await transport.call("crm.lead.add", {"fields": {"TITLE": "Existing"}})
    lead, missing, added, found = await outcomes(
        transport,
        ("crm.lead.get", {"id": first["result"]}),
        ("crm.lead.update", {"id": 987654, "fields": {"TITLE": "x"}}),
        ("crm.lead.add", {"fields": {"TITLE": "New"}}),
        ("crm.lead.list", {"filter": {"=TITLE": "Existing"}, "select": ["ID"]}),
    )

    assert lead["result"]["TITLE"] == "Existing"
    assert isinstance(missing, BitrixError)
    assert (missing.method, missing.not_found, missing.transient) == (
        "crm.lead.update",
        True,
        False,
    )
    assert isinstance(added["result"], int)
    assert (found["result"], found["total"]) == ([{"ID": str(first["result"])}], 1)
    assert (await admin.stats())["by_method"]["batch"] == {"ok": 1}


async def test_a_failed_request_fails_each_command_under_its_own_method(
    make_transport: MakeTransport, admin: Admin
) -> None:
    await admin.script(method="batch", times=1, kind="html", status=502)
    failed = await outcomes(
        make_transport(),
        ("crm.lead.list", {}),
        ("crm.lead.add", {"fields": {"TITLE": "a"}}),
    )
    assert [(e.method, e.code, e.transient) for e in failed] == [
        ("crm.lead.list", "INVALID_RESPONSE", True),
        ("crm.lead.add", "INVALID_RESPONSE", True),
    ]
    assert await admin.leads() == []


async def test_a_limit_answer_to_a_request_is_waited_out_never_returned(
    make_transport: MakeTransport,
    admin: Admin,
    fast_settings: Settings,
    redis_client: Redis,
) -> None:
    bucket = f"{fast_settings.bullmq_prefix}:ratelimit"
    transport = make_transport(
        BitrixClient(
            fast_settings.portal_webhook_url,
            limiter=RateLimiter(redis_client, bucket, burst=45, rate_per_s=100),
            timeout_s=5,
            limit_wait_s=0.05,
            operation_limit_wait_s=0.05,
            max_limit_waits=1,  # a single `request` would give up; commands never do
        )
    )
    await admin.limit("batch", "QUERY_LIMIT_EXCEEDED", times=3)
    answers = await outcomes(
        transport, *(("crm.lead.add", {"fields": {"TITLE": f"L{n}"}}) for n in range(3))
    )

    assert not any(isinstance(answer, BitrixError) for answer in answers)
    assert len(await admin.leads()) == 3
    assert (await admin.stats())["by_method"]["batch"] == {"QUERY_LIMIT_EXCEEDED": 3, "ok": 1}
    # The limit heard from the portal filled the bucket everyone shares.
    assert float(await redis_client.hget(bucket, "level") or 0) > 1


async def test_a_command_blocked_inside_a_batch_waits_and_goes_again(
    settings: Settings, make_transport: MakeTransport
) -> None:
    # Each add counts 1 s of operating time against a budget of 1.5 s in a 1 s window: the
    # second add blocks crm.lead.add until the first leaves the window.
    limits = {
        "portal_operating_limit_s": 1.5,
        "portal_operating_window_s": 1.0,
        "portal_operating_cost_s": 1.0,
        "portal_rate_limit": "off",
        "portal_port": free_port(),
    }
    blocking = settings.model_copy(update=limits)
    async with PortalServer(blocking) as server:
        transport = make_transport(
            make_client(blocking.portal_webhook_url, operation_limit_wait_s=0.5)
        )
        answers = await outcomes(
            transport, *(("crm.lead.add", {"fields": {"TITLE": f"L{n}"}}) for n in range(4))
        )
        stats = server.portal.stats.snapshot()["by_method"]
    assert len({answer["result"] for answer in answers}) == 4
    # Adds were refused inside a batch, then went again: no caller saw the limit.
    assert stats["crm.lead.add"]["ok"] == 4
    assert stats["crm.lead.add"]["OPERATION_TIME_LIMIT"] >= 1


async def test_a_hung_request_holds_only_its_own_commands(
    make_transport: MakeTransport, admin: Admin
) -> None:
    transport = make_transport()
    await admin.script(method="crm.lead.add", times=1, kind="timeout_after_write", delay_s=3)
    hung = transport.submit(Command("crm.lead.add", {"fields": {"TITLE": "held"}}))

    async def held() -> bool:  # written, its answer not yet given
        return bool(await admin.leads())

    await eventually(held)
    others = await asyncio.wait_for(
        outcomes(transport, *(("crm.lead.get", {"id": 1}) for _ in range(3))), 2
    )
    assert [answer["result"]["TITLE"] for answer in others] == ["held"] * 3
    assert not hung.done()
    assert (await hung)["result"] == 1


async def test_a_command_joined_until_it_leaves_goes_first(
    make_transport: MakeTransport, admin: Admin
) -> None:
    transport = make_transport(max_in_flight=1)
    # Hold the only request slot, so that what follows piles up.
    await admin.script(method="crm.lead.add", times=1, kind="timeout_after_write", delay_s=0.5)
    busy = transport.submit(Command("crm.lead.add", {"fields": {"TITLE": "first"}}))
    await asyncio.sleep(0.1)
    added = transport.submit(Command("crm.lead.add", {"fields": {"TITLE": "second"}}))
    names: list[str] = []
    joined = Command("crm.lead.list", build=lambda: {"filter": {"@TITLE": names}})
    transport.submit(joined, first=True)
    names += ["first", "second"]  # joined after it was queued, before it left

    await busy
    await added
    found = await joined.future
    assert not isinstance(found, BitrixError)
    # In the batch it ran before the second add: it went first.
    assert [row["TITLE"] for row in found["result"]] == ["first"]
    calls = (await admin.http.get("/admin/calls")).json()
    # Commands inside a batch are listed before the batch that carried them.
    assert [call["method"] for call in calls] == [
        "crm.lead.add",
        "crm.lead.list",
        "crm.lead.add",
        "batch",
    ]
    assert calls[1]["params"]["filter"]["@TITLE"] == ["first", "second"]


async def titles_by_request(admin: Admin) -> list[list[str]]:
    """The titles of the leads added by each request, in order (the portal records a batch's
    commands before the batch itself)."""
    carried: list[list[str]] = []
    titles: list[str] = []
    for call in (await admin.http.get("/admin/calls")).json():
        if call["method"] != "batch":
            titles.append(call["params"]["fields"]["TITLE"])
            continue
        inside = len(call["params"]["cmd"])
        carried += [[title] for title in titles[:-inside]] + [titles[-inside:]]
        titles = []
    return carried + [[title] for title in titles]


async def test_once_the_bucket_is_in_use_a_request_waits_to_fill(
    make_transport: MakeTransport, admin: Admin, fast_settings: Settings, redis_client: Redis
) -> None:
    limiter = RateLimiter(
        redis_client, f"{fast_settings.bullmq_prefix}:ratelimit", burst=20, rate_per_s=1
    )
    transport = make_transport(make_client(fast_settings.portal_webhook_url, limiter=limiter))

    async def lone_then_two_more(name: str) -> None:
        """One command, then two more while it could still be waiting to fill."""
        first = transport.submit(Command("crm.lead.add", {"fields": {"TITLE": f"{name} 1"}}))
        await asyncio.sleep(0.3)
        later = await outcomes(
            transport, *(("crm.lead.add", {"fields": {"TITLE": f"{name} {n}"}}) for n in (2, 3))
        )
        assert not any(isinstance(outcome, BitrixError) for outcome in [await first, *later])

    # With the bucket nearly free, a lone command leaves at once.
    await lone_then_two_more("free")
    assert await titles_by_request(admin) == [["free 1"], ["free 2", "free 3"]]
    # Slots taken by another worker: a quarter of the bucket used. The lone command waits for
    # company, up to the second the bucket takes to free a slot.
    for _ in range(3):
        await limiter.acquire()
    await lone_then_two_more("scarce")
    assert (await titles_by_request(admin))[2:] == [["scarce 1", "scarce 2", "scarce 3"]]


async def test_under_load_a_request_that_is_not_full_waits_out_the_gap_after_the_one_before(
    make_transport: MakeTransport, admin: Admin
) -> None:
    """No bucket to wait for, so a portal that answers fast would be sent a request per
    command: once requests carry several commands, the gap makes those that come meanwhile
    ride together. A lone command and the one that follows its answer leave at once."""
    transport = make_transport(min_gap_s=1.0)

    def add(*titles: str) -> asyncio.Future[list[Any]]:
        return asyncio.gather(
            *(
                transport.submit(Command("crm.lead.add", {"fields": {"TITLE": title}}))
                for title in titles
            )
        )

    await asyncio.wait_for(add("lone"), timeout=0.5)
    await asyncio.wait_for(add("after lone"), timeout=0.5)
    await asyncio.wait_for(add("pair a", "pair b"), timeout=0.5)
    second = add("second")
    await asyncio.sleep(0.2)
    third = add("third")
    assert not second.done()
    await asyncio.gather(second, third)
    assert await titles_by_request(admin) == [
        ["lone"],
        ["after lone"],
        ["pair a", "pair b"],
        ["second", "third"],
    ]
