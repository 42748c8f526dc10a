"""Grouping concurrent calls into one: many small writes cost far more than one larger write
(a round trip, a commit, a wake-up each), while a group of one costs no more than the call
itself.

A :class:`Coalescer` runs a group as soon as fewer than ``max_in_flight`` groups are running,
so at low load every item goes out alone, at once, and under load the items that arrive while
the running groups are out wait and leave together in the next one. By default no timer is
involved: an item never waits for company, only for a free slot. With ``gap_s``, a group that
follows one of several items (load) and is not full waits until ``gap_s`` after that one
started, to leave fuller; a lone item after a quiet spell still leaves at once.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class LoadGap:
    """The pace of groups under load: once a group of several items has left, the next one
    that is not full leaves no sooner than `gap_s` after it; after a lone item (no load), at
    once. With `per_item_s`, the gap is that much per item of the group before, at most
    `gap_s`: groups grow while items come faster than one per `per_item_s`, and shrink towards
    one, which leaves at once, while they come slower. Shared by the coalescer, the Bitrix
    transport's requests and the outbox relay's batches."""

    def __init__(self, gap_s: float, per_item_s: float | None = None) -> None:
        self._gap_s = gap_s
        self._per_item_s = per_item_s
        self._due = -math.inf
        self._last_gap_s = 0.0

    def left(self, size: int, at: float) -> None:
        """A group of `size` items left at `at`."""
        gap_s = (
            self._gap_s if self._per_item_s is None else min(self._gap_s, size * self._per_item_s)
        )
        self._last_gap_s = gap_s if size > 1 and gap_s > 0 else 0.0
        self._due = at + self._last_gap_s if self._last_gap_s else -math.inf

    @property
    def due(self) -> float:
        """When a group that is not full may leave (-inf: at once)."""
        return self._due

    @property
    def last_gap_s(self) -> float:
        """The gap the last group set: how long after it left the next waits (0: none)."""
        return self._last_gap_s

    def wait_s(self, now: float) -> float:
        """How long from `now` a group that is not full still waits (0: none)."""
        return max(0.0, self._due - now)


class Coalescer(Generic[T, R]):
    """Submits items through ``flush``, which takes a group and returns one result per item,
    in the same order.

    When a group of several fails with an error for which ``retry_alone`` is true (an error
    that one item could cause, rather than the database being gone), each item is sent again
    alone, so that one bad item fails only its own caller.
    """

    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[list[R]]],
        *,
        max_in_flight: int,
        max_items: int,
        retry_alone: Callable[[BaseException], bool] = lambda _: False,
        gap_s: float = 0.0,
    ) -> None:
        self._flush = flush
        self._max_in_flight = max(1, max_in_flight)
        self._max_items = max(1, max_items)
        self._retry_alone = retry_alone
        self._gap = LoadGap(gap_s)
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._running: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._start_ready()
        # A caller that gives up only stops waiting: its item may still be written.
        return await future

    def _start_ready(self) -> None:
        """Starts the next group if a slot is free and it need not wait out the gap; else,
        with a slot free, arms the timer for the gap's end."""
        if not self._waiting or len(self._running) >= self._max_in_flight:
            return
        due = self._gap.due
        loop = asyncio.get_running_loop()
        if len(self._waiting) >= self._max_items or due == -math.inf or loop.time() >= due:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._start_group()
        elif self._timer is None:
            self._timer = loop.call_at(due, self._gap_over)

    def _gap_over(self) -> None:
        self._timer = None
        self._start_ready()

    def _start_group(self) -> None:
        group = self._waiting[: self._max_items]
        del self._waiting[: self._max_items]
        self._gap.left(len(group), asyncio.get_running_loop().time())
        task = asyncio.create_task(self._run(group))
        self._running.add(task)
        task.add_done_callback(self._group_done)

    def _group_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._start_ready()

    async def _run(self, group: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._flush([item for item, _ in group])
            if len(results) != len(group):
                raise RuntimeError(f"{len(results)} results for {len(group)} items")
        except asyncio.CancelledError:
            for _, future in group:  # the service is stopping: nobody waits for ever
                future.cancel()
            raise
        except Exception as exc:
            if len(group) > 1 and self._retry_alone(exc):
                await asyncio.gather(*(self._run([entry]) for entry in group))
                return
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(group, results, strict=True):
            if not future.done():
                future.set_result(result)
