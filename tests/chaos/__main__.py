"""`python -m tests.chaos --profile full|short --report PATH [--run-dir DIR]`.

Exit code 0: every count is 0; 1: some count is not; 2: the run itself failed or was
interrupted (the report says how far it got)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

from b24sync.logs import configure_logging
from tests.chaos import report
from tests.chaos.profiles import PROFILES
from tests.chaos.suite import ChaosRun, run_chaos


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="short")
    parser.add_argument("--report", type=Path, required=True, help="JSON report to write")
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="where the processes' logs go (default: a new b24sync-chaos-* temporary directory)",
    )
    return parser.parse_args(argv)


async def _run(run: ChaosRun) -> None:
    """Runs the suite; SIGINT/SIGTERM stop it, and everything started is stopped on the way out."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await run_chaos(run)
    except asyncio.CancelledError:
        task.uncancel()
        run.error = "interrupted"
        run.finished_at = time.time()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    configure_logging("WARNING")  # the suite's own clients: only what matters
    run_dir = args.run_dir or Path(
        tempfile.mkdtemp(prefix=f"b24sync-chaos-{args.profile}-{time.strftime('%Y%m%d-%H%M%S')}-")
    )
    run = ChaosRun(PROFILES[args.profile], run_dir.resolve())
    asyncio.run(_run(run))
    found = report.build(run, args.report)
    report.write(found, args.report)
    print(report.table(found), flush=True)
    if run.error is not None or run.final is None:
        return 2
    return 0 if found["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
