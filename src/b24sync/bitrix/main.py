"""The Bitrix service: `b24sync bitrix` runs `run(settings)`; tests run `BitrixService` in-process.

Several processes can serve one queue side by side: BullMQ hands each job to one worker, the
per-user leases and the rate limiter live in Redis.
"""

from __future__ import annotations

import asyncio
from uuid import uuid4

import uvloop
from bullmq import Queue, Worker
from redis.asyncio import Redis
from redis.exceptions import RedisError

from b24sync.bitrix.client import BitrixClient
from b24sync.bitrix.consumer import EventConsumer
from b24sync.bitrix.engine import SyncEngine
from b24sync.bitrix.http import create_app
from b24sync.bitrix.jobs import JobHandler, attach_job_logging, job_options
from b24sync.bitrix.leads import LeadFields
from b24sync.bitrix.marks import EventMarks
from b24sync.bitrix.portal_check import PortalCheck
from b24sync.bitrix.ratelimit import RateLimiter
from b24sync.bitrix.replies import ReplySender
from b24sync.bitrix.state import UserLeases
from b24sync.bitrix.stats import RequestStats
from b24sync.bitrix.transport import Transport
from b24sync.bitrix.worker import create_worker, run_worker
from b24sync.errors import unreachable
from b24sync.logs import configure_logging, get_logger, register_secret, webhook_secret
from b24sync.messaging import ConfirmedPublisher, PublishError, describe_url
from b24sync.serving import EmbeddedServer, wait_for_stop_signal
from b24sync.settings import Settings

log = get_logger(__name__)


def key_prefix(settings: Settings) -> str:
    """Where the service's own Redis keys live: beside BullMQ's, under the same prefix."""
    return f"{settings.bullmq_prefix}:{settings.bullmq_queue}:b24sync"


def create_client(settings: Settings, redis: Redis) -> BitrixClient:
    """The Bitrix24 client of every process that calls the portal: each takes its requests from
    the one bucket in Redis (`BITRIX_PLAN`), so together they stay within the portal's limit."""
    bucket = settings.bitrix_bucket
    stats = RequestStats(redis, key_prefix(settings))
    return BitrixClient(
        settings.effective_webhook_url,
        limiter=None
        if bucket is None
        else RateLimiter(
            redis,
            f"{key_prefix(settings)}:ratelimit",
            burst=bucket[0],
            rate_per_s=bucket[1],
            stats_key=stats.key,
        ),
        stats=stats,
        timeout_s=settings.bitrix_timeout_s,
        limit_wait_s=settings.bitrix_limit_wait_s,
        operation_limit_wait_s=settings.bitrix_operation_limit_wait_s,
        max_limit_waits=settings.bitrix_limit_max_waits,
        max_limit_wait_s=settings.bitrix_limit_max_wait_s,
    )


