"""`b24sync users list|show` as processes, straight on the database (Core not running)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.settings import Settings
from tests.conftest import free_port
from tests.core.helpers import answer, create_user, error, move_user, publish_all, success
from tests.processes import b24sync_command

Sessions = async_sessionmaker[AsyncSession]


async def test_list_filters_by_state_and_search(
    core_settings: Settings, committed: Sessions
) -> None:
    synced = await create_user(committed, core_settings, name="Анна Синхронная")
    failed = await create_user(committed, core_settings, name="Борис Сбойный")
    await create_user(committed, core_settings, name="Вера Ждущая")
    await publish_all(committed)
    await answer(committed, core_settings, success(synced.id, 1, lead=501))
    await answer(committed, core_settings, error(failed.id, 1, reason="Missing phone number"))

    code, out, err = await b24sync_command(core_settings, "users", "list")
    assert code == 0, err
    for name in ("Анна Синхронная", "Борис Сбойный", "Вера Ждущая"):
        assert name in out
    assert "501" in out
    assert "3 of 3 user(s)" in out

    code, out, _ = await b24sync_command(core_settings, "users", "list", "--status", "failed")
    assert code == 0
    assert "Борис Сбойный" in out
    assert "Missing phone number · permanent, 3 attempt(s)" in out
    assert "Анна" not in out
    assert "1 of 1 user(s)" in out

    code, out, _ = await b24sync_command(
        core_settings, "users", "list", "--search", "вера", "--limit", "1"
    )
    assert code == 0
    assert "Вера Ждущая" in out
    assert "1 of 1 user(s)" in out

    code, _, err = await b24sync_command(core_settings, "users", "list", "--status", "lost")
    assert code == 2
    assert "--status" in err


async def test_show_prints_the_user_and_its_history(
    core_settings: Settings, committed: Sessions
) -> None:
    user = await create_user(committed, core_settings, name="Иван Иванов")
    await publish_all(committed)
    await answer(committed, core_settings, success(user.id, 1, lead=77))
    await move_user(committed, core_settings, user.id, "IN_PROCESS")
    await publish_all(committed)
    await answer(
        committed,
        core_settings,
        error(user.id, 2, reason="crm.lead.update: bad stage", action="move_card"),
    )

    code, out, err = await b24sync_command(core_settings, "users", "show", str(user.id))

    assert code == 0, err
    assert "Иван Иванов" in out
    assert "failed" in out
    assert "crm.lead.update: bad stage · retrying, 3 attempt(s)" in out
    assert "user_moved" in out
    assert "stage=IN_PROCESS" in out
    assert "error: crm.lead.update: bad stage" in out
    assert "user_created" in out
    assert "success" in out


async def test_problems_are_one_line_on_stderr(
    core_settings: Settings, committed: Sessions
) -> None:
    code, out, err = await b24sync_command(core_settings, "users", "show", "999999")
    assert (code, out) == (1, "")
    assert err.strip().splitlines() == [err.strip()]
    assert "999999" in err

    nowhere = f"postgresql://postgres:pa55word@127.0.0.1:{free_port()}/core_db"
    code, out, err = await b24sync_command(core_settings, "users", "list", DATABASE_URL=nowhere)
    assert (code, out) == (1, "")
    assert err.strip().splitlines() == [err.strip()]
    assert "cannot reach PostgreSQL" in err
    assert "pa55word" not in err
