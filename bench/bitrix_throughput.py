"""The Bitrix service at Bitrix24's request ceiling, from the event on RabbitMQ to its reply.

The emulator (`b24sync portal`) and the service (`b24sync bitrix`, one or two processes) run as
subprocesses with their defaults, on queues and a Redis prefix of their own; this process
publishes events as Core would (message ids, versions, `changed`, the lead id once known) and
times each one until its reply. Scenarios:

- `plan` (default): N new users at once (or `--rate` a second, evenly: a steady state), then N
  updates of them (new phone and stage), on
  `--plan standard|enterprise|unlimited` (the emulator's limit follows the plan; `unlimited`
  turns it off). Rates overall and sustained after the burst (over the second half of the
  replies), limit answers, attempts, duplicate leads, the service's CPU per event, and Redis
  commands per event in steady state (`--redis`: MONITOR of the service's keys, counting client
  round trips and the commands run inside scripts).
- `light`: one change at a time, every `--gap` seconds (random): latency percentiles.
- `hold`: the emulator holds one request's answer for 35 s in the middle of a create run (once
  the bucket's burst is long spent): the rate of everyone else during the hold against the
  10 s before it.
- `kill`: two service processes; one is killed with SIGKILL in the middle of a create run (as
  late as `hold`): the survivor's rate before and after, the time until every user is
  answered, leads per user.
- `changes`: N users each changed 5 times in quick succession: how many writes Bitrix24 got.

    .venv/bin/python bench/bitrix_throughput.py [--scenario plan] [--plan standard]
                                                 [--events 5000] [--rate N] [--redis]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import aio_pika
import httpx
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).parent))

from _common import (
    RABBITMQ_URL,
    b24sync_process,
    cpu_seconds,
    cpu_speed_ms,
    delete_queues,
    free_port,
    percentile,
    write_result,
)
from b24sync.bitrix.main import key_prefix
from b24sync.settings import Settings

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
PORTAL_LIMIT = {"standard": "standard", "enterprise": "enterprise", "unlimited": "off"}
# A disturbance comes no earlier than this into a run: the bucket's burst is long spent, so
# the 10 s before it measure the steady rate.
STEADY_AFTER_S = 20.0


def event(
    action: str, user_id: int, version: int, reply_queue: str, **extra: Any
) -> dict[str, Any]:
    user = {
        "id": user_id,
        "full_name": f"Пользователь {user_id}",
        "phone": f"+7700{user_id:07d}",
        "stage": "NEW",
        "version": version,
    }
    changed = extra.pop("changed", None)
    user.update(extra)
    pattern = {"create_card": "user_created", "update_card": "user_updated"}[action]
    data: dict[str, Any] = {"action": action, "user": user, "replyQueue": reply_queue}
    if changed is not None:
        data["changed"] = changed
    return {"pattern": pattern, "data": data}


class Bench:
    """Publishes events and collects their replies by message id."""

    def __init__(self, queue: str, reply_queue: str, rate: float | None = None) -> None:
        self.queue = queue
        self.reply_queue = reply_queue
        # Events a second, evenly spaced (None: as fast as RabbitMQ confirms them).
        self.rate = rate
        self._paced_from = 0.0
        self._paced = 0
        self.sent: dict[str, float] = {}
        self.answered: dict[str, float] = {}
        self.replies: dict[str, dict[str, Any]] = {}
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._all = asyncio.Event()
        self._progress = asyncio.Event()
        self._expected = 0

    @contextlib.asynccontextmanager
    async def open(self) -> Any:
        connection = await aio_pika.connect(RABBITMQ_URL)
        async with connection:
            self._channel = await connection.channel(publisher_confirms=True)
            await self._channel.declare_queue(self.queue, durable=True)
            replies = await self._channel.declare_queue(self.reply_queue, durable=True)
            await replies.consume(self._on_reply)
            yield self

    async def _on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        key = message.correlation_id or ""
        if key in self.sent and key not in self.answered:
            self.answered[key] = time.perf_counter()
            self.replies[key] = json.loads(message.body)["data"]
            self._progress.set()
            if len(self.answered) >= self._expected:
                self._all.set()
        await message.ack()

    async def publish(self, body: dict[str, Any]) -> str:
        assert self._channel is not None
        if self.rate:
            if not self._paced:
                self._paced_from = time.perf_counter()
            self._paced += 1
            due = self._paced_from + self._paced / self.rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
        message_id = str(uuid4())
        self.sent[message_id] = time.perf_counter()
        await self._channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(body, ensure_ascii=False).encode(),
                message_id=message_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=self.queue,
        )
        return message_id

    async def wait(self, ids: list[str], timeout_s: float) -> None:
        self._expected = len(self.answered) + len([i for i in ids if i not in self.answered])
        self._all.clear()
        if len(self.answered) < self._expected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all.wait(), timeout_s)

    async def until_answered(self, count: int) -> None:
        """Returns once `count` events in all have their reply."""
        while len(self.answered) < count:
            self._progress.clear()
            await self._progress.wait()

    def summary(self, ids: list[str]) -> dict[str, Any]:
        """Rates and latencies of the events `ids`, from the first publish."""
        done = [i for i in ids if i in self.answered]
        if not done:
            return {"answered": 0}
        start = min(self.sent[i] for i in ids)
        times = sorted(self.answered[i] - start for i in done)
        half, most = times[len(times) // 2], times[int(len(times) * 0.9)]
        counted = int(len(times) * 0.9) - len(times) // 2
        latencies = [self.answered[i] - self.sent[i] for i in done]
        statuses = Counter(
            "skipped" if self.replies[i].get("skipped") else self.replies[i]["status"] for i in done
        )
        return {
            "events": len(ids),
            "answered": len(done),
            "replies": dict(statuses),
            "attempts": dict(Counter(self.replies[i].get("attempts") for i in done)),
            "seconds": round(times[-1], 2),
            "events_per_s": round(len(done) / times[-1], 1),
            "sustained_per_s": round(counted / (most - half), 1) if most > half else None,
            "latency_s": {
                "p50": round(percentile(latencies, 0.5), 3),
                "p99": round(percentile(latencies, 0.99), 3),
                "max": round(max(latencies), 3),
            },
        }

    def lead_ids(self, ids: list[str]) -> dict[int, int]:
        return {
            self.replies[i]["user_id"]: self.replies[i]["bitrix_lead_id"]
            for i in ids
            if i in self.replies and self.replies[i].get("bitrix_lead_id")
        }

    def rate_between(self, start: float, end: float) -> float:
        """Replies a second between two moments (perf_counter)."""
        count = sum(1 for at in self.answered.values() if start <= at < end)
        return round(count / (end - start), 1) if end > start else 0.0


class Monitor:
    """`redis-cli monitor` while a block runs: the commands on the service's keys, those the
    clients sent (a pipelined command counts as one, though it shares its round trip) and those
    run inside scripts (BullMQ's and the service's own)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.path = Path(f"/tmp/b24sync-bench-monitor-{prefix}.txt")  # noqa: S108
        self.client_commands = 0
        self.in_scripts = 0
        # Commands inside scripts on the service's own keys (user state, leases, request stats);
        # the rest are BullMQ's.
        self.own_keys = key_prefix(Settings(bullmq_prefix=prefix)) + ":"
        self.in_own_scripts = 0
        self.by_command: Counter[str] = Counter()
        self.by_command_in_scripts: Counter[str] = Counter()

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        host_port = REDIS_URL.removeprefix("redis://").split("/")[0]
        host, _, port = host_port.partition(":")
        with self.path.open("w") as out:
            process = subprocess.Popen(
                ["redis-cli", "-h", host, "-p", port or "6379", "monitor"], stdout=out
            )
            try:
                time.sleep(0.3)
                yield
            finally:
                process.terminate()
                process.wait()
        for line in self.path.read_text(errors="replace").splitlines():
            if self.prefix not in line:
                continue
            parts = line.split('"')
            command = parts[1].upper() if len(parts) > 1 else "?"
            if "[0 lua]" in line:
                self.in_scripts += 1
                self.by_command_in_scripts[command] += 1
                if self.own_keys in line:
                    self.in_own_scripts += 1
            else:
                self.client_commands += 1
                self.by_command[command] += 1
        self.path.unlink()

    def per_event(self, events: int) -> dict[str, Any]:
        return {
            "client_commands": round(self.client_commands / events, 2),
            "commands_inside_scripts": round(self.in_scripts / events, 2),
            "inside_bullmq_scripts": round((self.in_scripts - self.in_own_scripts) / events, 2),
            "inside_own_scripts": round(self.in_own_scripts / events, 2),
            "all_commands": round((self.client_commands + self.in_scripts) / events, 2),
            "client_commands_by_name": {
                command: round(count / events, 2)
                for command, count in self.by_command.most_common()
            },
            "inside_scripts_by_name": {
                command: round(count / events, 2)
                for command, count in self.by_command_in_scripts.most_common()
            },
        }


