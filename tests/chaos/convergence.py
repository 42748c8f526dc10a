"""How long the system takes to catch up after a fault: every change made until the fault ended
is confirmed (each user's synced_version reached the version it had then), by Core's account.
The final check tells whether that account was true."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from tests.chaos.checker import DATABASE_DOWN, CoreDatabase

POLL_S = 1.0


@dataclass
class Milestone:
    label: str
    at: float  # when the fault ended (epoch seconds)
    versions: dict[int, int]  # each user's version then
    reached_at: float | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def seconds(self) -> float | None:
        return None if self.reached_at is None else round(self.reached_at - self.at, 1)


class ConvergenceWatch:
    """Polls Core's database while it runs and marks milestones reached."""

    def __init__(self, database: CoreDatabase) -> None:
        self.database = database
        self.waiting: list[Milestone] = []
        self._task: asyncio.Task[None] | None = None

    async def mark(self, label: str, at: float) -> Milestone:
        """A milestone for the changes made until `at`, read now (retried while the database
        is unreachable)."""
        versions = await self._versions()
        while versions is None:
            await asyncio.sleep(POLL_S)
            versions = await self._versions()
        milestone = Milestone(label, at, {user: v for user, (v, _) in versions.items()})
        self.waiting.append(milestone)
        return milestone

    async def reached(self, milestone: Milestone, wait_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(milestone.done.wait(), wait_s)
        return milestone.reached_at is not None

    async def _versions(self) -> dict[int, tuple[int, int]] | None:
        """None while PostgreSQL restarts."""
        try:
            return await self.database.versions()
        except DATABASE_DOWN:
            return None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            if not self.waiting:
                continue
            versions = await self._versions()
            if versions is None:
                continue
            now = time.time()
            for milestone in list(self.waiting):
                if all(
                    versions.get(user, (0, 0))[1] >= version
                    for user, version in milestone.versions.items()
                ):
                    milestone.reached_at = now
                    milestone.done.set()
                    self.waiting.remove(milestone)

    async def __aenter__(self) -> ConvergenceWatch:
        self._task = asyncio.create_task(self._poll())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