class BitrixService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.key_prefix = key_prefix(settings)
        self._redis: Redis | None = None
        self._client: BitrixClient | None = None
        self._publisher = ConfirmedPublisher(settings.rabbitmq_url, settings.rabbitmq_queue_type)
        self._queue: Queue | None = None
        self._transport: Transport | None = None
        self._engine: SyncEngine | None = None
        self._worker: Worker | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._consumer: EventConsumer | None = None
        self._http: EmbeddedServer | None = None
        self._portal_check: PortalCheck | None = None

    async def start(self) -> None:
        """Raises `StartupError` (one line naming the setting) when Redis or RabbitMQ cannot
        be reached, the portal rejects the webhook, or the HTTP port is taken. Unlike Core,
        which serves its API while it waits for RabbitMQ, this service has nothing to do
        without RabbitMQ and Redis: it stops, for the supervisor or the orchestrator to start
        it again. A portal that cannot be reached is waited for (see `PortalCheck`)."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        settings = self.settings
        webhook_url = settings.effective_webhook_url
        register_secret(webhook_secret(webhook_url))
        if settings.bitrix_http_token is not None:
            register_secret(settings.bitrix_http_token.get_secret_value())
        self._redis = Redis.from_url(settings.redis_url, decode_responses=True)
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            where = describe_url(settings.redis_url)
            raise unreachable("Redis", where, exc, "REDIS_URL") from None
        try:
            await self._publisher.connect()
        except (PublishError, OSError, TimeoutError) as exc:
            where = describe_url(settings.rabbitmq_url)
            raise unreachable("RabbitMQ", where, exc, "RABBITMQ_URL") from None
        replies = ReplySender(self._publisher)

        self._client = create_client(settings, self._redis)
        self._portal_check = PortalCheck(
            self._client,
            setting="BITRIX_WEBHOOK_URL"
            if settings.bitrix_webhook_url is not None
            else "PORTAL_PORT and PORTAL_WEBHOOK (no BITRIX_WEBHOOK_URL: the emulator)",
        )
        await self._portal_check.start()
        self._transport = Transport(
            self._client,
            max_commands=settings.bitrix_batch_size,
            max_in_flight=settings.bitrix_requests_in_flight,
        )
        self._engine = SyncEngine(
            leases=UserLeases(
                self._redis,
                self.key_prefix,
                owner=uuid4().hex,
                ttl_ms=settings.user_lease_ttl_ms,
            ),
            transport=self._transport,
            fields=LeadFields(settings),
            # Enough users in flight to keep full batches coming while requests are out.
            max_users=settings.bitrix_batch_size * (settings.bitrix_requests_in_flight + 2),
            busy_delay_ms=settings.user_busy_delay_ms,
        )
        self._engine.start()
        self._transport.start(feeder=self._engine)
        bullmq_connection = {"connection": settings.redis_url, "prefix": settings.bullmq_prefix}
        self._queue = Queue(
            settings.bullmq_queue,
            {**bullmq_connection, "defaultJobOptions": job_options(settings)},
        )
        marks = EventMarks(self._redis, f"{self.key_prefix}:events")
        handler = JobHandler(settings, engine=self._engine, marks=marks, replies=replies)
        self._worker = create_worker(
            settings.bullmq_queue,
            handler,
            {
                **bullmq_connection,
                "lockDuration": settings.job_lock_duration_ms,
                "stalledInterval": settings.job_stalled_interval_ms,
                "maxStalledCount": settings.job_max_stalled_count,
            },
        )
        attach_job_logging(self._worker, handler)
        self._worker_task = asyncio.create_task(run_worker(self._worker, settings.bitrix_max_jobs))

        self._consumer = EventConsumer(settings, self._queue, marks, replies)
        await self._consumer.start()
        self._http = EmbeddedServer(
            create_app(self.readiness, settings.bitrix_http_token),
            settings.host,
            settings.bitrix_http_port,
            port_setting="BITRIX_HTTP_PORT",
            log_level="warning",
            lifespan="off",
        )
        await self._http.start()
        log.info(
            f"[Bitrix] Service started: RabbitMQ {describe_url(settings.rabbitmq_url)}, "
            f"Bitrix24 {describe_url(webhook_url)}, "
            f"health on :{settings.bitrix_http_port}"
        )

    async def readiness(self) -> dict[str, bool | str]:
        redis_ok = False
        if self._redis is not None:
            try:
                redis_ok = bool(await asyncio.wait_for(self._redis.ping(), timeout=2))
            except Exception:
                redis_ok = False
        rabbit_ok = (
            self._consumer is not None and self._consumer.connected and self._publisher.connected
        )
        problem = "not started" if self._portal_check is None else self._portal_check.problem
        return {"rabbitmq": rabbit_ok, "redis": redis_ok, "bitrix24": problem or True}

    async def stop(self) -> None:
        """Stops consuming and fetching; jobs not yet being written go back to the queue at
        once, writes in flight finish (bounded by shutdown_timeout_s), then closes all. A job
        cut off by the timeout stays active in Redis and is picked up again as stalled.
        Safe to call more than once, and after a failed start."""
        if self._consumer is not None:
            log.info("[Bitrix] Shutting down")
            await self._consumer.stop()
            self._consumer = None
        if self._worker is not None:
            # Closing first stops the fetching; then the engine hands back what waits.
            closing = asyncio.create_task(self._worker.close())
            await asyncio.sleep(0)
            if self._engine is not None:
                self._engine.close()
            done, _ = await asyncio.wait({closing}, timeout=self.settings.shutdown_timeout_s)
            if not done:
                log.warning("[Bitrix] Active jobs did not finish in time; cancelling them")
                self._worker.cancelProcessing()
            await closing
            self._worker = None
        if self._worker_task is not None:
            await self._worker_task
            self._worker_task = None
        if self._engine is not None:
            await self._engine.stop()
            self._engine = None
        if self._transport is not None:
            await self._transport.stop()
            self._transport = None
        if self._queue is not None:
            await self._queue.close()
            self._queue = None
        if self._portal_check is not None:
            await self._portal_check.stop()
            self._portal_check = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        await self._publisher.close()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._http is not None:
            await self._http.stop()
            self._http = None
            log.info("[Bitrix] Service stopped")


async def serve(settings: Settings) -> None:
    """Runs the service until SIGTERM or SIGINT."""
    service = BitrixService(settings)
    # Listening from the start: a signal during start-up stops the service right after it.
    stop_signal = asyncio.create_task(wait_for_stop_signal())
    try:
        await service.start()
        await stop_signal
    finally:
        stop_signal.cancel()
        await service.stop()


def run(settings: Settings) -> None:
    # The webhook code is registered as a secret when the service starts.
    configure_logging(settings.log_level, settings.log_json, personal_data=settings.log_pii)
    uvloop.run(serve(settings))
