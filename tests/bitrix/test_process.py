"""`b24sync bitrix` as a real process: the seed's retry schedule, secrets kept out of the output,
SIGTERM, and a worker killed in the middle of a job."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from b24sync.portal.main import PortalServer
from b24sync.settings import Settings
from tests.conftest import free_port
from tests.processes import BITRIX_READY, ServiceProcess, service_environment
from tests.seed import SEED_CREATE

from .conftest import Admin, Bus, event


@pytest.fixture
async def spawn(
    fast_settings: Settings, tmp_path: Path
) -> AsyncIterator[Callable[..., ServiceProcess]]:
    """Builds `b24sync bitrix` processes on this test's queues (`spawn(VARIABLE=value)`)."""
    processes: list[ServiceProcess] = []

    def make(**env: Any) -> ServiceProcess:
        # Each process gets its own health port.
        defaults = {"LOG_LEVEL": "INFO", "BITRIX_HTTP_PORT": str(free_port())}
        overrides = {key: str(value) for key, value in env.items()}
        full_env = service_environment(fast_settings, **(defaults | overrides))
        process = ServiceProcess("bitrix", full_env, tmp_path, BITRIX_READY)
        processes.append(process)
        return process

    yield make
    for process in processes:
        await process.kill()


def in_order(output: str, *fragments: str) -> None:
    """Every fragment appears in `output`, each after the previous one."""
    position = 0
    for fragment in fragments:
        found = output.find(fragment, position)
        assert found >= 0, f"{fragment!r} not found after position {position} in:\n{output}"
        position = found + len(fragment)


async def test_the_seed_retry_schedule_against_an_unreachable_portal(
    spawn: Callable[..., ServiceProcess], bus: Bus, settings: Settings, redis_client: object
) -> None:
    secret = "sj4byqtjd3p5j3wq"
    worker = spawn(
        BITRIX_WEBHOOK_URL=f"http://127.0.0.1:{free_port()}/rest/1/{secret}/",
        JOB_BACKOFF_MS=2000,  # the seed's schedule: retries after 2 s and 4 s
    )
    await worker.start()
    body = dict(
        SEED_CREATE, data={**SEED_CREATE["data"], "replyQueue": settings.rabbitmq_reply_queue}
    )
    await bus.publish(body)

    reply = (await bus.reply(wait_s=30))["data"]
    assert (reply["status"], reply["attempts"], reply["retryable"]) == ("error", 3, True)
    assert reply["error_code"] == "NETWORK_ERROR"
    assert reply["reason"] == (
        "crm.lead.list: NETWORK_ERROR: cannot reach Bitrix24 (ConnectError: Connection refused)"
    )
    await worker.wait_for("failed: ")
    assert await worker.stop() == 0

    queue = settings.rabbitmq_reply_queue
    in_order(
        worker.output,
        "[Bitrix] Received user_created event: ",
        "[Bitrix] Job added to queue with ID: ",
        "[Bitrix] Processing bitrix_job (attempt 1/3)",
        "[Bitrix] Calling Bitrix24 API with action: create_card (attempt 1)",
        "[Bitrix] Error processing job (attempt 1/3): crm.lead.list: NETWORK_ERROR",
        "[Bitrix] Will retry in 2000ms",
        "[Bitrix] Processing bitrix_job (attempt 2/3)",
        "[Bitrix] Calling Bitrix24 API with action: create_card (attempt 2)",
        "[Bitrix] Error processing job (attempt 2/3): ",
        "[Bitrix] Will retry in 4000ms",
        "[Bitrix] Processing bitrix_job (attempt 3/3)",
        "[Bitrix] Calling Bitrix24 API with action: create_card (attempt 3)",
        "[Bitrix] Error processing job (attempt 3/3): ",
        "[Bitrix] All retry attempts exhausted, sending error reply",
        f"[Bitrix] Reply sent to queue: {queue}",
        "[Bitrix] Job ",
        " failed: crm.lead.list: NETWORK_ERROR",
        "[Bitrix] Service stopped",
    )
    assert secret not in worker.output
    assert "/rest/1/***" in worker.output  # the start line names the portal, masked


# Short locks so that the stalled-job check and the per-user lock notice a death quickly.
KILL_TIMINGS = {
    "JOB_LOCK_DURATION_MS": 1000,
    "JOB_STALLED_INTERVAL_MS": 500,
    "USER_LEASE_TTL_MS": 1500,
    "USER_BUSY_DELAY_MS": 200,
    "JOB_BACKOFF_MS": 50,
}


def job_of(process: ServiceProcess) -> str:
    """The id of the one job the process added."""
    (job_id,) = re.findall(r"Job added to queue with ID: (\w+)", process.output)
    return str(job_id)


async def _kill_mid_call_and_restart(
    spawn: Callable[..., ServiceProcess],
    admin: Admin,
    bus: Bus,
    settings: Settings,
    **env: Any,
) -> tuple[ServiceProcess, ServiceProcess]:
    """A worker dies with SIGKILL after the portal wrote the lead, before the answer; another
    worker starts. Returns both, the second still running."""
    first = spawn(**KILL_TIMINGS, **env)
    await first.start()
    # The lead gets written, then the answer hangs: the worker is mid-call when it dies.
    await admin.script(method="crm.lead.add", times=1, kind="timeout_after_write", delay_s=60)
    await bus.publish(
        event("create_card", 99, reply_queue=settings.rabbitmq_reply_queue), message_id="evt-99"
    )

    await admin.until_a_lead_exists()
    assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
    second = spawn(**KILL_TIMINGS, **env)
    await second.start()
    return first, second


async def test_a_worker_killed_mid_call_ends_in_one_lead_and_one_reply(
    spawn: Callable[..., ServiceProcess],
    portal: PortalServer,
    admin: Admin,
    bus: Bus,
    settings: Settings,
    redis_client: object,
) -> None:
    first, second = await _kill_mid_call_and_restart(spawn, admin, bus, settings)
    message = await bus.reply_message(wait_s=30)
    job_id = job_of(first)
    await second.wait_for(f"[Bitrix] Job completed successfully attempts=1 job_id={job_id}")
    assert await second.stop() == 0

    (lead,) = await admin.leads()
    reply = json.loads(message.body)["data"]
    assert message.correlation_id == "evt-99"
    assert (reply["status"], reply["bitrix_lead_id"]) == ("success", int(lead["ID"]))
    await bus.assert_no_reply(within=0.5)
    assert f"[Bitrix] Job {job_id} stalled" in second.output
    assert "b24sync-local" not in first.output + second.output


async def test_a_job_that_stalls_too_often_is_answered_with_an_error(
    spawn: Callable[..., ServiceProcess],
    portal: PortalServer,
    admin: Admin,
    bus: Bus,
    settings: Settings,
    redis_client: object,
) -> None:
    # No stall allowed: the first death makes BullMQ fail the job instead of running it again.
    first, second = await _kill_mid_call_and_restart(
        spawn, admin, bus, settings, JOB_MAX_STALLED_COUNT=0
    )
    message = await bus.reply_message(wait_s=30)
    job_id = job_of(first)
    await second.wait_for(f"[Bitrix] Job {job_id} failed: job stalled more than allowable limit")
    assert await second.stop() == 0

    reply = json.loads(message.body)["data"]
    assert message.correlation_id == "evt-99"
    assert reply["status"] == "error"
    assert reply["reason"] == "abandoned: job stalled more than allowable limit"
    assert reply["user_id"] == 99
    await bus.assert_no_reply(within=0.5)
