"""The rules of the users API. Never commits: the request's session does, so the change and
its outbox event land in one transaction (a create is a single statement that writes both, see
`UserRepository.create`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import phonenumbers
from sqlalchemy.ext.asyncio import AsyncSession

from b24sync.contracts import Pattern
from b24sync.core.exceptions import FieldValidationError, NotFoundError
from b24sync.core.models import OutboxEvent, SyncStatus, User
from b24sync.core.outbox import repository as outbox_repository
from b24sync.core.outbox.service import NewUserState, outbox_service
from b24sync.core.users.repository import NewUser, UserRepository
from b24sync.core.users.schemas import UserCreate, UserMove, UserUpdate
from b24sync.settings import Settings

DEFAULT_STAGE = "NEW"


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
        return await UserRepository(session).create(self.new_user(settings, data))

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
        changes: dict[str, Any],
        pattern: Pattern,
    ) -> User:
        if not changes:
            return await self.get(session, user_id)
        repository = UserRepository(session)
        before: User | None = None
        create_failed = False
        if settings.hold_until_lead_id:
            # A Bitrix service that needs the lead id for an update or a move (hold mode)
            # cannot use them while the user's create has failed: the change goes as a create
            # instead, carrying every field, in place of the changes held back. The user is
            # locked first, so that the state this depends on holds until the commit.
            before = await repository.get(user_id, for_update=True)
            if before is None:
                raise UserNotFoundError(user_id)
            create_failed = (
                before.bitrix_lead_id is None and before.sync_status == SyncStatus.FAILED.value
            )
        # The update locks the user: its changes, and so its events, follow commit order.
        user = await repository.update_fields(user_id, changes)
        if user is None:
            # Nothing changed (no new version, nothing for Bitrix24 to do), or no such user.
            return before if before is not None else await self.get(session, user_id)
        if create_failed:
            pattern = Pattern.USER_CREATED
            await outbox_service.supersede_held(session, [user_id])
        await outbox_service.record(session, [(user, pattern)], settings.rabbitmq_reply_queue)
        return user


user_service = UserService()
