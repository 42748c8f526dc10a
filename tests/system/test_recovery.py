"""Recovery of the whole flow from losses no single service can see: every change ends in its
lead, exactly one lead per user."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from b24sync.bitrix.jobs import JobPayload
from b24sync.settings import Settings
from tests.bitrix.conftest import Admin, ServiceFactory
from tests.conftest import eventually, wipe_redis
from tests.core.helpers import running_core


async def test_jobs_lost_with_redis_are_sent_again_and_end_in_one_lead_each(
    fast_settings: Settings,
    database_url: str,
    portal: object,
    admin: Admin,
    start_service: ServiceFactory,
    redis_client: Redis,
) -> None:
    # A failed attempt waits 3 s in BullMQ's delayed set: long enough to lose it there.
    settings = fast_settings.model_copy(
        update={"database_url": database_url, "sync_resend_after_s": 1.0, "job_backoff_ms": 3000}
    )
    await start_service(job_backoff_ms=3000)
    await admin.http.put("/admin/faults", json={"outage_s": 60})
    jobs = f"{settings.bullmq_prefix}:{settings.bullmq_queue}"

    async with running_core(settings) as core:
        created = [
            await core.post("/users", json={"full_name": f"Пользователь {n}", "phone": phone})
            for n, phone in enumerate(["+77001112233", "+77011234567", "+77021234567"])
        ]
        assert [response.status_code for response in created] == [201, 201, 201]
        users = [response.json()["id"] for response in created]

        async def all_delayed() -> bool:
            # Events that reach the service together share a job: count users, not jobs.
            waiting: set[int] = set()
            for job_id in await redis_client.zrange(f"{jobs}:delayed", 0, -1):
                data = await redis_client.hget(f"{jobs}:{job_id}", "data")
                if data is not None:
                    payload = JobPayload.model_validate_json(data)
                    waiting |= {queued.event.data.user.id for queued in payload.events}
            return waiting == set(users)

        await eventually(all_delayed)
        assert await wipe_redis(settings.bullmq_prefix) > 0  # Redis lost everything
        await admin.http.put("/admin/faults", json={})  # the portal is back

        async def all_synced() -> bool:
            states = await asyncio.gather(*(core.get(f"/users/{id}") for id in users))
            return all(state.json()["sync"]["status"] == "synced" for state in states)

        await eventually(all_synced, wait_s=30)
        final = [(await core.get(f"/users/{id}")).json() for id in users]

    leads = await admin.leads()
    assert sorted(int(lead["ORIGIN_ID"]) for lead in leads) == sorted(users)
    assert {user["bitrix_lead_id"] for user in final} == {int(lead["ID"]) for lead in leads}
