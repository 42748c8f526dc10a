"""The rules of the users API. Never commits: the request's session does, so the change and
its outbox event land in one transaction (a create is a single statement that writes both, see
`UserRepository.create_many`); the app's groups of creates and of changes commit by
themselves (`grouped_creates`, `grouped_changes`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import phonenumbers
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from b24sync.batching import Coalescer
from b24sync.contracts import Pattern
from b24sync.core.db import committing, one_item_to_blame
from b24sync.core.exceptions import FieldValidationError, NotFoundError
from b24sync.core.models import OutboxEvent, SyncStatus, User
from b24sync.core.outbox import repository as outbox_repository
from b24sync.core.outbox.service import NewUserState, outbox_service
from b24sync.core.users.repository import GROUPED_CREATES, MAX_GROUP, NewUser, UserRepository
from b24sync.core.users.schemas import UserCreate, UserMove, UserUpdate
from b24sync.settings import Settings

DEFAULT_STAGE = "NEW"
# Key of the app's group of updates and moves in `Session.info` (see `grouped_changes`).
GROUPED_CHANGES = "grouped_changes"


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
            (user,) = await self.apply_changes(session, settings, [change])
        # None: nothing changed (no new version, nothing for Bitrix24 to do), or no such user.
        return user if user is not None else await self.get(session, user_id)

    async def apply_changes(
        self, session: AsyncSession, settings: Settings, changes: Sequence[UserChange]
    ) -> Sequence[User | None]:
        """Applies updates and moves in the order given, each with its event, in the session's
        transaction; each change's user as changed, or None when it changed nothing. The
        users stay locked until the commit, so a user's events follow commit order."""
        changed = await UserRepository(session).change_fields(
            [(change.user_id, change.values) for change in changes]
        )
        users: list[User | None] = []
        events: list[tuple[User, Pattern]] = []
        for change, result in zip(changes, changed, strict=True):
            users.append(result.user if result is not None else None)
            if result is None:
                continue
            # A Bitrix service that needs the lead id for an update or a move (hold mode)
            # cannot use them while the user's create has failed: the change goes as a create
            # instead, carrying every field, in place of the changes held back.
            if (
                settings.hold_until_lead_id
                and result.user.bitrix_lead_id is None
                and result.sync_status_before == SyncStatus.FAILED.value
            ):
                await outbox_service.supersede_held(session, [result.user.id])
                events.append((result.user, Pattern.USER_CREATED))
            else:
                events.append((result.user, change.pattern))
        await outbox_service.record(session, events, settings.rabbitmq_reply_queue)
        return users


@dataclass(frozen=True, slots=True)
class UserChange:
    """An update or a move: new values of some of the user's fields."""

    user_id: int
    values: dict[str, Any]
    pattern: Pattern


def grouped_changes(
    sessionmaker: async_sessionmaker[AsyncSession], settings: Settings
) -> Coalescer[UserChange, User | None]:
    """Updates and moves from concurrent requests, applied together: one transaction, one
    `UPDATE` and one insert of events for the group instead of four round trips each. Each
    caller still answers only after its own change is committed; a change the database
    refuses is tried again alone, so it fails only its own request."""

    async def apply(changes: list[UserChange]) -> list[User | None]:
        async with committing(sessionmaker) as session:
            return list(await user_service.apply_changes(session, settings, changes))

    return Coalescer(
        apply,
        max_in_flight=settings.change_groups_in_flight,
        max_items=MAX_GROUP,
        retry_alone=one_item_to_blame,
    )


user_service = UserService()
