"""`make run`'s entry point end to end: the seed's three requests reach the emulator's lead."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.processes import system_environment

PHONE = "+77001112233"


class RunningSystem:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "b24sync", "run"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no line {text!r} in time; output:\n{self.output[-5000:]}")

    def child_pids(self) -> dict[str, int]:
        started = (re.search(r"started (\w+) \(pid (\d+)\)", line) for line in self.lines)
        return {match[1]: int(match[2]) for match in started if match}


@pytest.fixture
def system() -> Iterator[RunningSystem]:
    with system_environment("b24sync_e2e", "e2e") as env:
        running = RunningSystem(env)
        try:
            yield running
        finally:
            if running.process.poll() is None:
                running.process.kill()
                running.process.wait()


def _eventually(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.2)


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.timeout(180)
def test_seed_requests_through_the_whole_system(system: RunningSystem) -> None:
    system.wait_for_line("Ready. Ctrl-C stops everything.", timeout=120)
    core = httpx.Client(base_url=f"http://127.0.0.1:{system.env['PORT']}", timeout=10)
    portal = httpx.Client(base_url=f"http://127.0.0.1:{system.env['PORTAL_PORT']}", timeout=10)

    def lead_of_user(user_id: int) -> dict[str, Any] | None:
        user = core.get(f"/users/{user_id}").json()
        if user["bitrix_lead_id"] is None:
            return None
        lead: dict[str, Any] = portal.get(f"/admin/leads/{user['bitrix_lead_id']}").json()
        return lead

    created = core.post("/users", json={"full_name": "Иван Иванов", "phone": PHONE, "stage": "NEW"})
    assert created.status_code == 201, created.text
    user = created.json()
    assert {k: user[k] for k in ("id", "full_name", "phone", "stage")} == {
        "id": 1,
        "full_name": "Иван Иванов",
        "phone": PHONE,
        "stage": "NEW",
    }
    lead = _eventually(lambda: lead_of_user(1))
    assert lead["TITLE"] == "Иван Иванов"
    assert lead["ORIGIN_ID"] == "1"

    updated = core.patch(
        "/users/1", json={"full_name": "Иван Петров", "phone": PHONE, "stage": "IN_PROCESS"}
    )
    assert updated.status_code == 200, updated.text
    assert updated.json()["full_name"] == "Иван Петров"
    _eventually(lambda: (lead_of_user(1) or {}).get("LAST_NAME") == "Петров")

    moved = core.post("/users/1/move", json={"stage": "CONVERTED"})
    assert moved.status_code == 200, moved.text
    assert moved.json()["stage"] == "CONVERTED"
    lead = _eventually(
        lambda: (found := lead_of_user(1)) and found["STATUS_ID"] == "CONVERTED" and found
    )
    assert [phone["VALUE"] for phone in lead["PHONE"]] == [PHONE]
    assert len(portal.get("/admin/leads").json()) == 1

    synced = _eventually(
        lambda: (u := core.get("/users/1").json())["sync"]["status"] == "synced" and u
    )
    assert synced["sync"]["synced_version"] == synced["version"] == 3
    assert synced["bitrix_lead_id"] == lead["ID"] or str(synced["bitrix_lead_id"]) == lead["ID"]
    overview = core.get("/sync").json()
    assert overview["users"] == {"total": 1, "pending": 0, "synced": 1, "failed": 0}
    assert overview["outbox"] == {"unpublished": 0, "oldest_unpublished_s": None}

    children = system.child_pids()
    assert set(children) == {"portal", "core", "bitrix"}
    system.process.send_signal(signal.SIGINT)
    assert system.process.wait(timeout=90) == 0, system.output[-3000:]
    system._reader.join(timeout=5)
    assert all(_process_gone(pid) for pid in children.values()), children
    for name in children:
        assert f"{name} stopped (exit code 0)" in system.output
    assert "b24sync-local" not in system.output  # the webhook code is masked everywhere
    assert "[Core] Message emitted successfully" in system.output
    assert "[Bitrix] Job completed successfully" in system.output
