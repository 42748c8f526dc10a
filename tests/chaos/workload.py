"""The users and their changes, through Core's HTTP API: the creates first, then a steady stream
of updates (a new name, phone and/or stage) and moves, spread over the users at random."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from typing import Any

import httpx

FIRST_NAMES = ["Иван", "Пётр", "Анна", "Мария", "Айгерим", "Нурлан", "Ольга", "Дмитрий", "Алия"]
LAST_NAMES = ["Иванов", "Петрова", "Смирнов", "Ахметова", "Касымов", "Ким", "Орлова", "Ли"]
# Kazakh mobile prefixes: every number is valid, so Core stores it as sent (E.164).
MOBILE_PREFIXES = ["701", "702", "705", "707", "747", "775", "777", "778"]
MOVE_SHARE = 0.35
CREATE_CONCURRENCY = 20
CREATE_ATTEMPTS = 5
# Requests that may wait on a slow Core at once; beyond it a change is not sent (counted).
MAX_IN_FLIGHT = 64
REQUEST_TIMEOUT_S = 10.0


class Workload:
    def __init__(self, core_url: str, stages: list[str], seed: int = 8) -> None:
        self.core_url = core_url
        self.stages = stages
        self.random = random.Random(seed)
        self.user_ids: list[int] = []
        # "update 200", "move 503", "update ConnectError", ...: how Core answered.
        self.outcomes: Counter[str] = Counter()

    def _client(self, connections: int) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.core_url,
            timeout=REQUEST_TIMEOUT_S,
            limits=httpx.Limits(max_connections=connections),
        )

    def _name(self) -> str:
        return f"{self.random.choice(FIRST_NAMES)} {self.random.choice(LAST_NAMES)}"

    def _phone(self) -> str:
        return f"+7{self.random.choice(MOBILE_PREFIXES)}{self.random.randrange(10**7):07d}"

    async def create_users(self, count: int) -> None:
        """`count` users, each created once (before any fault, so every create goes through)."""
        gate = asyncio.Semaphore(CREATE_CONCURRENCY)
        async with self._client(CREATE_CONCURRENCY) as client:

            async def create() -> int:
                body = {"full_name": self._name(), "phone": self._phone(), "stage": "NEW"}
                async with gate:
                    for _ in range(CREATE_ATTEMPTS):
                        response = await client.post("/users", json=body)
                        self.outcomes[f"create {response.status_code}"] += 1
                        if response.status_code == 201:
                            user_id: int = response.json()["id"]
                            return user_id
                        await asyncio.sleep(1)
                raise RuntimeError(f"Core refused a create: {response.status_code} {response.text}")

            self.user_ids = sorted(await asyncio.gather(*(create() for _ in range(count))))

    async def change_until(self, stop: asyncio.Event, per_s: float) -> None:
        """Sends changes at `per_s` a second until `stop` is set, whatever Core answers."""
        loop = asyncio.get_running_loop()
        in_flight: set[asyncio.Task[None]] = set()
        async with self._client(MAX_IN_FLIGHT) as client:
            next_at = loop.time()
            while not stop.is_set():
                if len(in_flight) < MAX_IN_FLIGHT:
                    task = asyncio.create_task(self._change(client))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                else:
                    self.outcomes["not sent: Core too slow"] += 1
                next_at += 1 / per_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))
            await asyncio.gather(*in_flight)

    async def _change(self, client: httpx.AsyncClient) -> None:
        user_id = self.random.choice(self.user_ids)
        if self.random.random() < MOVE_SHARE:
            kind, path, body = "move", f"/users/{user_id}/move", {"stage": self._stage()}
        else:
            kind, path, body = "update", f"/users/{user_id}", self._update()
        try:
            if kind == "move":
                response = await client.post(path, json=body)
            else:
                response = await client.patch(path, json=body)
            self.outcomes[f"{kind} {response.status_code}"] += 1
        except httpx.HTTPError as exc:
            self.outcomes[f"{kind} {type(exc).__name__}"] += 1

    def _stage(self) -> str:
        return self.random.choice(self.stages)

    def _update(self) -> dict[str, Any]:
        """A new name, phone and/or stage: every non-empty combination."""
        makers = {"full_name": self._name, "phone": self._phone, "stage": self._stage}
        fields = [name for name in makers if self.random.random() < 0.5]
        if not fields:
            fields = [self.random.choice(list(makers))]
        return {name: makers[name]() for name in fields}
