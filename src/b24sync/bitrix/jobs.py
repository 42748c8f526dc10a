"""The BullMQ job handler: one event -> the user's lead in Bitrix24 -> exactly one final reply.

Jobs of one user run one at a time, in the order they were queued (`state.UserLocks`).
Each attempt, in its turn and under the user's lock:
1. an event older than the version already applied for the user is skipped (success reply,
   `skipped: true`); events without a version are always applied;
2. the user's lead is upserted (see `leads.Leads.sync`), the lead id and version remembered;
3. the success reply is published with confirms. If that fails the attempt fails, and the next
   attempt finds the lead and replies.

Failures: a permanent Bitrix24 error (auth, scope, validation, ...) is answered at once with its
code and fails the job without retries; anything else is retried with BullMQ's backoff and the
error reply goes out after the last attempt. A job whose turn does not come within
`user_lock_wait_s` is postponed without spending an attempt. A job BullMQ fails because its
workers kept dying (stalled more than `job_max_stalled_count` times) is answered with an error
from the worker's `failed` event.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bullmq import DelayedError, Queue, UnrecoverableError, Worker
from pydantic import BaseModel, ValidationError

from b24sync.bitrix import metrics
from b24sync.bitrix.client import BitrixError
from b24sync.bitrix.leads import Leads
from b24sync.bitrix.replies import ReplySender
from b24sync.bitrix.state import UserBusyError, UserLocks, UserStateStore
from b24sync.contracts.messages import Event, ReplyData, ReplyStatus
from b24sync.logs import get_logger, mask_secrets
from b24sync.settings import Settings

log = get_logger(__name__)

JOB_NAME = "bitrix_job"


class JobPayload(BaseModel):
    """A job's data: the event as received and its AMQP message id. Never the webhook URL."""

    event: Event
    message_id: str | None = None

    def wire(self) -> dict[str, Any]:
        return {"event": self.event.wire(), "message_id": self.message_id}


def job_options(settings: Settings) -> dict[str, Any]:
    """Default options of every job (the seed's: 3 attempts, exponential backoff from 2 s)."""
    return {
        "attempts": settings.job_attempts,
        "backoff": {"type": "exponential", "delay": settings.job_backoff_ms},
        "removeOnComplete": settings.job_remove_on_complete,
        "removeOnFail": settings.job_remove_on_fail,
    }


def retry_delay_ms(backoff: Any, attempts_made: int) -> int:
    """The delay BullMQ's built-in backoffs give after `attempts_made` failed attempts."""
    if isinstance(backoff, int):
        return backoff
    if not isinstance(backoff, dict):
        return 0
    delay = int(backoff.get("delay") or 0)
    if backoff.get("type") == "exponential":
        return int(2 ** (attempts_made - 1) * delay)
    return delay


async def job_pending(queue: Queue, job_id: str) -> bool:
    """Whether a job may still run: it exists and has not finished."""
    state = await queue.getJobState(job_id)
    return state not in ("completed", "failed", "unknown")


def reply_to(event: Event, status: ReplyStatus, attempts: int, **details: Any) -> ReplyData:
    """The reply to `event`: its action and user echoed, with the outcome's details."""
    return ReplyData(
        status=status,
        action=event.data.action,
        user=event.data.user,
        attempts=attempts,
        **details,
    )


def describe_failure(exc: BaseException) -> str:
    """A reason fit for logs and replies. Bitrix errors are built without the webhook URL; any
    other text is masked in case a library put a URL into it."""
    if isinstance(exc, BitrixError):
        return str(exc)
    return mask_secrets(f"{type(exc).__name__}: {exc}")


