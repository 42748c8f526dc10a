"""The rules of the users API. Never commits: the request's session does, so the change and
its outbox event land in one transaction (a create is a single statement that writes both, see
`UserRepository.create_many`, and so is the write of a group of changes, see
`apply_changes`); the app's groups of creates and of changes run on connections of their own,
each statement a transaction (`grouped_creates`, `grouped_changes`)."""

from __future__ import annotations

import math
from collections.abc import MutableSequence, Sequence
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
    GROUPED_CREATES,
    MAX_GROUP,
    NewUser,
    UserRepository,
    read_for_change,
    user_from_row,
    write_changes,
)
from b24sync.core.users.schemas import UserCreate, UserMove, UserUpdate
from b24sync.settings import Settings

DEFAULT_STAGE = "NEW"
# Key of the app's group of updates and moves in `Session.info` (see `grouped_changes`).
GROUPED_CHANGES = "grouped_changes"
# Rounds of a group of changes before the users changed meanwhile are locked (`apply_changes`).
OPTIMISTIC_TRIES = 2


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


class UserService:
    async def create(self, session: AsyncSession, settings: Settings, data: UserCreate) -> User:
        """With the app's create group in the session (`grouped_creates`), the statement is
        shared with concurrent creates and commits by itself; otherwise it runs in the
        session's transaction."""
        new = self.new_user(settings, data)
        group: Coalescer[NewUser, User] | None = session.info.get(GROUPED_CREATES)
        if group is not None:
            return await group.submit(new)
        (user,) = await UserRepository(session).create_many([new])
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
        self, session: AsyncSession, settings: Settings, user_id: int, data: UserUpdate
    ) -> User:
        changes: dict[str, Any] = {}
        if data.full_name is not None:
            changes["full_name"] = data.full_name
        if data.phone is not None:
            changes["phone"] = normalize_phone(data.phone, settings.default_phone_region)
        if data.stage is not None:
            changes["stage"] = check_stage(data.stage, settings)
        return await self._apply(session, settings, user_id, changes, Pattern.USER_UPDATED)

    async def move(
        self, session: AsyncSession, settings: Settings, user_id: int, data: UserMove
    ) -> User:
        changes = {"stage": check_stage(data.stage, settings)}
        return await self._apply(session, settings, user_id, changes, Pattern.USER_MOVED)

    async def _apply(
        self,
        session: AsyncSession,
        settings: Settings,
        user_id: int,
        values: dict[str, Any],
        pattern: Pattern,
    ) -> User:
        if not values:
            return await self.get(session, user_id)
        change = UserChange(user_id, values, pattern)
        group: Coalescer[UserChange, User | None] | None = session.info.get(GROUPED_CHANGES)
        if group is not None:
            user = await group.submit(change)
        else:
            (user,) = await self.apply_changes(InSession(session), settings, [change])
        if user is None:
            raise UserNotFoundError(user_id)
        return user

    async def apply_changes(
        self, statements: Statements, settings: Settings, changes: Sequence[UserChange]
    ) -> Sequence[User | None]:
        """Applies updates and moves in the order given, each that changes something with its
        new version and event; each change's user as it left it (None: no such user).

        The users are read, the changes applied to what was read, and the users written with
        their events in one statement that writes a user only if its row is still the one read.
        Without a transaction that is two round trips and no lock held between them; the
        changes of a user changed meanwhile are applied again to its new row, after
        `OPTIMISTIC_TRIES` in a transaction that locks it. In a transaction the read locks the
        users, so the write cannot miss. Either way a user's events follow commit order."""
        results: MutableSequence[User | None] = [None] * len(changes)
        waiting = list(range(len(changes)))
        for _ in range(OPTIMISTIC_TRIES):
            waiting = await _change_round(statements, settings, changes, waiting, results)
            if not waiting:
                return results
        async with statements.transaction():
            waiting = await _change_round(statements, settings, changes, waiting, results)
        if waiting:
            raise RuntimeError(f"{len(waiting)} changes of locked users were not written")
        return results


async def _change_round(
    statements: Statements,
    settings: Settings,
    changes: Sequence[UserChange],
    waiting: list[int],
    results: MutableSequence[User | None],
) -> list[int]:
    """Applies the `waiting` changes (indexes into `changes`) to the users as read, fills
    in their `results`, and returns those of users changed meanwhile, to apply again."""
    rows = await read_for_change(
        statements,
        list({changes[n].user_id for n in waiting}),
        lock=statements.in_transaction,
    )
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
    changed = {user_id: rows[user_id] for user_id, _ in events}
    written = (
        await write_changes(statements, list(changed.values()), events, held) if changed else {}
    )
    left = []
    for n, user in answers.items():
        user_id = changes[n].user_id
        if user_id in changed and user_id not in written:
            left.append(n)
            continue
        if user.updated_at is None:
            # Filled the way `user_from_row` fills a user, without attribute events.
            user.__dict__["updated_at"] = written[user_id]
        results[n] = user
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


@dataclass(frozen=True, slots=True)
class UserChange:
    """An update or a move: new values of some of the user's fields."""

    user_id: int
    values: dict[str, Any]
    pattern: Pattern


def grouped_changes(pool: asyncpg.Pool, settings: Settings) -> Coalescer[UserChange, User | None]:
    """Updates and moves from concurrent requests, applied together: one read of the group's
    users and one statement that writes them with their events, two round trips for the group
    and no transaction left open between them. Each caller still answers only after its own
    change is committed; a change the database refuses is tried again alone, so it fails only
    its own request."""

    async def apply(changes: list[UserChange]) -> list[User | None]:
        async with pool.acquire() as driver:
            return list(await user_service.apply_changes(OnDriver(driver), settings, changes))

    return Coalescer(
        apply,
        max_in_flight=settings.change_groups_in_flight,
        max_items=MAX_GROUP,
        retry_alone=one_item_to_blame,
    )


user_service = UserService()
