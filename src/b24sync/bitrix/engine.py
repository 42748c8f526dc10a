"""The sync engine: the jobs of a process become writes to their users' leads.

Each job hands its event to `SyncEngine.sync` and gets the outcome back. Inside:

- Jobs wait per user. Users are taken on when a request is about to leave (`admit`, called by
  the transport), so a user's jobs that arrived until then are merged: the newest
  version is written (events without a version are ordered by when they were queued), the
  fields changed by the older ones are written with it, jobs of the same version share its
  outcome, and older ones are answered at once as superseded.
- A user is written only under its lease in Redis, taken for many users in one script call
  that also tells each user's applied version and lead id. A job of a user another process
  holds goes back to the queue for a while (`Busy`), holding no worker meanwhile. The lease is
  renewed while the write is in flight, released (and what was learnt recorded) for many users
  in one call, and kept without a round trip when more jobs of the user are waiting.
- An event older than the applied version writes nothing (`Skipped` with `applied_version`),
  unless Core forces it; a forced event's version is recorded even when lower.
- The write carries only the changed fields. A user whose lead id is not known, or whose
  phone changes (the lead's phone entries are replaced by their ids), is looked up first; the
  look-ups of many users share one command. An update answered "Not found" looks the lead up
  again and creates it if it is gone. After a timeout or a lost answer nothing is assumed: the
  job fails for now and its retry looks the lead up again, so there is never a second lead.

The commands go through `transport.Transport`, which packs them into `batch` requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from b24sync.bitrix.client import BitrixError
from b24sync.bitrix.leads import Lead, LeadCreator, LeadFields, LeadFinder, carried_fields
from b24sync.bitrix.state import Finish, UserLeases, UserState
from b24sync.bitrix.transport import Transport
from b24sync.contracts.messages import Action, Event, UserField, UserPayload
from b24sync.logs import get_logger

log = get_logger(__name__)

# Users leased by one script call.
_LEASE_BATCH = 50
# Pause before trying Redis again when a lease script failed.
_REDIS_RETRY_S = 1.0


@dataclass(frozen=True)
class Work:
    """A job's event, as handed to the engine."""

    event: Event
    job_id: str
    attempt: int
    # When the job was queued (ms): orders the events of a user that carry no version.
    queued_at: int


@dataclass(frozen=True)
class Written:
    lead_id: int


@dataclass(frozen=True)
class Skipped:
    """Nothing written for this job: a newer one of the user was, or the event is older than
    the version already applied (`applied_version`)."""

    reason: str
    lead_id: int | None
    applied_version: int | None = None


@dataclass(frozen=True)
class Failed:
    """The write failed. `fields` are the fields it carried, for the job's retry to carry too
    (more than the job's own when older jobs were merged into it)."""

    error: Exception
    fields: frozenset[UserField]


@dataclass(frozen=True)
class Busy:
    """The user is being written by another process (or this one is stopping): the job goes
    back to the queue for `retry_in_ms`."""

    retry_in_ms: int


Outcome = Written | Skipped | Failed | Busy


def _report_crash(task: asyncio.Task[None]) -> None:
    """An engine loop that ends other than by cancellation is a bug that stops every write:
    say so loudly."""
    if not task.cancelled() and task.exception() is not None:
        log.error("[Bitrix] The sync engine stopped", exc_info=task.exception())


def fields_of(event: Event) -> frozenset[UserField]:
    """The fields an event asks to write: its `changed` ones; for producers that do not say,
    every field a create or update carries, and the stage of a move."""
    if event.data.changed is not None:
        return frozenset(event.data.changed)
    if event.data.action is Action.MOVE_CARD:
        return frozenset({UserField.STAGE})
    return carried_fields(event.data.user)


@dataclass
class _Job:
    work: Work
    seq: int
    outcome: asyncio.Future[Outcome] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def version(self) -> int | None:
        return self.work.event.data.user.version

    def order(self) -> tuple[int, int, int]:
        return (self.version or 0, self.work.queued_at, self.seq)

    def settle(self, outcome: Outcome) -> None:
        if not self.outcome.done():
            self.outcome.set_result(outcome)


