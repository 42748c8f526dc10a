"""Recording events: the one place a user change becomes a message for the Bitrix service."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID, uuid4

from b24sync.contracts import ACTION_BY_PATTERN, Pattern, UserField, event_body
from b24sync.core.db import Statements
from b24sync.core.models import User
from b24sync.core.outbox import repository


class UserState(Protocol):
    """What an event is built from: a user's row, or a new user's values (`NewUserState`)."""

    @property
    def id(self) -> int: ...
    @property
    def full_name(self) -> str: ...
    @property
    def phone(self) -> str: ...
    @property
    def stage(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def bitrix_lead_id(self) -> int | None: ...
    @property
    def synced_version(self) -> int | None: ...
    @property
    def full_name_version(self) -> int: ...
    @property
    def phone_version(self) -> int: ...
    @property
    def stage_version(self) -> int: ...
    @property
    def sync_force(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class NewUserState:
    """A user about to be inserted: version 1, nothing confirmed, no lead. Its id is assigned
    by the insert, which writes it into the stored event (`UserRepository.create_many`); until
    then the event carries a stand-in."""

    full_name: str
    phone: str
    stage: str
    id: int = 1
    version: int = 1
    bitrix_lead_id: int | None = None
    synced_version: int | None = None
    full_name_version: int = 1
    phone_version: int = 1
    stage_version: int = 1
    sync_force: bool = False


def changed_fields(user: UserState, *, force: bool = False) -> list[UserField]:
    """The fields an event for the user's current version carries: those changed since the
    version Bitrix24 last confirmed (changes of failed or unanswered events included), and all
    of them when none was confirmed yet or the whole user is restated."""
    if force or user.synced_version is None:
        return list(UserField)
    return [
        field
        for field in UserField
        if getattr(user, f"{field.value}_version") > user.synced_version
    ]


def user_fields(user: UserState) -> dict[str, Any]:
    """The user's own fields, as an event carries them and as the API answers them."""
    return {
        "id": user.id,
        "full_name": user.full_name,
        "phone": user.phone,
        "stage": user.stage,
        "bitrix_lead_id": user.bitrix_lead_id,
        "version": user.version,
    }


def build_event(
    user: UserState, pattern: Pattern, reply_queue: str, *, force: bool = False
) -> dict[str, Any]:
    """The body of the event for the user as it is now."""
    force = force or user.sync_force
    return event_body(
        pattern.value,
        ACTION_BY_PATTERN[pattern].value,
        user_fields(user),
        reply_queue,
        [field.value for field in changed_fields(user, force=force)],
        force=force,
    )


@dataclass(frozen=True, slots=True)
class EventDraft:
    id: UUID
    pattern: Pattern
    version: int
    body: dict[str, Any]


class OutboxService:
    def draft(
        self, user: UserState, pattern: Pattern, reply_queue: str, *, force: bool = False
    ) -> EventDraft:
        body = build_event(user, pattern, reply_queue, force=force)
        return EventDraft(uuid4(), pattern, user.version, body)

    async def record(
        self,
        statements: Statements,
        changes: Sequence[tuple[User, Pattern]],
        reply_queue: str,
        *,
        force: bool = False,
    ) -> list[UUID]:
        """Adds an event for each user, in the order given, to the caller's transaction: they
        commit (or not) with the change."""
        drafts = [
            (user.id, self.draft(user, pattern, reply_queue, force=force))
            for user, pattern in changes
        ]
        await repository.add(statements, drafts)
        return [draft.id for _, draft in drafts]

    async def supersede_held(self, statements: Statements, user_ids: Sequence[int]) -> None:
        """Held-back updates and moves of users now sent as a create are never sent: the
        create carries their changes (see `hold_until_lead_id`)."""
        await repository.supersede_held(statements, user_ids)


outbox_service = OutboxService()