class System:
    """The emulator and the service processes of one run."""

    def __init__(self, plan: str, processes: int, **env: str) -> None:
        suffix = uuid4().hex[:8]
        self.queue, self.reply_queue = f"bench.events.{suffix}", f"bench.replies.{suffix}"
        self.prefix = f"bench-{suffix}"
        self.portal_url = f"http://127.0.0.1:{free_port()}"
        self.plan = plan
        self.env = {
            "RABBITMQ_URL": RABBITMQ_URL,
            "REDIS_URL": REDIS_URL,
            "RABBITMQ_QUEUE": self.queue,
            "RABBITMQ_REPLY_QUEUE": self.reply_queue,
            "BULLMQ_PREFIX": self.prefix,
            "PORTAL_PORT": self.portal_url.rsplit(":", 1)[1],
            "PORTAL_RATE_LIMIT": PORTAL_LIMIT[plan],
            "BITRIX_PLAN": plan,
            "HOST": "127.0.0.1",
            **env,
        }
        self.health_ports = [free_port() for _ in range(processes)]
        self.bitrix: list[subprocess.Popen[bytes]] = []

    @contextlib.contextmanager
    def running(self) -> Iterator[System]:
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(
                    b24sync_process(
                        ["portal"], self.env, f"{self.portal_url}/admin/stats", self.prefix
                    )
                )
                for n, port in enumerate(self.health_ports):
                    env = {**self.env, "BITRIX_HTTP_PORT": str(port)}
                    url = f"http://127.0.0.1:{port}/readyz"
                    self.bitrix.append(
                        stack.enter_context(
                            b24sync_process(["bitrix"], env, url, f"{self.prefix}-{n}")
                        )
                    )
                yield self
        finally:
            asyncio.run(delete_queues(self.queue, self.reply_queue))
            asyncio.run(forget_redis(self.prefix))

    def portal(self, path: str) -> Any:
        return httpx.get(f"{self.portal_url}{path}", timeout=30).json()

    def portal_report(self) -> dict[str, Any]:
        stats = self.portal("/admin/stats")
        outcomes: Counter[str] = Counter()
        for by_outcome in stats["by_method"].values():
            outcomes.update(by_outcome)
        leads = self.portal("/admin/leads")
        per_user = Counter(lead["ORIGIN_ID"] for lead in leads)
        return {
            "requests": stats["total"],
            "commands_by_method": stats["by_method"],
            "limit_answers": outcomes.get("QUERY_LIMIT_EXCEEDED", 0),
            "leads": len(leads),
            "users_with_more_than_one_lead": sum(1 for n in per_user.values() if n > 1),
        }


