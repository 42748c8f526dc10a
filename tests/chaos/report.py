"""The run's findings: a JSON report and the table printed at the end."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.chaos.checker import COUNTS
from tests.chaos.profiles import CONVERGENCE_TARGET_S
from tests.chaos.suite import ChaosRun

ROOT = Path(__file__).resolve().parents[2]


def source() -> dict[str, Any]:
    """Which code ran: the commit, and the files under src/ that differed from it."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    changed = git("status", "--porcelain", "--", "src").splitlines()
    return {"commit": git("rev-parse", "HEAD") or None, "changed_under_src": len(changed)}


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


def _offset(run: ChaosRun, epoch: float | None) -> float | None:
    return None if epoch is None else round(epoch - run.started_at, 1)


def build(run: ChaosRun, report_path: Path) -> dict[str, Any]:
    faults = [
        {
            "fault": str(record.fault),
            "round": record.round,
            "started_at": _iso(record.started_at),
            "ended_at": _iso(record.ended_at),
            "started_s": _offset(run, record.started_at),
            "ended_s": _offset(run, record.ended_at),
            "duration_s": round(record.ended_at - record.started_at, 1),
            # Until every change made before the fault ended was synced (Core's account).
            "caught_up_s": milestone.seconds,
            "details": record.details,
        }
        for record, milestone in run.faults
    ]
    last_end = run.faults[-1][0].ended_at if run.faults else None
    after_last = (
        None if run.converged_at is None or last_end is None else run.converged_at - last_end
    )
    outages = [
        {
            "fault": str(record.fault),
            "round": record.round,
            "portal_back_at": _iso(record.ended_at),
            "caught_up_s": milestone.seconds,
            "within_target": milestone.seconds is not None
            and milestone.seconds <= CONVERGENCE_TARGET_S,
        }
        for record, milestone in run.faults
        if record.fault.is_outage
    ]
    final = run.final
    counts = final.counts if final is not None else None
    return {
        "profile": run.profile.name,
        "passed": run.error is None and final is not None and final.clean,
        "error": run.error,
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "duration_s": _offset(run, run.finished_at),
        "report": str(report_path),
        "run_dir": str(run.run_dir),
        "logs": run.logs,
        "settings": {**run.settings, "source": source()},
        "workload": None
        if run.workload is None
        else {"users": len(run.workload.user_ids), "requests": dict(run.workload.outcomes)},
        "initial_sync_s": run.initial_sync_s,
        "faults": faults,
        "convergence": {
            "target_s": CONVERGENCE_TARGET_S,
            "converged_at": _iso(run.converged_at),
            "after_last_fault_s": None if after_last is None else round(after_last, 1),
            "after_outages": outages,
        },
        "counts": counts,
        "count_meanings": COUNTS,
        "final": None
        if final is None
        else {
            "users": final.users,
            "leads": final.leads,
            "sync_states": final.sync_states,
            "unpublished_events": final.unpublished_events,
        },
        "samples": None if final is None else final.samples,
    }


def write(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{'fault':<30} {'round':>5} {'ended at':>9} {'lasted':>7} {'caught up':>10}",
    ]
    for fault in report["faults"]:
        lines.append(
            f"{fault['fault']:<30} {fault['round']:>5} {_seconds(fault['ended_s']):>8}s"
            f" {_seconds(fault['duration_s']):>6}s {_seconds(fault['caught_up_s']):>9}s"
        )
    lines.append("")
    counts = report["counts"] or {}
    for name, meaning in report["count_meanings"].items():
        lines.append(f"{name:<15} {counts.get(name, '-')!s:>6}  {meaning}")
    convergence = report["convergence"]
    lines.append("")
    lines.append(
        f"converged {_seconds(convergence['after_last_fault_s'])} s after the last fault;"
        f" target {convergence['target_s']:.0f} s after the portal is back:"
    )
    for outage in convergence["after_outages"]:
        verdict = "ok" if outage["within_target"] else "MISSED"
        lines.append(
            f"  {outage['fault']} #{outage['round']}: {_seconds(outage['caught_up_s'])} s {verdict}"
        )
    if report["final"] is not None:
        lines.append(f"final state: {report['final']}")
    if report["error"]:
        lines.append(f"ERROR: {report['error']}")
    lines.append(f"report {report['report']}; logs {report['run_dir']}/logs")
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)
