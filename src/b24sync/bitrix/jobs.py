"""The BullMQ job handler: a job's events -> the sync engine -> exactly one final reply each.

A job carries the events the consumer took in together (see `consumer`). The handler hands
them all to `engine.SyncEngine` at once and answers each as its outcome comes back: a success
(written, or skipped with the reason), or an error. The events not answered stay in the job,
which runs again for them alone:
- a transient failure fails the attempt and BullMQ retries the job (the seed's 3 attempts, 2 s
  exponential backoff); the error reply after the last attempt says `retryable: true`;
- a permanent one (auth, scope, validation, ...) is answered at once with `retryable: false`;
- an event whose user another process is writing goes back to the queue with its job for a
  while, without spending an attempt;
- a success reply that cannot be published counts as a failed attempt: the retry writes and
  replies again; a final error reply that cannot be published keeps its event, postponed.
A job with an event answered by an error fails; otherwise it completes. Answered events are
unmarked (see `marks`), so when they come again they run again. A job BullMQ fails because its
workers kept dying (stalled more than `job_max_stalled_count` times) has its events answered
with an error from the worker's `failed` event.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from bullmq import DelayedError, UnrecoverableError, Worker
from pydantic import BaseModel, Field, ValidationError, model_validator
from redis.exceptions import RedisError

from b24sync.bitrix import metrics
from b24sync.bitrix.client import BitrixError
from b24sync.bitrix.engine import Busy, Failed, Skipped, SyncEngine, Work, Written, fields_of
from b24sync.bitrix.marks import EventMarks
from b24sync.bitrix.replies import ReplySender
from b24sync.contracts.messages import Event, ReplyData, ReplyStatus, UserField
from b24sync.logs import get_logger, mask_secrets, shorten
from b24sync.settings import Settings

log = get_logger(__name__)

JOB_NAME = "bitrix_job"
# Longest failure reason a log line carries.
LOGGED_REASON_CHARS = 500


class QueuedEvent(BaseModel):
    """An event as received, its AMQP message id (the reply's correlation id) and the key it
    is marked under."""

    event: Event
    message_id: str | None = None
    key: str = ""

    def wire(self) -> dict[str, Any]:
        return {"event": self.event.wire(), "message_id": self.message_id, "key": self.key}

    def carrying(self, fields: frozenset[UserField]) -> QueuedEvent:
        """This event, asking to write `fields`."""
        data = self.event.data.model_copy(update={"changed": sorted(fields)})
        return self.model_copy(update={"event": self.event.model_copy(update={"data": data})})


class JobPayload(BaseModel):
    """A job's data: its events, in the order they came. Never the webhook URL."""

    events: list[QueuedEvent] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _single_event(cls, data: Any) -> Any:
        # Jobs queued by earlier versions carry one event each, unmarked.
        if isinstance(data, dict) and "event" in data and "events" not in data:
            return {"events": [data]}
        return data

    def wire(self) -> dict[str, Any]:
        return {"events": [queued.wire() for queued in self.events]}


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


@dataclass(frozen=True)
class _Kept:
    """An event the job keeps: to retry after `error`, or else to run again in `delay_ms`."""

    queued: QueuedEvent
    error: Exception | None = None
    delay_ms: int = 0


class JobHandler:
    """The BullMQ processor (`Worker(queue, JobHandler(...))`)."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: SyncEngine,
        marks: EventMarks,
        replies: ReplySender,
    ) -> None:
        self._engine = engine
        self._marks = marks
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
        ends = await asyncio.gather(
            *(self._run(job, queued, attempt, max_attempts) for queued in payload.events)
        )
        await self._unmark(
            [
                queued.key
                for queued, end in zip(payload.events, ends, strict=True)
                if isinstance(end, ReplyData)
            ]
        )
        kept = [end for end in ends if isinstance(end, _Kept)]
        if kept:
            await self._keep(job, token, payload, kept, attempt)
        errors = [
            end for end in ends if isinstance(end, ReplyData) and end.status is ReplyStatus.ERROR
        ]
        if errors:
            raise UnrecoverableError(shorten(errors[0].reason or "", LOGGED_REASON_CHARS))
        log.info("[Bitrix] Job completed successfully", job_id=job.id, attempts=attempt)
        return {"events": len(ends)}

    async def _run(
        self, job: Any, queued: QueuedEvent, attempt: int, max_attempts: int
    ) -> ReplyData | _Kept:
        """Syncs one event of the job: the reply it was answered with, or why it is kept."""
        event = queued.event
        outcome = await self._engine.sync(Work(event, str(job.id), attempt, int(job.timestamp)))
        if isinstance(outcome, Busy):
            metrics.JOBS.labels(outcome="delayed").inc()
            log.info(
                f"[Bitrix] Job {job.id} postponed by {outcome.retry_in_ms}ms: user "
                f"{event.data.user.id} is being written by another process"
            )
            return _Kept(queued, delay_ms=outcome.retry_in_ms)
        if isinstance(outcome, Failed):
            if outcome.fields != fields_of(event):
                # Older events merged into this one were answered as superseded: the retry
                # must still write their fields.
                queued = queued.carrying(outcome.fields)
            return await self._failed(job, queued, outcome.error, attempt, max_attempts)
        if isinstance(outcome, Written):
            reply = reply_to(event, ReplyStatus.SUCCESS, attempt, bitrix_lead_id=outcome.lead_id)
        else:
            reply = self._skipped_reply(event, outcome, attempt)
        try:
            await self._send(queued, reply)
        except Exception as exc:
            return await self._failed(job, queued, exc, attempt, max_attempts)
        metrics.JOBS.labels(outcome="skipped" if reply.skipped else "success").inc()
        metrics.JOB_ATTEMPTS.observe(attempt)
        return reply

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

    async def _failed(
        self, job: Any, queued: QueuedEvent, exc: Exception, attempt: int, max_attempts: int
    ) -> ReplyData | _Kept:
        """Logs a failed attempt of an event; sends its error reply when no attempt follows.

        A final reply that cannot be published keeps the event: it is postponed and runs
        again, so Core is never left without an answer."""
        reason = describe_failure(exc)
        log.error(
            f"[Bitrix] Error processing job (attempt {attempt}/{max_attempts}): "
            + shorten(reason, LOGGED_REASON_CHARS)
        )
        permanent = isinstance(exc, BitrixError) and not exc.transient
        if not permanent and attempt < max_attempts:
            metrics.JOBS.labels(outcome="retry").inc()
            return _Kept(queued, error=exc)
        if not permanent:
            log.error("[Bitrix] All retry attempts exhausted, sending error reply")
        error = reply_to(
            queued.event,
            ReplyStatus.ERROR,
            attempt,
            reason=reason,
            error_code=exc.code if isinstance(exc, BitrixError) else None,
            retryable=not permanent,
        )
        try:
            await self._send(queued, error)
        except Exception as send_exc:
            log.error(
                f"[Bitrix] Could not send the error reply of job {job.id} "
                f"({describe_failure(send_exc)}); trying again in {self._reply_retry_ms}ms"
            )
            metrics.JOBS.labels(outcome="delayed").inc()
            return _Kept(queued, delay_ms=self._reply_retry_ms)
        metrics.JOBS.labels(outcome="error").inc()
        metrics.JOB_ATTEMPTS.observe(attempt)
        return error

    async def _keep(
        self, job: Any, token: str, payload: JobPayload, kept: list[_Kept], attempt: int
    ) -> None:
        """Leaves only the kept events in the job and sends it back to the queue: a failed
        attempt (BullMQ's backoff) when one of them is to be retried, else postponed by the
        shortest delay asked for. Always raises."""
        events = [item.queued for item in kept]
        if events != payload.events:
            await job.updateData(JobPayload(events=events).wire())
        errors = [item.error for item in kept if item.error is not None]
        if errors:
            log.info(f"[Bitrix] Will retry in {retry_delay_ms(job.opts.get('backoff'), attempt)}ms")
            raise errors[0]
        await job.moveToDelayed(
            int(time.time() * 1000) + min(item.delay_ms for item in kept), token
        )
        raise DelayedError()

    async def answer_abandoned(self, job: Any) -> None:
        """Error replies to the events of a job that stalled more often than
        `job_max_stalled_count` (its workers kept dying): BullMQ fails it without calling the
        handler, so nobody else would answer Core."""
        try:
            payload = JobPayload.model_validate(job.data)
        except ValidationError:
            log.error(f"[Bitrix] Could not answer abandoned job {job.id}: its data is not a job's")
            return
        answered: list[str] = []
        for queued in payload.events:
            reply = reply_to(
                queued.event,
                ReplyStatus.ERROR,
                int(job.attemptsMade) + 1,
                reason=f"abandoned: {job.deferredFailure}",
                retryable=True,
            )
            try:
                await self._send(queued, reply)
            except Exception as exc:
                log.error(
                    f"[Bitrix] Could not answer an event of abandoned job {job.id}: "
                    + describe_failure(exc)
                )
                continue
            metrics.JOBS.labels(outcome="error").inc()
            answered.append(queued.key)
        await self._unmark(answered)

    async def _unmark(self, keys: list[str]) -> None:
        """A mark left behind only makes the event, if it comes again while its job still
        exists, count as a duplicate: worth a log line, not a failure."""
        try:
            await self._marks.unmark([key for key in keys if key])
        except (RedisError, OSError) as exc:
            log.warning(f"[Bitrix] Could not unmark {len(keys)} answered events ({exc})")

    async def _send(self, queued: QueuedEvent, reply: ReplyData) -> None:
        await self._replies.send(
            queued.event.data.reply_queue, reply, correlation_id=queued.message_id
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
