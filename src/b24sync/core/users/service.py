"""The rules of the users API. Never commits: a write goes either to a session, whose owner
commits it, so the change and its outbox event land in one transaction (a create is a single
statement that writes both, see `UserRepository.create_many`, and so is the write of a group of
changes, see `apply_changes`); or to the app's groups of creates and of changes (`WriteGroups`),
which run on connections of their own, each statement a transaction."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, MutableSequence, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import phonenumbers
from sqlalchemy.ext.asyncio import AsyncSession

from b24sync.batching import Coalescer
from b24sync.contracts import Pattern
from b24sync.core.db import InSession, OnDriver, Statements, one_item_to_blame
from b24sync.core.exceptions import FieldValidationError, NotFoundError
from b24sync.core.models import OutboxEvent, SyncStatus, User
from b24sync.core.outbox import repository as outbox_repository
from b24sync.core.outbox.service import EventDraft, NewUserState, outbox_service
from b24sync.core.users.repository import (
    FRESH_SYNC_STATE,
    MAX_GROUP,
    NewUser,
    UserRepository,
    change_users,
    user_from_row,
)
from b24sync.core.users.schemas import UserCreate, UserMove, UserUpdate
from b24sync.settings import Settings

DEFAULT_STAGE = "NEW"
# Statements of a group of changes before the users changed meanwhile are locked
# (`apply_changes`): the read of a user not known, its write, and one more after a miss.
OPTIMISTIC_ROUNDS = 3


class UserNotFoundError(NotFoundError):
    def __init__(self, user_id: int) -> None:
        super().__init__(f"User {user_id} not found")


def normalize_phone(raw: str, region: str) -> str:
    """Parses a phone as a person would type it and returns it in E.164 (+77001112233)."""
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException as exc:
        raise FieldValidationError("phone", f"not a phone number: {exc}", raw) from exc
    if not phonenumbers.is_valid_number(number):
        raise FieldValidationError("phone", "not a valid phone number", raw)
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def check_stage(stage: str, settings: Settings) -> str:
    if stage not in settings.stages:
        raise FieldValidationError(
            "stage", f"unknown stage; allowed: {', '.join(settings.stages)}", stage
        )
    return stage


@dataclass(frozen=True, slots=True)
class WriteGroups:
    """The app's groups of writes from concurrent requests: creates (`grouped_creates`), and
    updates and moves (`grouped_changes`). A write given to them needs no session: its group's
    statement commits by itself, on a connection of the group's own."""

    creates: Coalescer[NewUser, User]
    changes: Coalescer[UserChange, User | None]


# Where a write goes: the app's groups, or a session's transaction (an import, a test).
WriteTarget = AsyncSession | WriteGroups


