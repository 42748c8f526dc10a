"""One run of the fault suite: the infrastructure and the system up, the users created, the
changes flowing while the faults come one after another, then the wait for convergence and the
check. Whatever happens, every process is stopped and the data directory removed."""

from __future__ import annotations

import asyncio
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.chaos.checker import CoreDatabase, Verdict, check
from tests.chaos.convergence import ConvergenceWatch, Milestone
from tests.chaos.faults import FaultRecord, Injector, schedule
from tests.chaos.infra import Infrastructure
from tests.chaos.profiles import Profile
from tests.chaos.services import BITRIX_PROCESSES, System
from tests.chaos.workload import Workload

CHECK_EVERY_S = 2.0
# A clean check is repeated this much later: nothing late (a held answer, a resent event) may
# undo it.
CONFIRM_AFTER_S = 10.0


@dataclass
class ChaosRun:
    """What a run did and found, filled in as it goes (a run that fails half-way still says
    how far it got)."""

    profile: Profile
    run_dir: Path
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    logs: dict[str, str] = field(default_factory=dict)
    infrastructure: dict[str, Any] = field(default_factory=dict)
    service_environment: dict[str, str] = field(default_factory=dict)
    workload: Workload | None = None
    initial_sync_s: float | None = None
    faults: list[tuple[FaultRecord, Milestone]] = field(default_factory=list)
    final: Verdict | None = None
    converged_at: float | None = None
    error: str | None = None

    def say(self, text: str) -> None:
        print(f"[chaos +{time.time() - self.started_at:6.0f}s] {text}", flush=True)

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "profile": self.profile.describe(),
            "service_environment": self.service_environment,
            "bitrix_processes": BITRIX_PROCESSES,
            "infrastructure": self.infrastructure,
        }


async def settle(
    database: CoreDatabase, system: System, max_s: float, stall_s: float
) -> tuple[Verdict, float | None]:
    """Checks until every count is 0 (and still is a little later), or until `max_s`, or until
    nothing improved for `stall_s`. Returns the last verdict and when it became clean."""
    started = best_at = time.monotonic()
    best: int | None = None
    verdict: Verdict | None = None
    while True:
        try:
            verdict = await check(database, system.portal_url, system.settings)
        except Exception:
            if time.monotonic() - started > max_s:
                raise
        if verdict is not None and verdict.clean:
            clean_at = time.time()
            await asyncio.sleep(CONFIRM_AFTER_S)
            verdict = await check(database, system.portal_url, system.settings)
            if verdict.clean:
                return verdict, clean_at
        now = time.monotonic()
        if verdict is not None and (best is None or verdict.total < best):
            best, best_at = verdict.total, now
        if verdict is not None and (now - started > max_s or now - best_at > stall_s):
            return verdict, None
        await asyncio.sleep(CHECK_EVERY_S)


async def _exercise(run: ChaosRun, infra: Infrastructure, system: System) -> None:
    profile = run.profile
    database = CoreDatabase(system.settings.database_url)
    workload = run.workload = Workload(system.core_url, system.settings.stages)
    run.say(f"creating {profile.users} users")
    await workload.create_users(profile.users)
    created_at = time.time()
    verdict, synced_at = await settle(database, system, profile.final_max_s, profile.final_stall_s)
    if synced_at is None:
        run.say(f"the creates did not all sync (still {verdict.counts}); going on")
    else:
        run.initial_sync_s = round(synced_at - created_at, 1)
        run.say(f"all {profile.users} users synced after {run.initial_sync_s} s")

    injector = Injector(infra, system, profile)
    stop = asyncio.Event()
    async with ConvergenceWatch(database) as watch:
        changes = asyncio.create_task(workload.change_until(stop, profile.changes_per_s))
        try:
            plan = schedule(profile)
            for number, (fault, round_) in enumerate(plan, 1):
                if changes.done():
                    changes.result()  # the workload failed: say why
                run.say(f"fault {number}/{len(plan)}: {fault} (round {round_})")
                record = await injector.inject(fault, round_)
                milestone = await watch.mark(record.label, record.ended_at)
                run.faults.append((record, milestone))
                caught_up = await watch.reached(milestone, profile.settle_max_s)
                run.say(
                    f"  over after {record.ended_at - record.started_at:.1f} s {record.details}; "
                    + (
                        f"changes until then synced after {milestone.seconds} s"
                        if caught_up
                        else f"not caught up within {profile.settle_max_s:.0f} s (still watched)"
                    )
                )
                await asyncio.sleep(profile.gap_s)
        finally:
            stop.set()
            await changes
            await injector.close()
        run.say(f"workload stopped: {dict(workload.outcomes)}; waiting for convergence")
        run.final, run.converged_at = await settle(
            database, system, profile.final_max_s, profile.final_stall_s
        )


async def run_chaos(run: ChaosRun) -> None:
    logs = run.run_dir / "logs"
    shutil.rmtree(logs, ignore_errors=True)  # a run directory used again gets fresh logs
    logs.mkdir(parents=True)
    run.say(f"profile {run.profile.name}; logs in {logs}")
    try:
        async with Infrastructure(logs) as infra:
            run.infrastructure = {
                "postgres_port": infra.postgres.port,
                "postgres_bin": str(infra.postgres.bin),
                "redis_port": infra.redis.port,
                "rabbitmq_port": infra.rabbitmq.port,
                "rabbitmq_node": infra.rabbitmq.node,
            }
            for process in (infra.postgres.process, infra.redis.process, infra.rabbitmq.process):
                run.logs[process.name] = str(process.log_path)
            system = System(infra, run.run_dir)
            run.service_environment = system.variables
            run.logs.update(system.log_files)
            run.say(f"infrastructure up: {run.infrastructure}")
            try:
                await system.start()
                run.say("emulator, Core and the Bitrix processes up")
                await _exercise(run, infra, system)
            finally:
                system.stop()
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        run.finished_at = time.time()