async def forget_redis(prefix: str) -> None:
    redis = Redis.from_url(REDIS_URL)
    async with redis:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await redis.delete(*keys)


async def create_users(bench: Bench, users: range) -> list[str]:
    return [
        await bench.publish(event("create_card", user_id, 1, bench.reply_queue))
        for user_id in users
    ]


async def update_users(bench: Bench, lead_ids: dict[int, int], version: int = 2) -> list[str]:
    """What Core sends for a change of phone and stage: the fields changed and the lead id."""
    return [
        await bench.publish(
            event(
                "update_card",
                user_id,
                version,
                bench.reply_queue,
                phone=f"+7701{user_id:07d}",
                stage="IN_PROCESS",
                changed=["phone", "stage"],
                bitrix_lead_id=lead_id,
            )
        )
        for user_id, lead_id in lead_ids.items()
    ]


def run_plan(args: argparse.Namespace) -> dict[str, Any]:
    system = System(args.plan, 1)
    monitor = Monitor(system.prefix)
    with system.running():
        bitrix = system.bitrix[0]

        async def scenario() -> dict[str, Any]:
            bench = Bench(system.queue, system.reply_queue, args.rate)
            async with bench.open():
                cpu = cpu_seconds(bitrix)
                created = await create_users(bench, range(1, args.events + 1))
                await bench.wait(created, args.timeout)
                create_cpu = cpu_seconds(bitrix) - cpu
                creates = bench.summary(created)
                cpu = cpu_seconds(bitrix)
                if args.redis:
                    with monitor.watching():
                        updated = await update_users(bench, bench.lead_ids(created))
                        await bench.wait(updated, args.timeout)
                else:
                    updated = await update_users(bench, bench.lead_ids(created))
                    await bench.wait(updated, args.timeout)
                update_cpu = cpu_seconds(bitrix) - cpu
                updates = bench.summary(updated)
            creates["bitrix_cpu_ms_per_event"] = round(create_cpu / len(created) * 1000, 3)
            updates["bitrix_cpu_ms_per_event"] = round(update_cpu / len(updated) * 1000, 3)
            return {"creates": creates, "updates": updates}

        result = asyncio.run(scenario())
        result["portal"] = system.portal_report()
    if args.redis:
        result["redis_per_event_during_updates"] = monitor.per_event(result["updates"]["events"])
    return result


