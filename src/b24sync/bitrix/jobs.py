"""The BullMQ job handler: one event -> the sync engine -> exactly one final reply.

The handler parses the job, hands its event to `engine.SyncEngine` and answers with what came
back: a success (written, or skipped with the reason), or an error. A transient failure fails
the attempt and BullMQ retries it (the seed's 3 attempts, 2 s exponential backoff); the error
reply after the last attempt says `retryable: true`. A permanent one (auth, scope, validation,
...) is answered at once with `retryable: false` and ends the job. A job whose user another
process is writing goes back to the queue for a while without spending an attempt. A success
reply that cannot be published fails the attempt, and the retry writes and replies again.
A job BullMQ fails because its workers kept dying (stalled more than `job_max_stalled_count`
times) is answered with an error from the worker's `failed` event.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bullmq import DelayedError, UnrecoverableError, Worker
from pydantic import BaseModel, ValidationError

from b24sync.bitrix import metrics
from b24sync.bitrix.client import BitrixError
from b24sync.bitrix.engine import Busy, Failed, Skipped, SyncEngine, Work, Written, fields_of
from b24sync.bitrix.replies import ReplySender
from b24sync.contracts.messages import Event, ReplyData, ReplyStatus
from b24sync.logs import get_logger, mask_secrets, shorten
from b24sync.settings import Settings

log = get_logger(__name__)

JOB_NAME = "bitrix_job"
# Longest failure reason a log line carries.
LOGGED_REASON_CHARS = 500


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

    def __init__(self, settings: Settings, *, engine: SyncEngine, replies: ReplySender) -> None:
        self._engine = engine
        self._replies = replies
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
        event = payload.event
        outcome = await self._engine.sync(Work(event, str(job.id), attempt, int(job.timestamp)))
        if isinstance(outcome, Busy):
            await job.moveToDelayed(int(time.time() * 1000) + outcome.retry_in_ms, token)
            metrics.JOBS.labels(outcome="delayed").inc()
            log.info(
                f"[Bitrix] Job {job.id} postponed by {outcome.retry_in_ms}ms: user "
                f"{event.data.user.id} is being written by another process"
            )
            raise DelayedError()
        if isinstance(outcome, Failed):
            if outcome.fields != fields_of(event):
                await self._carry_fields(job, payload, outcome)
            await self._fail(job, token, payload, outcome.error, attempt, max_attempts)
            raise outcome.error
        if isinstance(outcome, Written):
            reply = reply_to(event, ReplyStatus.SUCCESS, attempt, bitrix_lead_id=outcome.lead_id)
        else:
            reply = self._skipped_reply(event, outcome, attempt)
        try:
            await self._send(payload, reply)
        except Exception as exc:
            await self._fail(job, token, payload, exc, attempt, max_attempts)
            raise
        metrics.JOBS.labels(outcome="skipped" if reply.skipped else "success").inc()
        metrics.JOB_ATTEMPTS.observe(attempt)
        log.info("[Bitrix] Job completed successfully", job_id=job.id, attempts=attempt)
        return {"bitrix_lead_id": reply.bitrix_lead_id, "skipped": bool(reply.skipped)}

    @staticmethod
    def _skipped_reply(event: Event, outcome: Skipped, attempt: int) -> ReplyData:
        return reply_to(
            event,
            ReplyStatus.SUCCESS,
            attempt,
            bitrix_lead_id=outcome.lead_id,
            skipped=True,
            reason=outcome.reason,
            applied_version=outcome.applied_version,
        )

    @staticmethod
    async def _carry_fields(job: Any, payload: JobPayload, outcome: Failed) -> None:
        """Older jobs merged into this one were answered as superseded: the retry must still
        write their fields."""
        data = payload.event.data.model_copy(update={"changed": sorted(outcome.fields)})
        event = payload.event.model_copy(update={"data": data})
        await job.updateData(JobPayload(event=event, message_id=payload.message_id).wire())

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
        `UnrecoverableError` to stop the retries once the final error is answered.

        A final reply that cannot be published keeps the job: it is postponed and runs again,
        so Core is never left without an answer."""
        reason = describe_failure(exc)
        log.error(
            f"[Bitrix] Error processing job (attempt {attempt}/{max_attempts}): "
            + shorten(reason, LOGGED_REASON_CHARS)
        )
        permanent = isinstance(exc, BitrixError) and not exc.transient
        if not permanent and attempt < max_attempts:
            metrics.JOBS.labels(outcome="retry").inc()
            delay_ms = retry_delay_ms(job.opts.get("backoff"), attempt)
            log.info(f"[Bitrix] Will retry in {delay_ms}ms")
            return
        if not permanent:
            log.error("[Bitrix] All retry attempts exhausted, sending error reply")
        error = reply_to(
            payload.event,
            ReplyStatus.ERROR,
            attempt,
            reason=reason,
            error_code=exc.code if isinstance(exc, BitrixError) else None,
            retryable=not permanent,
        )
        try:
            await self._send(payload, error)
        except Exception as send_exc:
            log.error(
                f"[Bitrix] Could not send the error reply of job {job.id} "
                f"({describe_failure(send_exc)}); trying again in {self._reply_retry_ms}ms"
            )
            await job.moveToDelayed(int(time.time() * 1000) + self._reply_retry_ms, token)
            metrics.JOBS.labels(outcome="delayed").inc()
            raise DelayedError() from None
        metrics.JOBS.labels(outcome="error").inc()
        metrics.JOB_ATTEMPTS.observe(attempt)
        raise UnrecoverableError(shorten(reason, LOGGED_REASON_CHARS)) from exc

    async def answer_abandoned(self, job: Any) -> None:
        """Error reply of a job that stalled more often than `job_max_stalled_count` (its
        workers kept dying): BullMQ fails it without calling the handler, so nobody else
        would answer Core."""
        try:
            payload = JobPayload.model_validate(job.data)
            await self._send(
                payload,
                reply_to(
                    payload.event,
                    ReplyStatus.ERROR,
                    int(job.attemptsMade) + 1,
                    reason=f"abandoned: {job.deferredFailure}",
                    retryable=True,
                ),
            )
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
        # Repeats "Job completed successfully" (INFO): kept in the seed's words, one level down.
        log.debug(f"[Bitrix] Job {job.id} completed after {job.attemptsMade} attempt(s)")

    def on_failed(job: Any, err: BaseException) -> None:
        # The worker reports every failed attempt; only the last one fails the job.
        if isinstance(err, UnrecoverableError) or job.attemptsMade >= job.opts.get("attempts", 1):
            message = shorten(mask_secrets(str(err)), LOGGED_REASON_CHARS)
            log.error(f"[Bitrix] Job {job.id} failed: {message}")
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
