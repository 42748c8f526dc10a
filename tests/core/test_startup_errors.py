"""`b24sync core` refuses to start in one line naming the setting: a port in use, a database
that is missing or behind its migrations."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from uuid import uuid4

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

from b24sync.core.db import asyncpg_dsn
from b24sync.settings import Settings
from tests.conftest import TEST_DATABASE_URL, free_port

_SETTINGS = {name.upper() for name in Settings.model_fields}


def core(env: dict[str, str], *options: str) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if key not in _SETTINGS}
    return subprocess.run(
        [sys.executable, "-m", "b24sync", *options, "core"],
        env={**base, "HOST": "127.0.0.1", "LOG_LEVEL": "WARNING", **env},
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_port_in_use_names_the_port_and_the_setting(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = core({"DATABASE_URL": database_url, "PORT": str(port)})
        debug = core({"DATABASE_URL": database_url, "PORT": str(port)}, "--debug")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"b24sync core: port {port} is already in use on 127.0.0.1 by another process: "
        "stop it or set PORT to a free port"
    ]
    assert "Traceback" in debug.stderr
    assert "Address already in use" in debug.stderr


async def test_a_database_behind_its_migrations_says_to_migrate() -> None:
    base = make_url(TEST_DATABASE_URL)
    name = f"{base.database}_empty_{uuid4().hex[:8]}"
    maintenance = await asyncpg.connect(
        asyncpg_dsn(base.set(database="postgres").render_as_string(hide_password=False))
    )
    await maintenance.execute(f'CREATE DATABASE "{name}"')
    try:
        url = base.set(database=name).render_as_string(hide_password=False)
        result = core({"DATABASE_URL": url, "PORT": str(free_port())})
        (line,) = result.stderr.splitlines()
        assert result.returncode == 1
        assert line.startswith("b24sync core: the database is at migration none, Core needs ")
        assert "run `b24sync migrate`" in line

        missing = base.set(database=f"{name}_missing").render_as_string(hide_password=False)
        result = core({"DATABASE_URL": missing, "PORT": str(free_port())})
        (line,) = result.stderr.splitlines()
        assert "does not exist: run `b24sync migrate`" in line
        assert "DATABASE_URL" in line
    finally:
        await maintenance.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await maintenance.close()