def run_light(args: argparse.Namespace) -> dict[str, Any]:
    low, high = (float(part) for part in args.gap.split(","))
    system = System(args.plan, 1)
    monitor = Monitor(system.prefix)
    with system.running():

        async def scenario() -> dict[str, Any]:
            bench = Bench(system.queue, system.reply_queue)
            ids: list[str] = []
            gaps: list[float] = []
            async with bench.open():
                for user_id in range(1, args.events + 1):
                    gap = random.uniform(low, high)
                    gaps.append(round(gap, 1))
                    await asyncio.sleep(gap)
                    ids += await create_users(bench, range(user_id, user_id + 1))
                    await bench.wait(ids[-1:], 60)
            return {"gaps_s": gaps, **bench.summary(ids)}

        with monitor.watching() if args.redis else contextlib.nullcontext():
            result = asyncio.run(scenario())
        result["portal"] = system.portal_report()
    if args.redis:
        result["redis_per_event"] = monitor.per_event(args.events)
    return result


async def disturbed_creates(
    system: System, args: argparse.Namespace, disturb: Callable[[], Awaitable[None]]
) -> tuple[Bench, list[str], float]:
    """Creates `args.events` users, calls `disturb` once a third of them are answered and
    `STEADY_AFTER_S` have passed, and waits for the rest; returns the bench, the event ids and
    when the disturbance began."""
    bench = Bench(system.queue, system.reply_queue)
    async with bench.open():
        started = time.perf_counter()
        created = await create_users(bench, range(1, args.events + 1))
        await bench.until_answered(args.events // 3)
        await asyncio.sleep(max(0.0, started + STEADY_AFTER_S - time.perf_counter()))
        disturbed_at = time.perf_counter()
        await disturb()
        await bench.wait(created, args.timeout)
    return bench, created, disturbed_at


def run_hold(args: argparse.Namespace) -> dict[str, Any]:
    system = System(args.plan, 1)
    with system.running():

        async def hold() -> None:
            async with httpx.AsyncClient() as http:
                await http.post(
                    f"{system.portal_url}/admin/faults/script",
                    json={"method": "batch", "kind": "timeout_after_write", "delay_s": 35},
                )

        bench, created, held_at = asyncio.run(disturbed_creates(system, args, hold))
        result = {
            **bench.summary(created),
            "held_at_s": round(held_at - min(bench.sent.values()), 2),
            "rate_before_hold_per_s": bench.rate_between(held_at - 10, held_at),
            "rate_during_hold_per_s": bench.rate_between(held_at + 1, held_at + 30),
            "portal": system.portal_report(),
        }
    return result


def run_kill(args: argparse.Namespace) -> dict[str, Any]:
    system = System(args.plan, 2)
    with system.running():

        async def kill() -> None:
            system.bitrix[0].send_signal(signal.SIGKILL)

        bench, created, killed_at = asyncio.run(disturbed_creates(system, args, kill))
        result = {
            **bench.summary(created),
            "killed_at_s": round(killed_at - min(bench.sent.values()), 2),
            "rate_before_kill_per_s": bench.rate_between(killed_at - 10, killed_at),
            "rate_after_kill_per_s": bench.rate_between(killed_at + 1, killed_at + 11),
            "seconds_from_kill_to_last_reply": round(max(bench.answered.values()) - killed_at, 2),
            "portal": system.portal_report(),
        }
    return result


def run_changes(args: argparse.Namespace) -> dict[str, Any]:
    system = System(args.plan, 1)
    with system.running():

        async def scenario() -> dict[str, Any]:
            bench = Bench(system.queue, system.reply_queue)
            async with bench.open():
                created = await create_users(bench, range(1, args.events + 1))
                await bench.wait(created, args.timeout)
                lead_ids = bench.lead_ids(created)
                before = system.portal("/admin/stats")["by_method"]
                changes: list[str] = []
                for user_id, lead_id in lead_ids.items():
                    for version in range(2, 7):
                        changes.append(
                            await bench.publish(
                                event(
                                    "update_card",
                                    user_id,
                                    version,
                                    bench.reply_queue,
                                    full_name=f"Имя {user_id} v{version}",
                                    changed=["full_name"],
                                    bitrix_lead_id=lead_id,
                                )
                            )
                        )
                await bench.wait(changes, args.timeout)
                after = system.portal("/admin/stats")["by_method"]
                updates = sum(after.get("crm.lead.update", {}).values()) - sum(
                    before.get("crm.lead.update", {}).values()
                )
                leads = system.portal("/admin/leads")
                newest = sum(1 for lead in leads if lead["TITLE"] == f"Имя {lead['ORIGIN_ID']} v6")
            return {
                "changes": bench.summary(changes),
                "users": len(lead_ids),
                "lead_updates_sent": updates,
                "updates_per_user": round(updates / len(lead_ids), 2),
                "leads_holding_the_newest_change": newest,
            }

        result = asyncio.run(scenario())
        result["portal"] = system.portal_report()
    return result


SCENARIOS = {
    "plan": run_plan,
    "light": run_light,
    "hold": run_hold,
    "kill": run_kill,
    "changes": run_changes,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="plan")
    parser.add_argument("--plan", choices=sorted(PORTAL_LIMIT), default="standard")
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--gap", default="1,60", help="light: seconds between changes, low,high")
    parser.add_argument("--redis", action="store_true", help="count Redis commands per event")
    parser.add_argument(
        "--rate", type=float, help="plan: publish this many events a second, evenly (steady state)"
    )
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()

    speed_before = cpu_speed_ms()
    started = time.time()
    result: dict[str, Any] = {
        "benchmark": f"Bitrix service: {args.scenario}",
        "plan": args.plan,
        "command": " ".join(["bench/bitrix_throughput.py", *sys.argv[1:]]),
        **SCENARIOS[args.scenario](args),
        "wall_s": round(time.time() - started, 1),
        "cpu_speed_check_ms": [speed_before, cpu_speed_ms()],
    }
    paced = f"_at_{args.rate:g}_per_s" if args.rate else ""
    write_result(f"bitrix_{args.scenario}_{args.plan}_{args.events}{paced}", result)


if __name__ == "__main__":
    main()
