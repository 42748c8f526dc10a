"""`b24sync import FILE.csv`: every row checked by the API's rules first, then the users created
with their events, once only however often the file is loaded, and followed to Bitrix24."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.core.users.import_command import BadRow, FileError, check_file
from b24sync.settings import Settings
from tests.conftest import eventually
from tests.core.helpers import answer, events_of, publish_all, success
from tests.processes import finished, start_command

Sessions = async_sessionmaker[AsyncSession]

GOOD = "full_name,phone,stage\nИван Иванов,+77001112233,NEW\nПётр Петров,87001112244,\n"


def csv_file(tmp_path: Path, content: str, *, bom: bool = False) -> Path:
    path = tmp_path / "users.csv"
    path.write_bytes(("\ufeff" if bom else "").encode() + content.encode())
    return path


async def start_import(settings: Settings, path: Path, *args: str) -> asyncio.subprocess.Process:
    return await start_command(settings, "import", str(path), *args)


async def users_in(sessions: Sessions) -> list[tuple[int, str, str, str]]:
    async with sessions() as session:
        rows = await session.execute(
            text("SELECT id, full_name, phone, stage FROM users ORDER BY id")
        )
        return [(row[0], row[1], row[2], row[3]) for row in rows]


@pytest.mark.parametrize("bom", [False, True], ids=["plain", "bom"])
def test_rows_are_checked_by_the_api_rules(
    core_settings: Settings, tmp_path: Path, bom: bool
) -> None:
    checked = check_file(csv_file(tmp_path, GOOD, bom=bom), core_settings)
    assert checked.bad == []
    assert [(line, u.full_name, u.phone, u.stage) for line, u in checked.users] == [
        (2, "Иван Иванов", "+77001112233", "NEW"),
        (3, "Пётр Петров", "+77001112244", "NEW"),  # region KZ, default stage
    ]
    # Each user carries its create event, as from POST /users.
    assert checked.users[0][1].event.body["data"]["action"] == "create_card"


def test_every_bad_row_is_reported_with_its_line_and_column(
    core_settings: Settings, tmp_path: Path
) -> None:
    content = (
        "phone,full_name\n"  # any order; stage left out
        "+77001112233,Иван\n"
        "+77001112233,\n"
        "abc,Пётр\n"
        '+77001112255,"Анна\nСмирнова"\n'
        "+77001112266,Олег,extra\n"
        ",Мария\n"
    )
    checked = check_file(csv_file(tmp_path, content), core_settings)
    assert checked.bad == [
        BadRow(3, "full_name", "String should have at least 1 character"),
        BadRow(
            4,
            "phone",
            "not a phone number: (1) The string supplied did not seem to be a phone number.",
        ),
        BadRow(5, "full_name", "must not contain control characters"),
        BadRow(7, "-", "more values than columns"),
        BadRow(8, "phone", "String should have at least 1 character"),
    ]
    assert [line for line, _ in checked.users] == [2]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty"),
        (b"name,phone\nX,+77001112233\n", "unknown column(s) 'name'; missing full_name"),
        (b"full_name,phone\nX,+77001112233\n\xff\xfe,+77001112233\n", "line 3 is not UTF-8"),
    ],
)
def test_a_file_that_cannot_be_read_is_refused(
    core_settings: Settings, tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "users.csv"
    path.write_bytes(content)
    with pytest.raises(FileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_file(path, core_settings)


async def test_one_bad_row_and_nothing_is_loaded(
    core_settings: Settings, committed: Sessions, tmp_path: Path
) -> None:
    path = csv_file(tmp_path, GOOD + "Анна,+77001112255,LOST\n")
    code, out, err = await finished(await start_import(core_settings, path, "--no-wait"))
    assert code == 1
    assert out.splitlines() == [
        "line 4, stage: unknown stage; allowed: NEW, IN_PROCESS, PROCESSED, JUNK, CONVERTED"
    ]
    assert err.splitlines() == [f"b24sync import: 1 bad row(s) in {path}; nothing was loaded"]
    assert await users_in(committed) == []


async def test_loading_the_same_file_again_creates_nobody_twice(
    core_settings: Settings, committed: Sessions, tmp_path: Path
) -> None:
    path = csv_file(tmp_path, GOOD + "Иван Иванов,+7 700 111 22 33,NEW\n")  # a repeat
    code, out, err = await finished(await start_import(core_settings, path, "--no-wait"))
    assert (code, err) == (0, "")
    assert "Created 2 user(s), skipped 1 already there" in out
    users = await users_in(committed)
    assert [user[1:] for user in users] == [
        ("Иван Иванов", "+77001112233", "NEW"),
        ("Пётр Петров", "+77001112244", "NEW"),
    ]
    for user_id, *_ in users:
        [created] = await events_of(committed, user_id)
        assert created.pattern == "user_created"
        assert created.body["data"]["replyQueue"] == core_settings.rabbitmq_reply_queue

    code, out, _ = await finished(await start_import(core_settings, path, "--no-wait"))
    assert code == 0
    assert "Created 0 user(s), skipped 3 already there" in out
    assert await users_in(committed) == users


async def test_the_command_follows_the_users_until_bitrix24_has_them(
    core_settings: Settings, committed: Sessions, tmp_path: Path
) -> None:
    process = await start_import(core_settings, csv_file(tmp_path, GOOD))

    async def loaded() -> bool:
        return len(await users_in(committed)) == 2

    await eventually(loaded, wait_s=30)
    await publish_all(committed)
    for user_id, *_ in await users_in(committed):
        [created] = await events_of(committed, user_id)
        await answer(committed, core_settings, success(user_id, 1), created.id)
    code, out, err = await finished(process)
    assert (code, err) == (0, "")
    assert "Bitrix24: 2 synced, 0 failed" in out
