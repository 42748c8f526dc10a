"""The `b24sync` command line: options reach the service, bad options fail clearly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from b24sync.settings import Settings
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


# --- errors an operator fixes: one line on stderr, the traceback only with --debug ---------


def _run_with(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    # Only the test's own settings: none from the shell or a .env file (cwd is a temp dir).
    settings = {name.upper() for name in Settings.model_fields}
    base = {key: value for key, value in os.environ.items() if key not in settings}
    return subprocess.run(
        _b24sync(*args),
        env={**base, **env},
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line(result: subprocess.CompletedProcess[str], command: str, *fragments: str) -> str:
    assert result.returncode == 1, result
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"b24sync {command}: "), line
    for fragment in fragments:
        assert fragment in line, line
    assert "Traceback" not in result.stdout + result.stderr
    return line


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({"PORT": "abc"}, "PORT: not an integer: 'abc'", id="port"),
        pytest.param({"STAGE_MAP": "{bad"}, "STAGE_MAP: not valid JSON", id="stage-map"),
        pytest.param({"BITRIX_PLAN": "gold"}, "BITRIX_PLAN: ", id="literal"),
        pytest.param({"BITRIX_WEBHOOK_URL": "not-a-url"}, "BITRIX_WEBHOOK_URL: ", id="webhook"),
    ],
)
def test_an_invalid_setting_is_one_line_naming_the_variable(
    env: dict[str, str], expected: str
) -> None:
    _one_line(_run_with(env, "migrate"), "migrate", expected)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://portal.example/rest/1/s3cr3tc0de/",
        "https:///rest/1/s3cr3tc0de/",
        "https://portal.example/rest/x/s3cr3tc0de/",
        "https://portal.example/api/1/s3cr3tc0de",
        "https://portal.example/rest/1/s3cr3tc0de/crm.lead.add",
    ],
)
def test_a_malformed_webhook_url_is_refused_without_its_code(url: str) -> None:
    result = _run_with({"BITRIX_WEBHOOK_URL": url}, "bitrix")
    _one_line(result, "bitrix", "BITRIX_WEBHOOK_URL", "https://PORTAL/rest/USER_ID/CODE/")
    assert "s3cr3tc0de" not in result.stdout + result.stderr


def test_webhook_urls_of_the_documented_shape_are_accepted() -> None:
    for url in ("https://p.bitrix24.kz/rest/1/abc123/", "http://127.0.0.1:3100/rest/12/abc"):
        assert Settings(_env_file=None, bitrix_webhook_url=url).bitrix_webhook_url is not None


def test_an_unreachable_database_is_one_line_and_debug_shows_the_traceback() -> None:
    env = {"DATABASE_URL": f"postgresql://postgres:pa55word@127.0.0.1:{free_port()}/core_db"}
    result = _run_with(env, "migrate")
    line = _one_line(result, "migrate", "cannot reach PostgreSQL", "Connection refused")
    assert line.endswith("check DATABASE_URL")
    assert "pa55word" not in result.stdout + result.stderr

    debug = _run_with(env, "--debug", "migrate")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "ConnectionRefusedError" in debug.stderr
    assert debug.stderr.splitlines()[-1].endswith("check DATABASE_URL")


def test_help_lists_the_settings_each_command_reads_with_defaults() -> None:
    expected = {
        "core": ["PORT=3000", "DATABASE_URL=postgresql://", "RABBITMQ_URL=", "LOG_LEVEL=INFO"],
        "bitrix": ["BITRIX_HTTP_PORT=3001", "REDIS_URL=redis://", "BITRIX_WEBHOOK_URL=(secret"],
        "migrate": ["DATABASE_URL=postgresql://"],
        "run": ["PORT=3000", "BITRIX_HTTP_PORT=3001", "PORTAL_PORT=3100", "STAGES=NEW,"],
        "import": ["DATABASE_URL=", "DEFAULT_PHONE_REGION=KZ"],
        "resync": ["DATABASE_URL=", "RABBITMQ_REPLY_QUEUE=bitrix.responses"],
    }
    for command, fragments in expected.items():
        result = _run_with({"COLUMNS": "200"}, command, "--help")
        assert result.returncode == 0, result
        for fragment in fragments:
            assert fragment in result.stdout, (command, fragment, result.stdout)
        # The emulator's webhook code is a secret too, default or not.
        assert "b24sync-local" not in result.stdout
    assert "PORT=3000" not in _run_with({"COLUMNS": "200"}, "migrate", "--help").stdout