class JobHandler:
    """The BullMQ processor (`Worker(queue, JobHandler(...))`)."""

    def __init__(
        self,
        settings: Settings,
        *,
        leads: Leads,
        store: UserStateStore,
        locks: UserLocks,
        replies: ReplySender,
    ) -> None:
        self._leads = leads
        self._store = store
        self._locks = locks
        self._replies = replies
        self._busy_delay_ms = settings.user_busy_delay_ms
        self._reply_retry_ms = settings.job_backoff_ms

    async def __call__(self, job: Any, token: str) -> dict[str, Any]:
        attempt = int(job.attemptsMade) + 1
        max_attempts = int(job.opts.get("attempts") or 1)
        log.info(
            f"[Bitrix] Processing bitrix_job (attempt {attempt}/{max_attempts})", job_id=job.id
        )
        try:
            payload = JobPayload.model_validate(job.data)
        except ValidationError as exc:
            # Only a foreign producer writing into our queue can cause this: nobody to reply to.
            metrics.JOBS.labels(outcome="error").inc()
            raise UnrecoverableError(f"job data does not match the schema: {exc}") from exc
        user_id = payload.event.data.user.id
        try:
            reply = await self._apply(payload.event, job.id, attempt)
            await self._send(payload, reply)
        except UserBusyError:
            await job.moveToDelayed(int(time.time() * 1000) + self._busy_delay_ms, token)
            metrics.JOBS.labels(outcome="delayed").inc()
            log.info(
                f"[Bitrix] Job {job.id} postponed by {self._busy_delay_ms}ms: "
                f"user {user_id} is busy with earlier jobs"
            )
            raise DelayedError() from None
        except Exception as exc:
            await self._fail(job, token, payload, exc, attempt, max_attempts)
            raise
        await self._locks.finish(user_id, job.id)
        outcome = "skipped" if reply.skipped else "success"
        metrics.JOBS.labels(outcome=outcome).inc()
        metrics.JOB_ATTEMPTS.observe(attempt)
        log.info("[Bitrix] Job completed successfully", job_id=job.id)
        return {"bitrix_lead_id": reply.bitrix_lead_id, "skipped": bool(reply.skipped)}

    async def _apply(self, event: Event, job_id: str, attempt: int) -> ReplyData:
        user = event.data.user
        action = event.data.action
        async with self._locks.hold(user.id, job_id):
            state = await self._store.get(user.id)
            if (
                user.version is not None
                and state.version is not None
                and user.version < state.version
            ):
                log.info(
                    f"[Bitrix] Skipping {action.value} of user {user.id}: version "
                    f"{user.version} is older than the applied version {state.version}"
                )
                return reply_to(
                    event,
                    ReplyStatus.SUCCESS,
                    attempt,
                    bitrix_lead_id=state.lead_id,
                    skipped=True,
                    reason=f"version {user.version} is older than the applied "
                    f"version {state.version}; nothing changed",
                )
            log.info(
                f"[Bitrix] Calling Bitrix24 API with action: {action.value} (attempt {attempt})"
            )
            known_ids = [i for i in (user.bitrix_lead_id, state.lead_id) if i is not None]
            result = await self._leads.sync(action, user, known_ids)
            await self._store.record(user.id, result.lead_id, user.version)
        return reply_to(event, ReplyStatus.SUCCESS, attempt, bitrix_lead_id=result.lead_id)

    async def _fail(
        self,
        job: Any,
        token: str,
        payload: JobPayload,
        exc: Exception,
        attempt: int,
        max_attempts: int,
    ) -> None:
        """Logs a failed attempt; sends the error reply when no attempt follows. Raises
        `UnrecoverableError` to stop the retries of a permanent error once it is answered.

        A final reply that cannot be published keeps the job (and the user's turn): it is
        postponed and runs again, so Core is never left without an answer."""
        reason = describe_failure(exc)
        log.error(f"[Bitrix] Error processing job (attempt {attempt}/{max_attempts}): {reason}")
        permanent = isinstance(exc, BitrixError) and not exc.transient
        if not permanent and attempt < max_attempts:
            metrics.JOBS.labels(outcome="retry").inc()
            delay_ms = retry_delay_ms(job.opts.get("backoff"), attempt)
            log.info(f"[Bitrix] Will retry in {delay_ms}ms")
            return
        if not permanent:
            log.error("[Bitrix] All retry attempts exhausted, sending error reply")
        event = payload.event
        try:
            await self._send(
                payload,
                reply_to(
                    event,
                    ReplyStatus.ERROR,
                    attempt,
                    reason=reason,
                    error_code=exc.code if isinstance(exc, BitrixError) else None,
                ),
            )
        except Exception as send_exc:
            log.error(
                f"[Bitrix] Could not send the error reply of job {job.id} "
                f"({describe_failure(send_exc)}); trying again in {self._reply_retry_ms}ms"
            )
            await job.moveToDelayed(int(time.time() * 1000) + self._reply_retry_ms, token)
            metrics.JOBS.labels(outcome="delayed").inc()
            raise DelayedError() from None
        await self._locks.finish(event.data.user.id, job.id)
        metrics.JOBS.labels(outcome="error").inc()
        metrics.JOB_ATTEMPTS.observe(attempt)
        raise UnrecoverableError(reason) from exc

    async def answer_abandoned(self, job: Any) -> None:
        """Error reply of a job that stalled more often than `job_max_stalled_count` (its
        workers kept dying): BullMQ fails it without calling the handler, so nobody else
        would answer Core."""
        try:
            payload = JobPayload.model_validate(job.data)
            event = payload.event
            await self._send(
                payload,
                reply_to(
                    event,
                    ReplyStatus.ERROR,
                    int(job.attemptsMade) + 1,
                    reason=f"abandoned: {job.deferredFailure}",
                ),
            )
            await self._locks.finish(event.data.user.id, job.id)
        except Exception as exc:
            log.error(f"[Bitrix] Could not answer abandoned job {job.id}: {describe_failure(exc)}")
            return
        metrics.JOBS.labels(outcome="error").inc()

    async def _send(self, payload: JobPayload, reply: ReplyData) -> None:
        await self._replies.send(
            payload.event.data.reply_queue, reply, correlation_id=payload.message_id
        )


def attach_job_logging(worker: Worker, handler: JobHandler) -> None:
    """The seed's job monitoring lines, from the worker's events; and the error reply of a job
    BullMQ fails without running it (see `JobHandler.answer_abandoned`)."""
    pending: set[asyncio.Task[None]] = set()

    def on_completed(job: Any, _result: Any) -> None:
        log.info(f"[Bitrix] Job {job.id} completed after {job.attemptsMade} attempt(s)")

    def on_failed(job: Any, err: BaseException) -> None:
        # The worker reports every failed attempt; only the last one fails the job.
        if isinstance(err, UnrecoverableError) or job.attemptsMade >= job.opts.get("attempts", 1):
            log.error(f"[Bitrix] Job {job.id} failed: {mask_secrets(str(err))}")
        if job.deferredFailure:
            task = asyncio.create_task(handler.answer_abandoned(job))
            pending.add(task)
            task.add_done_callback(pending.discard)

    def on_stalled(job_id: str, *_: Any) -> None:
        log.warning(f"[Bitrix] Job {job_id} stalled")

    def on_error(err: BaseException, *_: Any) -> None:
        log.error(f"[Bitrix] Worker error: {describe_failure(err)}")

    worker.on("completed", on_completed)
    worker.on("failed", on_failed)
    worker.on("stalled", on_stalled)
    worker.on("error", on_error)
