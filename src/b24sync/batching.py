"""Grouping concurrent calls into one: many small writes cost far more than one larger write
(a round trip, a commit, a wake-up each), while a group of one costs no more than the call
itself.

A :class:`Coalescer` runs a group as soon as fewer than ``max_in_flight`` groups are running,
so at low load every item goes out alone, at once, and under load the items that arrive while
the running groups are out wait and leave together in the next one. No timer is involved: an
item never waits for company, only for a free slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


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
    ) -> None:
        self._flush = flush
        self._max_in_flight = max(1, max_in_flight)
        self._max_items = max(1, max_items)
        self._retry_alone = retry_alone
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if len(self._running) < self._max_in_flight:
            self._start_group()
        # A caller that gives up only stops waiting: its item may still be written.
        return await future

    def _start_group(self) -> None:
        group = self._waiting[: self._max_items]
        del self._waiting[: self._max_items]
        task = asyncio.create_task(self._run(group))
        self._running.add(task)
        task.add_done_callback(self._group_done)

    def _group_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if self._waiting and len(self._running) < self._max_in_flight:
            self._start_group()

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
