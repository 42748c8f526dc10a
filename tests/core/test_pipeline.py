"""GET /sync/pipeline: the database's figures beside the Bitrix service's queue and request
counters in the real Redis, and the answer when Redis is away."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
import pytest
from bullmq import Queue
from pydantic import SecretStr
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.bitrix.main import key_prefix
from b24sync.bitrix.stats import LIMIT_ANSWERS, REQUESTS, RequestStats
from b24sync.core.app import create_app
from b24sync.core.pipeline.endpoints import close_queue_reader
from b24sync.settings import Settings
from tests.conftest import eventually, free_port
from tests.core.helpers import answer, error, publish_all, success
from tests.core.test_api import SEED_CREATE

ClientFor = Callable[[Settings], AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def client_for(rollback_sessionmaker: async_sessionmaker[AsyncSession]) -> ClientFor:
    """Core's API on given settings, its requests in the test's transaction; the app's Redis
    reader closed after."""

    @asynccontextmanager
    async def open_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
        app = create_app(settings)
        app.state.sessionmaker = rollback_sessionmaker
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://core") as http:
                yield http
        finally:
            await close_queue_reader(app)

    return open_client


async def test_pipeline_counts_users_queue_requests_and_failures(
    client_for: ClientFor,
    rollback_sessionmaker: async_sessionmaker[AsyncSession],
    core_settings: Settings,
) -> None:
    sessions = rollback_sessionmaker
    queue = Queue(
        core_settings.bullmq_queue,
        {"connection": core_settings.redis_url, "prefix": core_settings.bullmq_prefix},
    )
    redis = Redis.from_url(core_settings.redis_url, decode_responses=True)
    try:
        for number in range(3):
            await queue.add("bitrix_job", {"n": number}, {"jobId": f"waiting-{number}"})
        stats = RequestStats(redis, key_prefix(core_settings))
        for _ in range(4):
            await stats.count(REQUESTS)
        await stats.count(LIMIT_ANSWERS)
        async with client_for(core_settings) as client:
            ids = [(await client.post("/users", json=SEED_CREATE)).json()["id"] for _ in range(3)]
            await publish_all(sessions)
            await answer(sessions, core_settings, success(ids[0], 1))
            await answer(sessions, core_settings, error(ids[1], 1, reason="Missing phone number"))
            # The counters were written in this second: the window ends with the one before.
            second = int((await redis.time())[0])

            async def next_second() -> bool:
                return int((await redis.time())[0]) > second

            await eventually(next_second, 2)

            response = await client.get("/sync/pipeline")
    finally:
        await queue.close()
        await redis.aclose()

    assert response.status_code == 200
    pipeline = response.json()
    assert pipeline["sync"]["users"] == {"total": 3, "pending": 1, "synced": 1, "failed": 1}
    assert pipeline["sync"]["failed"] == {"retrying": 0, "permanent": 1, "next_retry_in_s": None}
    assert pipeline["queue_name"] == core_settings.bullmq_queue
    assert pipeline["queue"] == {"waiting": 3, "active": 0, "delayed": 0, "failed": 0}
    assert pipeline["redis_error"] is None
    bitrix = pipeline["bitrix"]
    assert bitrix["plan"] == "standard"
    assert (bitrix["burst"], bitrix["ceiling_per_s"]) == (45, 2.0)
    assert bitrix["window_s"] == 10
    assert bitrix["per_second"][-1] == 4 or bitrix["per_second"][-2] == 4
    assert bitrix["requests_per_s"] == 0.4
    assert bitrix["limit_answers"] == 1
    [failure] = pipeline["recent_failures"]
    assert failure["user_id"] == ids[1]
    assert failure["reason"] == "Missing phone number"
    assert failure["retryable"] is False
    assert failure["attempts"] == 3
    assert failure["failed_at"] is not None


async def test_redis_away_leaves_its_figures_null_with_the_reason(
    client_for: ClientFor, core_settings: Settings
) -> None:
    away = core_settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}"})
    async with client_for(away) as client:
        await client.post("/users", json=SEED_CREATE)
        started = time.monotonic()
        response = await client.get("/sync/pipeline")

    assert time.monotonic() - started < 3
    assert response.status_code == 200
    pipeline = response.json()
    assert pipeline["sync"]["users"]["pending"] == 1
    assert pipeline["queue"] is None
    assert pipeline["bitrix"] is None
    assert pipeline["redis_error"].startswith(f"Redis at {away.redis_url} cannot be read")


async def test_pipeline_and_dashboard_data_need_the_token(
    client_for: ClientFor, core_settings: Settings
) -> None:
    guarded = core_settings.model_copy(update={"core_api_token": SecretStr("s3cret-token")})
    async with client_for(guarded) as client:
        assert (await client.get("/sync/pipeline")).status_code == 401
        assert (await client.get("/ui/config")).status_code == 401
        assert (await client.get("/ui/leads")).status_code == 401
        # The page itself holds no data: it asks for the token.
        page = await client.get("/ui")
        authorized = {"Authorization": "Bearer s3cret-token"}
        pipeline = await client.get("/sync/pipeline", headers=authorized)
        config = await client.get("/ui/config", headers=authorized)

    assert page.status_code == 200
    assert 'data-token-required="true"' in page.text
    assert "s3cret-token" not in page.text
    assert pipeline.status_code == 200
    assert config.json() == {
        "lead_url": None,
        "emulator": True,
        "stages": ["NEW", "IN_PROCESS", "PROCESSED", "JUNK", "CONVERTED"],
    }
