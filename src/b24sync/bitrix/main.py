"""The Bitrix service: `b24sync bitrix` runs `run(settings)`; tests run `BitrixService` in-process.

Several processes can serve one queue side by side: BullMQ hands each job to one worker, the
per-user lock and the rate limiter live in Redis.
"""

from __future__ import annotations

import asyncio
import functools

import uvloop
from bullmq import Queue, Worker
from redis.asyncio import Redis

from b24sync.bitrix.batch import BatchingClient
from b24sync.bitrix.client import BitrixClient
from b24sync.bitrix.consumer import EventConsumer
from b24sync.bitrix.http import create_app
from b24sync.bitrix.jobs import JobHandler, attach_job_logging, job_options, job_pending
from b24sync.bitrix.leads import Leads
from b24sync.bitrix.ratelimit import RateLimiter
from b24sync.bitrix.replies import ReplySender
from b24sync.bitrix.state import UserLocks, UserStateStore
from b24sync.logs import configure_logging, get_logger, register_secret, webhook_secret
from b24sync.messaging import ConfirmedPublisher, describe_url
from b24sync.serving import EmbeddedServer, wait_for_stop_signal
from b24sync.settings import Settings

log = get_logger(__name__)


class BitrixService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Our own keys live beside BullMQ's, under the same prefix.
        self.key_prefix = f"{settings.bullmq_prefix}:{settings.bullmq_queue}:b24sync"
        self._redis: Redis | None = None
        self._client: BitrixClient | None = None
        self._publisher = ConfirmedPublisher(settings.rabbitmq_url, settings.rabbitmq_queue_type)
        self._queue: Queue | None = None
        self._worker: Worker | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._consumer: EventConsumer | None = None
        self._http: EmbeddedServer | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        settings = self.settings
        webhook_url = settings.effective_webhook_url
        register_secret(webhook_secret(webhook_url))
        self._redis = Redis.from_url(settings.redis_url, decode_responses=True)
        await self._redis.ping()
        await self._publisher.connect()
        replies = ReplySender(self._publisher)

        self._client = BitrixClient(
            webhook_url,
            limiter=RateLimiter(
                self._redis,
                f"{self.key_prefix}:ratelimit",
                burst=settings.bitrix_rate_burst,
                rate_per_s=settings.bitrix_rate_per_s,
            ),
            timeout_s=settings.bitrix_timeout_s,
            limit_wait_s=settings.bitrix_limit_wait_s,
            operation_limit_wait_s=settings.bitrix_operation_limit_wait_s,
            max_limit_waits=settings.bitrix_limit_max_waits,
            max_limit_wait_s=settings.bitrix_limit_max_wait_s,
        )
        bullmq_connection = {"connection": settings.redis_url, "prefix": settings.bullmq_prefix}
        self._queue = Queue(
            settings.bullmq_queue,
            {**bullmq_connection, "defaultJobOptions": job_options(settings)},
        )
        locks = UserLocks(
            self._redis,
            self.key_prefix,
            is_pending=functools.partial(job_pending, self._queue),
            ttl_ms=settings.user_lock_ttl_ms,
            wait_s=settings.user_lock_wait_s,
        )
        handler = JobHandler(
            settings,
            leads=Leads(
                BatchingClient(self._client, max_commands=settings.bitrix_batch_size)
                if settings.bitrix_batch_size > 1
                else self._client,
                settings,
            ),
            store=UserStateStore(self._redis, self.key_prefix),
            locks=locks,
            replies=replies,
        )
        self._worker = Worker(
            settings.bullmq_queue,
            handler,
            {
                **bullmq_connection,
                "autorun": False,
                "concurrency": settings.worker_concurrency,
                "lockDuration": settings.job_lock_duration_ms,
                "stalledInterval": settings.job_stalled_interval_ms,
                "maxStalledCount": settings.job_max_stalled_count,
            },
        )
        attach_job_logging(self._worker, handler)
        self._worker_task = asyncio.create_task(self._worker.run())

        self._consumer = EventConsumer(settings, self._queue, locks, replies)
        await self._consumer.start()
        self._http = EmbeddedServer(
            create_app(self.readiness),
            settings.host,
            settings.bitrix_http_port,
            log_level="warning",
            lifespan="off",
        )
        await self._http.start()
        log.info(
            f"[Bitrix] Service started: RabbitMQ {describe_url(settings.rabbitmq_url)}, "
            f"Bitrix24 {describe_url(webhook_url)}, "
            f"health on :{settings.bitrix_http_port}"
        )

    async def readiness(self) -> dict[str, bool]:
        redis_ok = False
        if self._redis is not None:
            try:
                redis_ok = bool(await asyncio.wait_for(self._redis.ping(), timeout=2))
            except Exception:
                redis_ok = False
        rabbit_ok = (
            self._consumer is not None and self._consumer.connected and self._publisher.connected
        )
        return {"rabbitmq": rabbit_ok, "redis": redis_ok}

    async def stop(self) -> None:
        """Stops consuming, lets active jobs finish (bounded by shutdown_timeout_s), closes all.
        A job cut off by the timeout stays active in Redis and is picked up again as stalled.
        Safe to call more than once, and after a failed start."""
        if self._consumer is not None:
            log.info("[Bitrix] Shutting down")
            await self._consumer.stop()
            self._consumer = None
        if self._worker is not None:
            closing = asyncio.create_task(self._worker.close())
            done, _ = await asyncio.wait({closing}, timeout=self.settings.shutdown_timeout_s)
            if not done:
                log.warning("[Bitrix] Active jobs did not finish in time; cancelling them")
                self._worker.cancelProcessing()
            await closing
            self._worker = None
        if self._worker_task is not None:
            await self._worker_task
            self._worker_task = None
        if self._queue is not None:
            await self._queue.close()
            self._queue = None
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
    configure_logging(settings.log_level, settings.log_json)
    uvloop.run(serve(settings))
