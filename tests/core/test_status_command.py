"""`b24sync status` as a process: the dependencies it finds up and down, and the figures it
reads straight from the database and Redis. (With every service up, see
test_dashboard.py.)"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.settings import Settings
from tests.conftest import free_port
from tests.core.helpers import answer, create_user, error, publish_all
from tests.processes import b24sync_command

Sessions = async_sessionmaker[AsyncSession]


def state_of(output: str, name: str) -> str:
    line = next(line for line in output.splitlines() if f"│ {name} " in line)
    return "up" if "│ up " in line else "down"


async def test_status_finds_services_down_and_reads_the_figures(
    core_settings: Settings, committed: Sessions
) -> None:
    failed = await create_user(committed, core_settings, name="Сбойный Пользователь")
    await create_user(committed, core_settings)
    await publish_all(committed)
    await answer(committed, core_settings, error(failed.id, 1, reason="Missing phone number"))

    code, out, err = await b24sync_command(core_settings, "status")

    assert code == 1, err
    assert state_of(out, "PostgreSQL") == "up"
    assert state_of(out, "RabbitMQ") == "up"
    assert state_of(out, "Redis") == "up"
    # Nothing listens on the test's ports.
    assert state_of(out, "Core") == "down"
    assert state_of(out, "Bitrix service") == "down"
    assert state_of(out, "Bitrix24 emulator") == "down"
    assert "Connection refused" in out
    assert "2 total: 1 pending, 0 synced, 1 failed (0 retrying, 1 permanent)" in out
    assert "0 unpublished" in out
    assert "0 waiting, 0 active, 0 delayed, 0 failed" in out
    assert "requests/s over 10 s (plan standard: 2/s)" in out
    assert "Сбойный Пользователь" in out
    assert "Missing phone number" in out


async def test_status_without_the_database_or_redis_says_so(core_settings: Settings) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/core_db"
    code, out, _ = await b24sync_command(
        core_settings, "status", DATABASE_URL=nowhere, REDIS_URL=f"redis://127.0.0.1:{free_port()}"
    )

    assert code == 1
    assert state_of(out, "PostgreSQL") == "down"
    assert state_of(out, "Redis") == "down"
    assert state_of(out, "RabbitMQ") == "up"
    assert "No figures: the database cannot be read." in out
