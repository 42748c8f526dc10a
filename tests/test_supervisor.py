"""`b24sync run` refuses to start on a taken port, never takes another process's health answer
for its child's, and names the child that exited with its reason."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from b24sync import supervisor
from b24sync.errors import StartupError
from b24sync.portal.main import PortalServer
from b24sync.settings import Settings
from tests.conftest import free_port
from tests.processes import system_environment


@pytest.fixture
def env() -> Iterator[dict[str, str]]:
    """A system of this test's own: database, queues, Redis prefix, ports."""
    with system_environment("b24sync_supervisor", "run", LOG_LEVEL="WARNING") as values:
        yield values


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "b24sync", "run"],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("setting", ["PORT", "BITRIX_HTTP_PORT", "PORTAL_PORT"])
def test_a_taken_port_stops_it_before_anything_starts(env: dict[str, str], setting: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env[setting])))
        taken.listen()
        result = run(env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"b24sync run: port {env[setting]} is already in use on 127.0.0.1 by another process: "
        f"stop it or set {setting} to a free port"
    ]
    assert "started" not in result.stdout
    assert "Ready." not in result.stdout


def test_a_child_that_exits_at_start_is_named_with_its_reason(env: dict[str, str]) -> None:
    env["RABBITMQ_URL"] = f"amqp://guest:guest@127.0.0.1:{free_port()}"
    result = run(env)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("b24sync run: bitrix exited with code 1: b24sync bitrix: ")
    assert line.endswith("(Connection refused): check RABBITMQ_URL")
    assert "Ready." not in result.stdout
    # The others were stopped.
    assert "core stopped (exit code 0)" in result.stdout
    assert "portal stopped (exit code 0)" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_a_child_that_dies_later_is_named_and_stops_the_others(env: dict[str, str]) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "b24sync", "run"],
        env=env,
        cwd=tempfile.gettempdir(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or []), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not any("Ready." in line for line in lines):
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        [pid] = [
            int(line.split("pid ")[1].rstrip(")\n")) for line in lines if "started core" in line
        ]
        os.kill(pid, signal.SIGKILL)
        assert process.wait(timeout=90) == 1
        reader.join(timeout=10)
        assert process.stderr is not None
        assert process.stderr.read().splitlines() == ["b24sync run: core exited with code -9"]
        assert any("core exited with code -9; stopping the others" in line for line in lines)
        assert any("bitrix stopped (exit code 0)" in line for line in lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def test_a_health_answer_of_another_process_is_not_taken_for_the_child(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "_READY_TIMEOUT_S", 1.0)
    child = await asyncio.create_subprocess_exec("sleep", "30")
    service = supervisor.Service(
        "core",
        f"http://127.0.0.1:{settings.portal_port}/healthz",
        "127.0.0.1",
        settings.portal_port,
        "PORT",
        process=child,
    )
    try:
        # The emulator answers /healthz, from this process.
        async with PortalServer(settings), httpx.AsyncClient(timeout=2) as client:
            with pytest.raises(StartupError) as raised:
                await supervisor._wait_healthy(service, client)
    finally:
        child.kill()
        await child.wait()
    assert str(raised.value) == (
        f"core did not become healthy in 1s; another process (pid {os.getpid()}) answers on PORT"
    )
