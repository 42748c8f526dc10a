"""The coalescer: items go out alone at low load and together under load, each caller gets
its own result, and one bad item fails only its own caller."""

from __future__ import annotations

import asyncio
import math

import pytest

from b24sync.batching import Coalescer, LoadGap


class BadItemError(Exception):
    pass


class Recorder:
    """A flush that records its groups and can be held open to let items pile up."""

    def __init__(self, *, held: bool = False) -> None:
        self.groups: list[list[int]] = []
        self.gate = asyncio.Event()
        if not held:
            self.gate.set()

    async def flush(self, items: list[int]) -> list[int]:
        self.groups.append(list(items))
        await self.gate.wait()
        if len(items) > 1 and 13 in items:
            raise BadItemError("13 in the group")
        if items == [13]:
            raise BadItemError("13")
        return [item * 10 for item in items]


async def submitted(coalescer: Coalescer[int, int], items: list[int]) -> list[asyncio.Task[int]]:
    """Submits each item from a task of its own, then lets every task run until it waits on
    something (the gate, a result)."""
    calls = [asyncio.create_task(coalescer.submit(item)) for item in items]
    for _ in range(5):
        await asyncio.sleep(0)
    return calls


async def test_an_item_at_low_load_goes_out_alone_at_once() -> None:
    recorder = Recorder()
    coalescer = Coalescer(recorder.flush, max_in_flight=2, max_items=10)
    assert await coalescer.submit(1) == 10
    assert await coalescer.submit(2) == 20
    assert recorder.groups == [[1], [2]]


async def test_items_arriving_while_groups_run_leave_together() -> None:
    recorder = Recorder(held=True)
    coalescer = Coalescer(recorder.flush, max_in_flight=1, max_items=3)
    calls = await submitted(coalescer, list(range(1, 8)))
    assert recorder.groups == [[1]]  # the rest wait for the running group, not for a timer
    recorder.gate.set()
    assert await asyncio.gather(*calls) == [10, 20, 30, 40, 50, 60, 70]
    assert recorder.groups == [[1], [2, 3, 4], [5, 6, 7]]


async def test_groups_run_side_by_side_up_to_the_limit() -> None:
    recorder = Recorder(held=True)
    coalescer = Coalescer(recorder.flush, max_in_flight=2, max_items=10)
    calls = await submitted(coalescer, list(range(1, 6)))
    assert recorder.groups == [[1], [2]]
    recorder.gate.set()
    assert await asyncio.gather(*calls) == [10, 20, 30, 40, 50]
    assert recorder.groups == [[1], [2], [3, 4, 5]]


async def test_a_bad_item_fails_only_its_own_caller() -> None:
    recorder = Recorder(held=True)
    coalescer = Coalescer(
        recorder.flush,
        max_in_flight=1,
        max_items=10,
        retry_alone=lambda exc: isinstance(exc, BadItemError),
    )
    calls = await submitted(coalescer, [1, 12, 13, 14])
    recorder.gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[:2] == [10, 120]
    assert isinstance(results[2], BadItemError)
    assert results[3] == 140
    assert recorder.groups == [[1], [12, 13, 14], [12], [13], [14]]


async def test_an_error_not_worth_retrying_fails_the_whole_group() -> None:
    recorder = Recorder(held=True)
    coalescer = Coalescer(recorder.flush, max_in_flight=1, max_items=10)
    calls = await submitted(coalescer, [1, 12, 13])
    recorder.gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[0] == 10
    assert all(isinstance(result, BadItemError) for result in results[1:])
    assert recorder.groups == [[1], [12, 13]]


async def test_a_caller_that_gives_up_leaves_the_others_their_results() -> None:
    recorder = Recorder(held=True)
    coalescer = Coalescer(recorder.flush, max_in_flight=1, max_items=10)
    calls = await submitted(coalescer, [1, 2, 3])
    calls[1].cancel()
    recorder.gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[0] == 10
    assert isinstance(results[1], asyncio.CancelledError)
    assert results[2] == 30
    assert recorder.groups == [[1], [2, 3]]  # a cancelled caller's item is still written


async def test_a_flush_with_the_wrong_number_of_results_fails_its_callers() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    coalescer = Coalescer(short, max_in_flight=1, max_items=10)
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        await coalescer.submit(1)


async def test_with_a_gap_a_group_after_a_full_one_waits_unless_it_fills() -> None:
    recorder = Recorder(held=True)
    coalescer = Coalescer(recorder.flush, max_in_flight=1, max_items=3, gap_s=0.3)
    calls = await submitted(coalescer, [1, 2, 3])
    assert recorder.groups == [[1]]  # alone after a quiet spell: at once
    recorder.gate.set()
    assert await asyncio.gather(*calls) == [10, 20, 30]
    assert recorder.groups == [[1], [2, 3]]  # the pair left at once: the group before was one

    # After the pair, a lone item waits out the gap and takes in what comes meanwhile...
    calls = await submitted(coalescer, [4])
    await asyncio.sleep(0.1)
    calls += await submitted(coalescer, [5])
    assert recorder.groups == [[1], [2, 3]]
    assert await asyncio.gather(*calls) == [40, 50]
    assert recorder.groups[-1] == [4, 5]

    # ... while a full group leaves at once.
    started = asyncio.get_running_loop().time()
    assert await asyncio.gather(*await submitted(coalescer, [6, 7, 8])) == [60, 70, 80]
    assert recorder.groups[-1] == [6, 7, 8]
    assert asyncio.get_running_loop().time() - started < 0.2


def test_a_gap_per_item_grows_with_the_group_before_up_to_the_whole_gap() -> None:
    gap = LoadGap(0.05, per_item_s=0.002)
    gap.left(1, at=10.0)
    assert gap.due == -math.inf  # a lone item: no load, the next leaves at once
    gap.left(5, at=10.0)
    assert gap.due == pytest.approx(10.01)
    gap.left(100, at=10.0)
    assert gap.due == pytest.approx(10.05)


def test_a_gap_says_what_the_last_group_set_and_how_long_is_left_of_it() -> None:
    gap = LoadGap(0.05, per_item_s=0.002)
    gap.left(1, at=10.0)
    assert (gap.last_gap_s, gap.wait_s(10.0)) == (0.0, 0.0)
    gap.left(5, at=10.0)
    assert gap.last_gap_s == pytest.approx(0.01)
    assert gap.wait_s(10.004) == pytest.approx(0.006)
    assert gap.wait_s(10.02) == 0.0
