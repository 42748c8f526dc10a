"""`b24sync import FILE.csv`: an existing user base loaded into Core, straight through the
database (Core need not run; its relay publishes the events), then followed until Bitrix24
has every user.

The file: UTF-8 (with or without a byte order mark), a header row, columns `full_name`,
`phone` and optionally `stage` (empty: NEW). Every row is checked first, by the rules of
`POST /users`; one bad row and nothing is loaded, the bad rows listed (line, column, message).

Loading again the same file (after Ctrl-C, say) creates nobody twice: a row whose name and
phone (as stored, E.164) already belong to a user is skipped, and so is a row repeating an
earlier row of the file. So a user created by the API with the same name and phone is not
created again either.
"""

from __future__ import annotations

import asyncio
import csv
import io
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from b24sync.core.db import create_engine, create_sessionmaker
from b24sync.core.exceptions import FieldValidationError
from b24sync.core.migrate import check_database
from b24sync.core.sync.progress import follow_sync
from b24sync.core.users.repository import NewUser, UserRepository
from b24sync.core.users.schemas import UserCreate
from b24sync.core.users.service import user_service
from b24sync.settings import Settings

COLUMNS = ("full_name", "phone", "stage")
REQUIRED_COLUMNS = ("full_name", "phone")
# Rows written by one statement and one commit.
PAGE_SIZE = 500
# Bad rows listed in full; the others are counted.
MAX_LISTED = 50
# Exit statuses: loaded; bad rows (nothing loaded); bad file or command line; interrupted.
OK, BAD_ROWS, USAGE, INTERRUPTED = 0, 1, 2, 130


class FileError(ValueError):
    """The file as a whole cannot be read: missing, not UTF-8, no header, unknown columns."""


@dataclass(frozen=True)
class BadRow:
    line: int
    column: str
    message: str


@dataclass
class Checked:
    users: list[tuple[int, NewUser]] = field(default_factory=list)  # (line, user)
    bad: list[BadRow] = field(default_factory=list)


@dataclass
class Loaded:
    created: int = 0
    skipped: int = 0
    user_ids: list[int] = field(default_factory=list)  # created and found, for the wait


def check_file(path: Path, settings: Settings) -> Checked:
    """Reads and checks every row; raises `FileError` for a file that cannot be read at all."""
    checked = Checked()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FileError(f"{path}: a directory, not a CSV file") from None
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise FileError(f"{path}: line {line} is not UTF-8; save the file as UTF-8") from None
    try:
        reader = csv.DictReader(io.StringIO(content, newline=""))
        _check_header(reader.fieldnames)
        line = reader.line_num + 1  # where the next row starts
        for row in reader:
            _check_row(line, row, settings, checked)
            line = reader.line_num + 1
    except csv.Error as exc:
        raise FileError(f"{path}: not a CSV file ({exc})") from None
    return checked


def _check_header(names: object) -> None:
    if not isinstance(names, list) or not names:
        raise FileError("the file is empty; the first line must be a header: full_name,phone,stage")
    found = [name.strip() for name in names]
    unknown = [name for name in found if name not in COLUMNS]
    missing = [name for name in REQUIRED_COLUMNS if name not in found]
    if unknown or missing:
        problems = [f"unknown column(s) {', '.join(map(repr, unknown))}" if unknown else "",
                    f"missing {', '.join(missing)}" if missing else ""]  # fmt: skip
        raise FileError(
            f"header: {'; '.join(p for p in problems if p)} "
            f"(the columns are {', '.join(COLUMNS)}; stage may be left out)"
        )


def _check_row(
    line: int, row: dict[str | None, object], settings: Settings, checked: Checked
) -> None:
    if None in row:
        checked.bad.append(BadRow(line, "-", "more values than columns"))
        return
    values = {str(key).strip(): value for key, value in row.items()}
    data = {
        "full_name": values.get("full_name") or "",
        "phone": values.get("phone") or "",
        "stage": values.get("stage") or None,
    }
    try:
        user = user_service.new_user(settings, UserCreate.model_validate(data))
    except ValidationError as exc:
        for error in exc.errors():
            column = str(error["loc"][0]) if error["loc"] else "-"
            checked.bad.append(BadRow(line, column, error["msg"].removeprefix("Value error, ")))
    except FieldValidationError as exc:
        checked.bad.append(BadRow(line, exc.field, exc.field_message))
    else:
        checked.users.append((line, user))


def report(bad: list[BadRow]) -> None:
    for row in bad[:MAX_LISTED]:
        print(f"line {row.line}, {row.column}: {row.message}")
    if len(bad) > MAX_LISTED:
        print(f"... and {len(bad) - MAX_LISTED} more")


async def load(settings: Settings, users: list[NewUser], loaded: Loaded, console: Console) -> None:
    """Creates the users a page per transaction, skipping those already there (by name and
    phone); `loaded` counts as it goes, so an interrupted load still says what it did."""
    await check_database(settings)
    engine = create_engine(settings)
    try:
        sessions = create_sessionmaker(engine)
        columns = (TextColumn("Loading"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("", total=len(users))
            for start in range(0, len(users), PAGE_SIZE):
                page = users[start : start + PAGE_SIZE]
                async with sessions() as session, session.begin():
                    repository = UserRepository(session)
                    existing = await repository.ids_by_name_and_phone([u.phone for u in page])
                    new: list[NewUser] = []
                    found: list[int] = []
                    seen: set[tuple[str, str]] = set()  # a row repeating one of the page
                    for user in page:
                        key = (user.full_name, user.phone)
                        if key in existing:
                            found.append(existing[key])
                        elif key not in seen:
                            new.append(user)
                        seen.add(key)
                    created = await user_service.create_many(session, new) if new else []
                # Committed: counted only now.
                loaded.user_ids += found + [user.id for user in created]
                loaded.created += len(created)
                loaded.skipped += len(page) - len(new)
                progress.advance(task, len(page))
    finally:
        await engine.dispose()


async def wait_for_sync(settings: Settings, user_ids: list[int], console: Console) -> None:
    engine = create_engine(settings)
    try:
        await follow_sync(create_sessionmaker(engine), user_ids, console)
    finally:
        await engine.dispose()


def run(settings: Settings, path: Path, *, wait: bool) -> int:
    """Returns the exit status; problems with the file are one line on stderr (a database
    that cannot be used raises `StartupError`, printed by the command line)."""
    console = Console()
    started = time.monotonic()
    try:
        checked = check_file(path, settings)
    except FileError as exc:
        print(f"b24sync import: {exc}", file=sys.stderr)
        return USAGE
    if checked.bad:
        report(checked.bad)
        lines = len({row.line for row in checked.bad})
        print(f"b24sync import: {lines} bad row(s) in {path}; nothing was loaded", file=sys.stderr)
        return BAD_ROWS
    console.print(f"{len(checked.users)} row(s) checked.", markup=False)
    loaded = Loaded()
    try:
        asyncio.run(load(settings, [user for _, user in checked.users], loaded, console))
        console.print(
            f"Created {loaded.created} user(s), skipped {loaded.skipped} already there "
            f"in {time.monotonic() - started:.1f}s.",
            markup=False,
        )
        if wait and loaded.user_ids:
            asyncio.run(wait_for_sync(settings, sorted(set(loaded.user_ids)), console))
    except KeyboardInterrupt:
        console.print(
            f"Interrupted after creating {loaded.created} user(s); running the same command "
            "again goes on, creating nobody twice.",
            markup=False,
        )
        return INTERRUPTED
    return OK
