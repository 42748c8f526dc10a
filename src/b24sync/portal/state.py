"""One emulated portal: its leads, limits, faults and request statistics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections import Counter, deque
from datetime import UTC, datetime
from typing import Any

from b24sync.portal.errors import PortalError
from b24sync.portal.faults import FaultConfig, Faults
from b24sync.portal.limits import RATE_PLANS, LeakyBucket, OperatingTime
from b24sync.portal.store import LeadStore
from b24sync.settings import Settings

RECENT_CALLS = 500


class Stats:
    """Requests counted by method and outcome ("ok", an error code, or the text of a CRM error
    without a code such as "Not found"), plus the latest calls in order."""

    def __init__(self) -> None:
        self.total = 0
        self.by_method: dict[str, Counter[str]] = {}
        self.calls: deque[dict[str, Any]] = deque(maxlen=RECENT_CALLS)

    def count_request(self) -> None:
        self.total += 1

    def record(self, method: str, outcome: str, params: dict[str, Any] | None = None) -> None:
        self.by_method.setdefault(method, Counter())[outcome] += 1
        self.calls.append({"method": method, "outcome": outcome, "params": params or {}})

    def snapshot(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_method": {method: dict(outcomes) for method, outcomes in self.by_method.items()},
        }

    def reset(self) -> None:
        self.total = 0
        self.by_method.clear()
        self.calls.clear()


def _bucket(settings: Settings) -> LeakyBucket | None:
    if settings.portal_rate_limit == "off":
        return None
    burst, per_s = RATE_PLANS[settings.portal_rate_limit]
    return LeakyBucket(settings.portal_rate_burst or burst, settings.portal_rate_per_s or per_s)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


class Portal:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.user_id, _, self._code = (
            settings.portal_webhook.get_secret_value().strip("/").partition("/")
        )
        self.store = LeadStore(settings.portal_state_file, self.user_id)
        self.bucket = _bucket(settings)
        self.operating = OperatingTime(
            settings.portal_operating_limit_s,
            settings.portal_operating_window_s,
            settings.portal_operating_cost_s,
        )
        self.faults = Faults(FaultConfig.from_settings(settings))
        self.stats = Stats()
        self._stopping = asyncio.Event()

    async def open(self) -> None:
        self._stopping.clear()
        await self.store.open()

    async def close(self) -> None:
        await self.store.close()

    def stop_waiting(self) -> None:
        """Cuts every injected delay short, so that a shutdown does not wait for them."""
        self._stopping.set()

    async def pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    def check_auth(self, user_id: str, code: str) -> None:
        if user_id != self.user_id:
            raise PortalError(401, "NO_AUTH_FOUND", "Wrong authorization data")
        if not hmac.compare_digest(code.encode(), self._code.encode()):
            raise PortalError(401, "INVALID_CREDENTIALS", "Invalid request credentials")

    async def reset(self) -> None:
        """Back to the state at start: no leads, no stats, the configured faults, empty limits."""
        await self.store.clear()
        self.stats.reset()
        self.faults = Faults(FaultConfig.from_settings(self.settings))
        if self.bucket is not None:
            self.bucket.reset()
        self.operating.reset()

    def time_info(self, method: str, started: float, processing_s: float) -> dict[str, Any]:
        """The `time` object of an answer."""
        finished = time.time()
        return {
            "start": started,
            "finish": finished,
            "duration": finished - started,
            "processing": processing_s,
            "date_start": _iso(started),
            "date_finish": _iso(finished),
            "operating": self.operating.used(method),
            "operating_reset_at": self.operating.reset_at(method),
        }
