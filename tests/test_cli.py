"""The `b24sync` command line: options reach the service, bad options fail clearly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx

from tests.conftest import free_port


def _b24sync(*args: str) -> list[str]:
    return [sys.executable, "-m", "b24sync", *args]


def test_portal_options_override_settings_and_sigterm_stops_it() -> None:
    port = free_port()
    process = subprocess.Popen(
        _b24sync("portal", "--port", str(port), "--rate-limit", "off", "--latency-ms", "5"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        faults = None
        while time.monotonic() < deadline and faults is None:
            try:
                faults = httpx.get(f"http://127.0.0.1:{port}/admin/faults").json()
            except httpx.TransportError:
                time.sleep(0.1)
        assert faults is not None, "the emulator did not answer"
        assert faults["latency_ms"] == 5
        assert httpx.get(f"http://127.0.0.1:{port}/admin/stats").json()["bucket"] is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_an_invalid_option_is_refused_with_a_message() -> None:
    result = subprocess.run(
        _b24sync("portal", "--error-rate", "2"), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "--error-rate" in result.stderr


def test_no_command_shows_the_commands() -> None:
    result = subprocess.run(_b24sync(), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    for command in ("core", "bitrix", "portal", "migrate", "run"):
        assert command in result.stdout + result.stderr