@dataclass
class _Finishing:
    item: Finish
    # Whether the lease may stay with this process while more jobs of the user wait.
    may_keep: bool
    done: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class SyncEngine:
    def __init__(
        self,
        *,
        leases: UserLeases,
        transport: Transport,
        fields: LeadFields,
        max_users: int,
        busy_delay_ms: int,
    ) -> None:
        self._leases = leases
        self._fields = fields
        self._finder = LeadFinder(transport, fields)
        self._creator = LeadCreator(transport, fields)
        self._transport = transport
        self._max_users = max(1, max_users)
        self._busy_delay_ms = busy_delay_ms
        self._seq = itertools.count()
        # Jobs not yet in a write, per user, users in the order their first job came.
        self._waiting: dict[int, list[_Job]] = {}
        # Users taken on by this process (being leased, or with a write in flight or about to
        # start), and those of them whose lease is ours.
        self._active: set[int] = set()
        self._leased: set[int] = set()
        self._finishing: list[_Finishing] = []
        self._flush = asyncio.Event()
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._record()),
            asyncio.create_task(self._renew()),
        ]
        for loop in self._loops:
            loop.add_done_callback(_report_crash)

    def close(self) -> None:
        """Takes no more users: jobs still waiting go back to the queue at once, for another
        process; writes in flight finish."""
        self._closing = True
        for user_id in [user_id for user_id in self._waiting if user_id not in self._active]:
            self._postpone(user_id, 0)

    async def stop(self) -> None:
        self.close()
        tasks = [*self._loops, *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loops = []

    async def sync(self, work: Work) -> Outcome:
        if self._closing:
            return Busy(0)
        job = _Job(work, next(self._seq))
        self._waiting.setdefault(work.event.data.user.id, []).append(job)
        self._transport.wake()
        return await job.outcome

    # --- whose turn ---------------------------------------------------------------------

    def backlog(self, limit: int) -> int:
        """How many waiting users the engine could take on now, counted up to `limit`."""
        limit = min(limit, self._max_users - len(self._active))
        if self._closing or limit <= 0:
            return 0
        waiting = (user_id for user_id in self._waiting if user_id not in self._active)
        return sum(1 for _ in itertools.islice(waiting, limit))

    async def admit(self) -> None:
        """Takes on waiting users, as many as there is room for, when a request is about to
        leave (so jobs arriving until then are merged): leases them in one script call and
        starts their writes, whose first commands are queued when this returns."""
        user_ids = self._next_users()
        if not user_ids:
            return
        try:
            states = await self._leases.take(user_ids)
        except (RedisError, OSError) as exc:
            log.warning(f"[Bitrix] Could not lease users ({exc}); trying again")
            self._active.difference_update(user_ids)
            await asyncio.sleep(_REDIS_RETRY_S)
            return
        for user_id in user_ids:
            state = states[user_id]
            if state is None:
                self._active.discard(user_id)
                self._postpone(user_id, self._busy_delay_ms)
            else:
                self._leased.add(user_id)
                self._spawn(self._serve(user_id, state))
        await asyncio.sleep(0)  # each write runs up to its first command

    def _next_users(self) -> list[int]:
        """Users with waiting jobs and no write in flight here, oldest first, as many as the
        engine takes on; they are marked active."""
        room = min(_LEASE_BATCH, self._max_users - len(self._active))
        if self._closing or room <= 0:
            return []
        chosen = list(
            itertools.islice(
                (user_id for user_id in self._waiting if user_id not in self._active), room
            )
        )
        self._active.update(chosen)
        return chosen

    def _postpone(self, user_id: int, retry_in_ms: int) -> None:
        for job in self._waiting.pop(user_id, []):
            job.settle(Busy(retry_in_ms))

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, user_id: int, state: UserState) -> None:
        """Writes the user's waiting jobs, round after round while more keep coming; then
        lets the lease go."""
        try:
            jobs = self._waiting.pop(user_id, [])
            while jobs:
                try:
                    state, kept = await self._round(user_id, jobs, state)
                except Exception as exc:  # a bug: answer the jobs rather than leave them hanging
                    log.exception(f"[Bitrix] Writing user {user_id} failed unexpectedly")
                    for job in jobs:
                        job.settle(Failed(exc, fields_of(job.work.event)))
                    kept = True
                if not kept:
                    return
                jobs = self._waiting.pop(user_id, [])
            await self._finish(Finish(user_id), may_keep=False)
        finally:
            self._leased.discard(user_id)
            self._active.discard(user_id)
            if self._waiting:  # room for another user, or this one's late jobs
                self._transport.wake()

    # --- one write ------------------------------------------------------------------------

    async def _round(
        self, user_id: int, jobs: list[_Job], state: UserState
    ) -> tuple[UserState, bool]:
        """Writes the newest of the jobs; returns the user's state after it and whether the
        lease was kept for more waiting jobs."""
        jobs.sort(key=_Job.order)
        newest = jobs[-1]
        event = newest.work.event
        user = event.data.user
        version = user.version
        forced = any(job.work.event.data.force for job in jobs)
        known_lead_id = state.lead_id or user.bitrix_lead_id
        if (
            version is not None
            and state.version is not None
            and version < state.version
            and not forced
        ):
            log.info(
                f"[Bitrix] Skipping {event.data.action.value} of user {user_id}: version "
                f"{version} is older than the applied version {state.version}"
            )
            skipped = Skipped(
                f"version {version} is older than the applied version {state.version}; "
                "nothing changed",
                state.lead_id,
                applied_version=state.version,
            )
            for job in jobs:
                job.settle(skipped)
            return state, await self._finish(Finish(user_id))

        sharing = [job for job in jobs if job is newest or (version and job.version == version)]
        superseded = Skipped(
            f"superseded by version {version}"
            if version is not None
            else "superseded by a newer event of the same user",
            known_lead_id,
        )
        for job in jobs:
            if job not in sharing:
                log.info(f"[Bitrix] Job {job.work.job_id}: {superseded.reason}")
                job.settle(superseded)
        fields = frozenset().union(*(fields_of(job.work.event) for job in jobs))
        log.info(
            f"[Bitrix] Calling Bitrix24 API with action: {event.data.action.value} "
            f"(attempt {newest.work.attempt})"
        )
        try:
            lead_id = await self._write(event.data.action, user, fields, known_lead_id)
        except Exception as exc:
            kept = await self._finish(Finish(user_id))
            for job in sharing:
                job.settle(Failed(exc, fields))
            return state, kept
        kept = await self._finish(Finish(user_id, lead_id, version, forced=forced))
        for job in sharing:
            job.settle(Written(lead_id))
        applied = state.version
        if version is not None and (forced or applied is None or version > applied):
            applied = version
        return UserState(lead_id, applied), kept

    async def _write(
        self,
        action: Action,
        user: UserPayload,
        fields: frozenset[UserField],
        known_lead_id: int | None,
    ) -> int:
        """The user's lead id after the write."""
        if known_lead_id is not None and UserField.PHONE not in fields:
            try:
                await self._update(action, known_lead_id, user, fields, None)
                return known_lead_id
            except BitrixError as err:
                if not err.not_found:
                    raise
                log.warning(f"[Bitrix] Lead {known_lead_id} is gone from Bitrix24; looking again")
        for _ in range(2):
            leads = await self._finder.find(user.id)
            if not leads:
                return await self._creator.create(user)
            lead = leads[0]
            if len(leads) > 1:
                log.warning(
                    f"[Bitrix] {len(leads)} leads carry user {user.id}; writing the oldest, "
                    f"{lead.id}"
                )
            try:
                await self._update(action, lead.id, user, fields, lead)
                return lead.id
            except BitrixError as err:
                if not err.not_found:
                    raise
                log.warning(f"[Bitrix] Lead {lead.id} vanished while being written; looking again")
        raise BitrixError(
            "crm.lead.update",
            "",
            "Not found: the lead kept vanishing while it was written",
            http_status=None,
            transient=True,
        )

    async def _update(
        self,
        action: Action,
        lead_id: int,
        user: UserPayload,
        fields: frozenset[UserField],
        lead: Lead | None,
    ) -> None:
        update = self._fields.update_fields(user, fields, lead)
        if not update:
            return
        await self._transport.call("crm.lead.update", {"id": lead_id, "fields": update})
        log.info(f"[Bitrix] Updated lead {lead_id} in Bitrix24 ({action.value})")

    # --- leases ---------------------------------------------------------------------------

    async def _finish(self, item: Finish, *, may_keep: bool = True) -> bool:
        """Records what a write learnt and releases the user's lease, together with other
        users' in one script call; the lease is kept (True) while more of its jobs wait."""
        finishing = _Finishing(item, may_keep)
        self._finishing.append(finishing)
        self._flush.set()
        return await finishing.done

    async def _record(self) -> None:
        while True:
            await self._flush.wait()
            self._flush.clear()
            batch, self._finishing = self._finishing, []
            items = [
                dataclasses.replace(
                    finishing.item,
                    release=not (
                        finishing.may_keep
                        and finishing.item.user_id in self._waiting
                        and not self._closing
                    ),
                )
                for finishing in batch
            ]
            delay_s = _REDIS_RETRY_S
            while True:
                try:
                    await self._leases.finish(items)
                    break
                except (RedisError, OSError) as exc:
                    log.warning(f"[Bitrix] Could not record {len(items)} users ({exc}); retrying")
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, 10.0)
            for finishing, item in zip(batch, items, strict=True):
                if item.release:
                    self._leased.discard(item.user_id)
                finishing.done.set_result(not item.release)

    async def _renew(self) -> None:
        """Keeps the leases of users being written alive, in one call for all of them."""
        while True:
            await asyncio.sleep(self._leases.ttl_ms / 3000)
            if not self._leased:
                continue
            try:
                lost = await self._leases.renew(list(self._leased))
            except (RedisError, OSError) as exc:
                log.warning(f"[Bitrix] Could not renew user leases ({exc})")
                continue
            if lost:
                log.warning(f"[Bitrix] {lost} user leases ran out during a write")