class UserService:
    async def create(self, writes: WriteTarget, settings: Settings, data: UserCreate) -> User:
        new = self.new_user(settings, data)
        if isinstance(writes, WriteGroups):
            return await writes.creates.submit(new)
        (user,) = await UserRepository(writes).create_many([new])
        return user

    async def create_many(self, session: AsyncSession, users: Sequence[NewUser]) -> list[User]:
        """Creates users checked by `new_user` (a page of an import) in one statement."""
        return await UserRepository(session).create_many(users)

    def new_user(self, settings: Settings, data: UserCreate) -> NewUser:
        """The user to create with its `user_created` event, once its phone and stage pass the
        rules (raises `FieldValidationError` otherwise)."""
        phone = normalize_phone(data.phone, settings.default_phone_region)
        stage = check_stage(data.stage or DEFAULT_STAGE, settings)
        new = NewUserState(full_name=data.full_name, phone=phone, stage=stage)
        event = outbox_service.draft(new, Pattern.USER_CREATED, settings.rabbitmq_reply_queue)
        return NewUser(data.full_name, phone, stage, event)

    async def get(self, session: AsyncSession, user_id: int) -> User:
        user = await UserRepository(session).get(user_id)
        if user is None:
            raise UserNotFoundError(user_id)
        return user

    async def list(
        self,
        session: AsyncSession,
        *,
        stage: str | None,
        sync_status: SyncStatus | None,
        page: int,
        limit: int,
        search: str | None = None,
    ) -> tuple[list[User], int, int]:
        users, total = await UserRepository(session).list(
            stage=stage,
            sync_status=sync_status.value if sync_status else None,
            limit=limit,
            offset=(page - 1) * limit,
            search=search,
        )
        return list(users), total, max(1, math.ceil(total / limit))

    async def history(
        self, session: AsyncSession, user_id: int, limit: int
    ) -> Sequence[OutboxEvent]:
        """The user's latest events, newest first, each with the answer it got."""
        await self.get(session, user_id)
        return await outbox_repository.history(session, user_id, limit)

    async def update(
        self, writes: WriteTarget, settings: Settings, user_id: int, data: UserUpdate
    ) -> User:
        changes: dict[str, Any] = {}
        if data.full_name is not None:
            changes["full_name"] = data.full_name
        if data.phone is not None:
            changes["phone"] = normalize_phone(data.phone, settings.default_phone_region)
        if data.stage is not None:
            changes["stage"] = check_stage(data.stage, settings)
        return await self._apply(writes, settings, user_id, changes, Pattern.USER_UPDATED)

    async def move(
        self, writes: WriteTarget, settings: Settings, user_id: int, data: UserMove
    ) -> User:
        changes = {"stage": check_stage(data.stage, settings)}
        return await self._apply(writes, settings, user_id, changes, Pattern.USER_MOVED)

    async def _apply(
        self,
        writes: WriteTarget,
        settings: Settings,
        user_id: int,
        values: dict[str, Any],
        pattern: Pattern,
    ) -> User:
        """A change with no values (an empty update) changes nothing and answers the user as
        it is, as any change to the values the user already has."""
        change = UserChange(user_id, values, pattern)
        if isinstance(writes, WriteGroups):
            user = await writes.changes.submit(change)
        else:
            (user,) = await self.apply_changes(InSession(writes), settings, [change])
        if user is None:
            raise UserNotFoundError(user_id)
        return user

    async def apply_changes(
        self,
        statements: Statements,
        settings: Settings,
        changes: Sequence[UserChange],
        known: RecentRows | None = None,
    ) -> Sequence[User | None]:
        """Applies updates and moves in the order given, each that changes something with its
        new version and event; each change's user as it left it (None: no such user).

        The changes are applied to the users' rows as known (`known`: as this process last
        wrote or read them), and the users written with their events in one statement that
        writes a user only if its row is still the one known, and reads the others. A user not
        known, or changed meanwhile, is changed again from the row read, in the next statement:
        one round trip for a group of users known, two for the others, and no lock held between
        them. After `OPTIMISTIC_ROUNDS` the users left are changed in a transaction, whose
        first statement locks them. In a transaction every statement locks its users, so the
        second cannot miss. Either way a user's events follow commit order."""
        results: MutableSequence[User | None] = [None] * len(changes)
        rows = known.get({change.user_id for change in changes}) if known is not None else {}

        async def rounds(most: int, waiting: list[int]) -> list[int]:
            for _ in range(most):
                if not waiting:
                    break
                waiting = await _change_round(statements, settings, changes, waiting, rows, results)
            return waiting

        waiting = await rounds(OPTIMISTIC_ROUNDS, list(range(len(changes))))
        if waiting:
            # The first statement locks the users left, so the second cannot miss.
            async with statements.transaction():
                waiting = await rounds(2, waiting)
            if waiting:
                raise RuntimeError(f"{len(waiting)} changes of locked users were not written")
        if known is not None:
            known.put(rows)
        return results


