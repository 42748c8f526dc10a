"""The short fault suite (every fault once, about 100 users) must end with every count at 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chaos.checker import COUNTS

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 1080


@pytest.mark.timeout(RUN_TIMEOUT_S + 120)
def test_short_fault_suite_ends_with_every_user_in_its_lead(tmp_path: Path) -> None:
    report_path = tmp_path / "chaos.json"
    command = [sys.executable, "-m", "tests.chaos", "--profile", "short"]
    command += ["--report", str(report_path), "--run-dir", str(tmp_path)]
    suite = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = suite.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if suite.poll() is None:  # timed out, or the test was interrupted: the suite cleans up
            suite.terminate()
            suite.communicate(timeout=120)
    assert report_path.exists(), output[-8000:]
    report = json.loads(report_path.read_text())
    assert report["error"] is None, output[-8000:]
    assert report["counts"] == dict.fromkeys(COUNTS, 0), output[-8000:]
    assert suite.returncode == 0, output[-8000:]
