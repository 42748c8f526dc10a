"""Bitrix24's two limits: the per-portal leaky bucket and the per-method operating time."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

Clock = Callable[[], float]

# (burst, drain per second) of each plan, from Bitrix24's documentation.
RATE_PLANS: dict[str, tuple[int, float]] = {"standard": (50, 2.0), "enterprise": (250, 5.0)}


class LeakyBucket:
    """Each request adds 1; the level drains continuously; a request that would overflow the
    capacity is refused and adds nothing."""

    def __init__(self, capacity: int, drain_per_s: float, clock: Clock = time.monotonic) -> None:
        self.capacity = capacity
        self.drain_per_s = drain_per_s
        self._clock = clock
        self._level = 0.0
        self._updated = clock()

    @property
    def level(self) -> float:
        self._drain()
        return self._level

    def try_acquire(self) -> bool:
        self._drain()
        if self._level + 1 > self.capacity:
            return False
        self._level += 1
        return True

    def reset(self) -> None:
        self._level = 0.0
        self._updated = self._clock()

    def _drain(self) -> None:
        now = self._clock()
        self._level = max(0.0, self._level - (now - self._updated) * self.drain_per_s)
        self._updated = now


class OperatingTime:
    """Summed execution time of each method over a sliding window (10 minutes on a portal).

    A method whose sum is above the budget is blocked until its oldest calls leave the window.
    Each call counts its measured time plus `cost_s`, a simulated execution time that lets a
    test reach the budget in a few calls. `budget_s=None` turns the limit off (the time is still
    reported in `time.operating`).

    Each method's sum is kept as calls enter and leave the window: a portal answering thousands
    of calls a minute would otherwise add up the whole window on every call.
    """

    def __init__(
        self, budget_s: float | None, window_s: float, cost_s: float, clock: Clock = time.time
    ) -> None:
        self.budget_s = budget_s
        self.window_s = window_s
        self.cost_s = cost_s
        self._clock = clock
        self._calls: dict[str, deque[tuple[float, float]]] = {}
        self._sums: dict[str, float] = {}

    def used(self, method: str) -> float:
        self._window(method)
        return max(0.0, self._sums.get(method, 0.0))

    def is_blocked(self, method: str) -> bool:
        return self.budget_s is not None and self.used(method) > self.budget_s

    def record(self, method: str, measured_s: float) -> None:
        seconds = measured_s + self.cost_s
        self._calls.setdefault(method, deque()).append((self._clock(), seconds))
        self._sums[method] = self._sums.get(method, 0.0) + seconds

    def reset_at(self, method: str) -> int:
        """Unix time (whole seconds, rounded up: waiting until then is always enough) when the
        oldest call of the window stops counting."""
        calls = self._window(method)
        oldest = calls[0][0] if calls else self._clock()
        return math.ceil(oldest + self.window_s)

    def reset(self) -> None:
        self._calls.clear()
        self._sums.clear()

    def _window(self, method: str) -> deque[tuple[float, float]]:
        calls = self._calls.get(method, deque())
        horizon = self._clock() - self.window_s
        while calls and calls[0][0] <= horizon:
            self._sums[method] -= calls.popleft()[1]
        if not calls:
            self._sums.pop(method, None)  # no rounding error outlives the window
        return calls