async def _change_round(
    statements: Statements,
    settings: Settings,
    changes: Sequence[UserChange],
    waiting: list[int],
    rows: dict[int, dict[str, Any]],
    results: MutableSequence[User | None],
) -> list[int]:
    """Applies the `waiting` changes (indexes into `changes`) of the users whose `rows` are
    known, writes them and reads the users not known, in one statement; fills in the
    `results` of the changes done, and returns those to apply again, to the row read (put in
    `rows`). A user written gets its new row in `rows`; a user that does not exist leaves it."""
    # Each user as the changes so far left it, built once for its event and its answers.
    current: dict[int, User] = {}
    answers: dict[int, User] = {}
    events: list[tuple[int, EventDraft]] = []
    held: list[int] = []
    for n in waiting:
        change = changes[n]
        row = rows.get(change.user_id)
        if row is None:
            continue
        after = changed_row(row, change.values)
        if after is not None:
            pattern = change.pattern
            # A Bitrix service that needs the lead id for an update or a move (hold mode)
            # cannot use them while the user's create has failed: the change goes as a
            # create instead, carrying every field, in place of the changes held back.
            if (
                settings.hold_until_lead_id
                and row["bitrix_lead_id"] is None
                and row["sync_status"] == SyncStatus.FAILED.value
            ):
                held.append(change.user_id)
                pattern = Pattern.USER_CREATED
            rows[change.user_id] = after
            current[change.user_id] = user = user_from_row(after)
            draft = outbox_service.draft(user, pattern, settings.rabbitmq_reply_queue)
            events.append((change.user_id, draft))
        elif change.user_id not in current:
            current[change.user_id] = user_from_row(row)
        answers[n] = current[change.user_id]
    user_ids = list(dict.fromkeys(changes[n].user_id for n in waiting))
    changed_ids = dict.fromkeys(user_id for user_id, _ in events)
    changed = [rows[user_id] for user_id in changed_ids]
    outcome = await change_users(statements, user_ids, changed, events, held)
    for user_id, (updated_at, row_version) in outcome.written.items():
        rows[user_id].update(updated_at=updated_at, row_version=row_version)
    left = []
    for n in waiting:
        user_id = changes[n].user_id
        now = outcome.current.get(user_id)
        if user_id in outcome.written:
            user = answers[n]
            if user.updated_at is None:
                # Filled the way `user_from_row` fills a user, without attribute events.
                user.__dict__["updated_at"] = rows[user_id]["updated_at"]
            results[n] = user
        elif now is None:
            rows.pop(user_id, None)  # no such user
        elif (
            n in answers
            and user_id not in changed_ids
            and now["row_version"] == rows[user_id]["row_version"]
        ):
            results[n] = answers[n]  # changes nothing, to the row as it is
        else:
            left.append(n)
    for n in left:
        rows[changes[n].user_id] = outcome.current[changes[n].user_id]
    return left


def changed_row(row: dict[str, Any], values: dict[str, Any]) -> dict[str, Any] | None:
    """The user's row after a change of some of its fields to `values`: a new version, which
    each field whose value differs gets too, and the sync state afresh; the time of the write
    (`updated_at`) not known yet. None when no value differs."""
    differs = [field for field, value in values.items() if value != row[field]]
    if not differs:
        return None
    version = row["version"] + 1
    return {
        **row,
        **{field: values[field] for field in differs},
        **{f"{field}_version": version for field in differs},
        "version": version,
        "sync_status": SyncStatus.PENDING.value,
        **FRESH_SYNC_STATE,
        "updated_at": None,
    }


class RecentRows:
    """The rows of users this process's groups of changes last wrote or read, each with its
    row version: up to `size`, none older than `max_age_s`. A row may be out of date (written
    since by a reply, or by another process); it only spares the read of a user whose row is
    still the one known, and the write's row-version check decides that. The age limit keeps a
    row version from outliving PostgreSQL's reuse of transaction ids."""

    def __init__(self, size: int, max_age_s: float = 60.0) -> None:
        self.size = size
        self.max_age_s = max_age_s
        self._rows: dict[int, tuple[float, dict[str, Any]]] = {}

    def get(self, user_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """The rows known of `user_ids`, by id (not to be changed: put a new row instead)."""
        oldest = time.monotonic() - self.max_age_s
        found = {}
        for user_id in user_ids:
            entry = self._rows.get(user_id)
            if entry is not None and entry[0] > oldest:
                found[user_id] = entry[1]
        return found

    def put(self, rows: dict[int, dict[str, Any]]) -> None:
        """Keeps `rows` (each as it is in the database now), the oldest dropped past `size`."""
        now = time.monotonic()
        for user_id, row in rows.items():
            self._rows.pop(user_id, None)
            self._rows[user_id] = (now, row)
        while len(self._rows) > self.size:
            del self._rows[next(iter(self._rows))]


@dataclass(frozen=True, slots=True)
class UserChange:
    """An update or a move: new values of some of the user's fields."""

    user_id: int
    values: dict[str, Any]
    pattern: Pattern


def grouped_changes(pool: asyncpg.Pool, settings: Settings) -> Coalescer[UserChange, User | None]:
    """Updates and moves from concurrent requests, applied together: one statement that writes
    the group's users whose rows this process knows, with their events, and reads the others
    for a second one; no transaction left open between them. Each caller still answers only
    after its own change is committed; a change the database refuses is tried again alone, so
    it fails only its own request."""

    # Off (0): no rows kept, nor put and dropped again after every group.
    known = RecentRows(settings.change_row_cache) if settings.change_row_cache else None

    async def apply(changes: list[UserChange]) -> list[User | None]:
        async with pool.acquire() as driver:
            return list(
                await user_service.apply_changes(OnDriver(driver), settings, changes, known)
            )

    return Coalescer(
        apply,
        max_in_flight=settings.change_groups_in_flight,
        max_items=MAX_GROUP,
        retry_alone=one_item_to_blame,
    )


user_service = UserService()
