"""Commands to Bitrix24, sent as `batch` requests as fast as the shared bucket allows.

Whoever needs a REST call submits a `Command` and awaits its outcome. One loop sends: whenever a
request may go out, a slot taken from the bucket, the commands waiting at that moment leave
together, up to `max_commands` of them. A request may go out when nothing is out (so a lone command
leaves at once, as a plain call), when it is full, or when every request out has taken longer than
`stall_s`; never more than `max_in_flight` at once. So under load requests leave as full as the
bucket and the portal's pace allow, and a request that hangs holds only its own commands: after
`stall_s` the others leave beside it. The bucket's burst is kept for full requests: once a tenth of
it is used, a request that is not full waits to fill for up to the time the bucket takes to free a
slot, so a backlog after a quiet spell leaves in full requests (a burst of 250 carries 12,500
commands, not the few that happen to be ready), while a lone change at light load still leaves at
once. Nor does a request that is not full leave sooner than `min_gap_s` (25 ms) after one that
carried several commands: with no limit to wait for, a portal that answers in a few milliseconds
would otherwise get a request of a few commands each time it answered. Commands that many callers
join (a look-up of many users) are built only when they leave and go first, so that everyone who
joined meanwhile rides along. A `Feeder` (the sync engine) plans its commands at that moment too,
once a request is sure to leave: whatever its users sent until then is merged.

A limit answer (QUERY_LIMIT_EXCEEDED, OPERATION_TIME_LIMIT), for the whole request or for one
command inside it, is never an outcome: the command waits for the limit to clear and goes
again, and the limit is passed on to every process sharing the bucket.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from redis.exceptions import RedisError

from b24sync.batching import LoadGap
from b24sync.bitrix import metrics
from b24sync.bitrix.batch import (
    MAX_BATCH_COMMANDS,
    Answer,
    Call,
    as_command_error,
    batch_params,
    command_outcomes,
)
from b24sync.bitrix.client import BitrixClient, BitrixError
from b24sync.logs import get_logger

log = get_logger(__name__)

# The outcome of a command: its answer, or its error (never a limit answer).
Outcome = Answer | BitrixError
# Pause before trying again when the shared bucket cannot be reached (Redis down).
_BUCKET_RETRY_S = 1.0
# A request out longer than this no longer holds back requests that are not full.
STALL_S = 0.5
# Below this share of the shared bucket free, a request that is not full waits to fill: the
# burst is kept for full requests, but for a few that leave at once.
FILL_BELOW_FREE_SHARE = 0.9
# The longest a request waits to fill, however slowly the bucket frees slots.
MAX_FILL_WAIT_S = 1.0
# Under load, a request that is not full leaves no sooner than this after the one before. A
# request costs both ends far more than a command in it: when the portal answers fast (no limit
# to wait for), requests paced only by its answers would carry a few commands each.
MIN_REQUEST_GAP_S = 0.025


class Command:
    """One REST call waiting to leave. `build` makes the parameters when it leaves (a command
    that callers join until then); `future` gets the outcome."""

    def __init__(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        build: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.method = method
        self._params = params or {}
        self._build = build
        self.departed = False
        self.limit_waits = 0
        self.not_before = 0.0
        self.future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

    def depart(self) -> Call:
        self.departed = True
        return self.method, self._build() if self._build is not None else self._params


class Feeder(Protocol):
    """Who plans commands just before a request leaves (the sync engine takes on waiting
    users then, so that their jobs arriving until then are merged)."""

    def backlog(self, limit: int) -> int:
        """How many commands it would plan now (about one per user), counted up to `limit`."""
        ...

    async def admit(self) -> None: ...


class Transport:
    def __init__(
        self,
        client: BitrixClient,
        *,
        max_commands: int = MAX_BATCH_COMMANDS,
        max_in_flight: int,
        stall_s: float = STALL_S,
        min_gap_s: float = MIN_REQUEST_GAP_S,
    ) -> None:
        self._client = client
        self._max_commands = max(1, min(max_commands, MAX_BATCH_COMMANDS))
        self._max_in_flight = max(1, max_in_flight)
        self._stall_s = stall_s
        self._feeder: Feeder | None = None
        self._first: deque[Command] = deque()
        self._rest: deque[Command] = deque()
        # Requests out, with when each left.
        self._in_flight: dict[asyncio.Task[None], float] = {}
        # Since when a request that is not full has been waiting to fill (see `_filling`).
        self._filling_since: float | None = None
        # Under load, a request that is not full leaves no sooner than `min_gap_s` after the
        # one before (see `_filling`).
        self._gap = LoadGap(min_gap_s)
        # When `_may_send` last looked at the clock, and what it counted ready then (0 with no
        # room for a request): the decision `_wake_later` arms its timer for.
        self._checked_at = 0.0
        self._ready = 0
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.Task[None] | None = None

    def start(self, feeder: Feeder | None = None) -> None:
        self._feeder = feeder
        self._loop = asyncio.create_task(self._run())

    def wake(self) -> None:
        """The feeder may have work for a request."""
        self._wake.set()

    async def stop(self) -> None:
        """Stops sending; requests still out are cancelled and their commands with them."""
        tasks = [task for task in (self._loop, *self._in_flight) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for command in (*self._first, *self._rest):
            command.future.cancel()
        self._first.clear()
        self._rest.clear()
        self._loop = None

    def submit(self, command: Command, *, first: bool = False) -> asyncio.Future[Outcome]:
        """Queues the command; `first` puts it before the others (commands that many callers
        join, so that they leave soon and full)."""
        (self._first if first else self._rest).append(command)
        self._wake.set()
        return command.future

    async def call(self, method: str, params: dict[str, Any]) -> Answer:
        """Sends one command and returns its answer; raises its error."""
        outcome = await self.submit(Command(method, params))
        if isinstance(outcome, BitrixError):
            raise outcome
        return outcome

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            while self._may_send():
                if not await self._take_slot():
                    continue
                if self._feeder is not None:
                    await self._feeder.admit()
                commands = self._take()
                if not commands:  # what was due went away meanwhile; the slot is spent
                    break
                self._filling_since = None
                left = time.monotonic()
                self._gap.left(len(commands), left)
                task = asyncio.create_task(self._send(commands))
                self._in_flight[task] = left
                task.add_done_callback(self._request_done)
            self._wake_later()
            await self._wake.wait()

    def _request_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        self._wake.set()

    def _may_send(self) -> bool:
        self._checked_at = time.monotonic()
        self._ready = 0
        if len(self._in_flight) >= self._max_in_flight:
            return False
        self._ready = ready = self._ready_count()
        if ready == 0:
            return False
        full = ready >= self._max_commands
        if self._in_flight:
            return full or self._all_stalled()
        return not self._filling(full)

    def _ready_count(self) -> int:
        """The commands due and those the feeder would plan now, counted up to a full
        request."""
        due = self._due_count()
        if self._feeder is None or due >= self._max_commands:
            return due
        return due + self._feeder.backlog(self._max_commands - due)

    def _filling(self, full: bool) -> bool:
        """Whether a request should wait to fill: it is not full, and either the last request
        carried several commands (there is a flow to wait for: a look-up and the write that
        follows it at light load carry one each) and left less than `min_gap_s` ago, or less
        of the bucket is free than `FILL_BELOW_FREE_SHARE` and it has not waited as long as the
        bucket takes to free a slot (`_fill_wait_s`)."""
        if full:
            self._filling_since = None
            return False
        now = time.monotonic()
        if now < self._gap.due:
            return True
        if self._client.bucket_free_share() >= FILL_BELOW_FREE_SHARE:
            self._filling_since = None
            return False
        if self._filling_since is None:
            self._filling_since = now
        return now - self._filling_since < self._fill_wait_s()

    def _fill_wait_s(self) -> float:
        return min(self._client.slot_interval_s, MAX_FILL_WAIT_S)

    def _all_stalled(self) -> bool:
        return time.monotonic() - max(self._in_flight.values()) >= self._stall_s

    async def _take_slot(self) -> bool:
        """Waits for a slot of the shared bucket; False when none could be had (the caller
        checks again what is due)."""
        try:
            await self._client.take_request_slot("batch")
            return True
        except BitrixError as blocked:  # `batch` itself blocked, as another worker was told
            await asyncio.sleep(blocked.retry_after_s or _BUCKET_RETRY_S)
        except (RedisError, OSError) as exc:
            log.warning(f"[Bitrix] The request bucket is unreachable ({exc}); waiting")
            await asyncio.sleep(_BUCKET_RETRY_S)
        return False

    def _due_count(self) -> int:
        """Commands that may leave now, counted up to a full request."""
        now = time.monotonic()
        due = 0
        for queue in (self._first, self._rest):
            for command in queue:
                if command.not_before <= now:
                    due += 1
                    if due >= self._max_commands:
                        return due
        return due

    def _take(self) -> list[Command]:
        now = time.monotonic()
        taken: list[Command] = []
        for queue in (self._first, self._rest):
            kept: deque[Command] = deque()
            while queue and len(taken) < self._max_commands:
                command = queue.popleft()
                (taken if command.not_before <= now else kept).append(command)
            queue.extendleft(reversed(kept))
        return taken

    def _wake_later(self) -> None:
        """Wakes the loop when commands held back may leave: when the first command waiting
        out a limit is due, when the requests out stall, when the gap after the last request
        ends, or when a request has waited long enough to fill. It arms the timer for the
        decision `_may_send` just made (what it counted ready, when it looked): a moment is
        missed only if `_may_send` saw it pass, one that passed since wakes the loop at once."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self._checked_at
        moments = [command.not_before for command in (*self._first, *self._rest)]
        if self._ready and self._in_flight:
            moments.append(max(self._in_flight.values()) + self._stall_s)
        elif self._ready:
            moments.append(self._gap.due)
        if self._filling_since is not None:
            moments.append(self._filling_since + self._fill_wait_s())
        later = [moment for moment in moments if moment > now]
        if later:
            delay_s = max(0.0, min(later) - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay_s, self._wake.set)

    async def _send(self, commands: list[Command]) -> None:
        try:
            calls = [command.depart() for command in commands]
            outcomes = await self._request(calls)
            limits: dict[tuple[str, str], float] = {}
            for command, outcome in zip(commands, outcomes, strict=True):
                if isinstance(outcome, BitrixError) and outcome.rate_limited:
                    await self._wait_out(command, outcome, limits)
                    continue
                if not isinstance(outcome, BitrixError):
                    self._client.note_timing(command.method, outcome.get("time"))
                if not command.future.done():
                    command.future.set_result(outcome)
        except asyncio.CancelledError:
            for command in commands:
                command.future.cancel()
            raise
        except Exception as exc:  # a bug, or Redis failing under the limiter: fail, never hang
            log.exception(f"[Bitrix] A request to Bitrix24 failed unexpectedly: {exc!r}")
            for command in commands:
                if not command.future.done():
                    command.future.set_result(
                        BitrixError(
                            command.method,
                            "INTERNAL_ERROR",
                            f"{type(exc).__name__} while sending",
                            http_status=None,
                            transient=True,
                        )
                    )

    async def _request(self, calls: list[Call]) -> list[Outcome]:
        """One HTTP request for the calls: a plain call for one, a `batch` for more."""
        if len(calls) == 1:
            method, params = calls[0]
            try:
                return [await self._client.send(method, params)]
            except BitrixError as err:
                return [err]
        try:
            answer = await self._client.send("batch", batch_params(calls))
        except BitrixError as err:
            return [as_command_error(err, method) for method, _ in calls]
        outcomes = command_outcomes(answer["result"], calls)
        for (method, _), outcome in zip(calls, outcomes, strict=True):
            code = "OK" if not isinstance(outcome, BitrixError) else outcome.code or "EMPTY"
            metrics.API_CALLS.labels(method=method, code=code).inc()
        return outcomes

    async def _wait_out(
        self, command: Command, limit: BitrixError, heeded: dict[tuple[str, str], float]
    ) -> None:
        """Queues the command again once the limit clears; a limit is passed on to the shared
        bucket once per request."""
        key = (limit.code, limit.method)
        if key not in heeded:
            heeded[key] = await self._client.heed_limit(limit, command.limit_waits, heard=True)
            log.warning(
                f"[Bitrix] {limit.method} hit the Bitrix24 limit ({limit.code}); "
                f"sending it again in {heeded[key]:.1f}s"
            )
        command.limit_waits += 1
        command.not_before = time.monotonic() + heeded[key]
        self.submit(command, first=True)
