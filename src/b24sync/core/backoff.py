"""Retry pacing and log throttling for Core's background loops."""

from __future__ import annotations


class Backoff:
    """Exponential delay between attempts; tells when a failure is worth a log line.

    Logging the 1st, 2nd, 4th, 8th... consecutive failure keeps an outage of hours to a few
    dozen lines instead of one per attempt.
    """

    def __init__(self, initial_s: float = 0.2, max_s: float = 10.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.failures = 0

    def failed(self) -> float:
        """Records a failure and returns how long to wait before the next attempt."""
        self.failures += 1
        return float(min(self.max_s, self.initial_s * 2 ** min(self.failures - 1, 16)))

    @property
    def should_log(self) -> bool:
        return self.failures & (self.failures - 1) == 0

    def reset(self) -> bool:
        """Records a success; returns True when it ends a run of failures."""
        recovered = self.failures > 0
        self.failures = 0
        return recovered
