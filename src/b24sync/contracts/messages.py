"""Messages on RabbitMQ, in the NestJS envelope the seed's own system uses.

Core -> ``bitrix_queue``::

    {"pattern": "user_created", "data": {"action": "create_card", "user": {...},
     "replyQueue": "bitrix.responses"}}

Bitrix -> the reply queue::

    {"pattern": "bitrix.responses", "data": {"status": "success", "action": "create_card",
     "user": {...}, "user_id": 123, "bitrix_lead_id": 456, "attempts": 1}}

Producers outside this project (the seed's NestJS Core) send no ``message_id`` and no
``user.version``; every added field is therefore optional on the way in. The original NestJS
Bitrix service replies with ``user_id`` instead of a ``user`` object and puts the reason of a
final failure under ``error``; `ReplyData` reads both shapes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_REPLY_QUEUE = "bitrix.responses"
REPLY_PATTERN = "bitrix.responses"

# Ids are PostgreSQL bigints: anything outside 1..2^63-1 cannot be one of Core's users.
MAX_ID = 2**63 - 1
# Versions are PostgreSQL integers.
MAX_VERSION = 2**31 - 1
# Field bounds on the wire: Core's own limits (a name of 200, an E.164 phone, a stage id), with
# room for foreign producers; an event beyond them is refused, never turned into a lead.
MAX_NAME_CHARS = 200
MAX_PHONE_CHARS = 64
MAX_STAGE_CHARS = 64
# A reply's reason is cut to this length, never refused for it: the answer matters more.
MAX_REASON_CHARS = 2000


class Pattern(StrEnum):
    USER_CREATED = "user_created"
    USER_UPDATED = "user_updated"
    USER_MOVED = "user_moved"


class Action(StrEnum):
    CREATE_CARD = "create_card"
    UPDATE_CARD = "update_card"
    MOVE_CARD = "move_card"


ACTION_BY_PATTERN: dict[Pattern, Action] = {
    Pattern.USER_CREATED: Action.CREATE_CARD,
    Pattern.USER_UPDATED: Action.UPDATE_CARD,
    Pattern.USER_MOVED: Action.MOVE_CARD,
}


class UserField(StrEnum):
    """The user's fields a lead reflects (the names of `UserPayload`'s fields)."""

    FULL_NAME = "full_name"
    PHONE = "phone"
    STAGE = "stage"


class UserPayload(BaseModel):
    """The user as carried in events and echoed in replies.

    Only ``id`` is required: a reply must be able to echo a user that failed validation
    (the seed's "Missing phone number" reply has no phone).
    """

    model_config = ConfigDict(extra="ignore")

    id: int = Field(ge=1, le=MAX_ID)
    full_name: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    phone: str | None = Field(default=None, max_length=MAX_PHONE_CHARS)
    stage: str | None = Field(default=None, max_length=MAX_STAGE_CHARS)
    bitrix_lead_id: int | None = Field(
        default=None, ge=1, le=MAX_ID, description="The user's lead id, when Core knows it."
    )
    version: int | None = Field(
        default=None,
        ge=1,
        le=MAX_VERSION,
        description="Grows with every change of the user; an older version never overwrites "
        "a newer one. Absent from the seed's NestJS Core's events.",
    )

    def wire(self) -> dict[str, Any]:
        """The fields the sender actually set, so an echo looks like what came in."""
        return self.model_dump(mode="json", exclude_unset=True)


class EventData(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    action: Action
    user: UserPayload
    reply_queue: str = Field(
        default=DEFAULT_REPLY_QUEUE,
        alias="replyQueue",
        min_length=1,
        max_length=255,
        description="The queue the reply goes to; the Bitrix service answers only on its own "
        "configured reply queue.",
    )
    changed: list[UserField] | None = Field(
        default=None,
        description="The fields that changed since the version Bitrix24 last confirmed for "
        "this user, whatever the action: a write carries all of them, and only them (what a "
        "salesperson edited in Bitrix24 is left alone). Absent when the producer does not say "
        "(the seed's own Core): the action then decides (a create or an update writes every "
        "field it carries, a move the stage).",
    )
    force: bool = Field(
        default=False,
        description="Write the user even though a newer version was recorded: Core restates "
        "the user after the Bitrix service answered with a version Core never had.",
    )


class Event(BaseModel):
    model_config = ConfigDict(extra="ignore")

    pattern: Pattern
    data: EventData

    def wire(self) -> dict[str, Any]:
        changed = self.data.changed
        return event_body(
            self.pattern.value,
            self.data.action.value,
            self.data.user.wire(),
            self.data.reply_queue,
            None if changed is None else [field.value for field in changed],
            force=self.data.force,
        )


# The contract's order of the user's fields (UserPayload's declaration order).
_USER_KEYS = tuple(UserPayload.model_fields)


def event_body(
    pattern: str,
    action: str,
    user: Mapping[str, Any],
    reply_queue: str,
    changed: Sequence[str] | None,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """An event as it goes on the wire, its keys in the contract's order: the user's fields
    given in `user` (the others left out), `changed` when given, `force` only when set. The
    one place an event's body is laid out: `Event.wire`, Core's new events and the relay's
    copies of stored ones (built from values already checked, without the models' cost)."""
    data: dict[str, Any] = {
        "action": action,
        "user": {key: user[key] for key in _USER_KEYS if key in user},
        "replyQueue": reply_queue,
    }
    if changed is not None:
        data["changed"] = list(changed)
    if force:
        data["force"] = True
    return {"pattern": pattern, "data": data}


class ReplyStatus(StrEnum):
    SUCCESS = "success"
    ERROR = "error"


class ReplyData(BaseModel):
    """A reply, in this project's shape or the original NestJS Bitrix service's: the user as a
    ``user`` object or a bare ``user_id`` (at least one of them), the reason under ``reason``
    or ``error``."""

    model_config = ConfigDict(extra="ignore")

    status: ReplyStatus
    action: Action | None = None
    user: UserPayload | None = None
    user_id: int | None = Field(default=None, ge=1, le=MAX_ID)
    bitrix_lead_id: int | None = Field(default=None, ge=1, le=MAX_ID)
    attempts: int | None = Field(default=None, description="Attempts the job took.")
    reason: str | None = Field(
        default=None, description="Why it failed (or was skipped); `error` in the NestJS shape."
    )
    error_code: str | None = Field(
        default=None,
        description='Bitrix24\'s error code ("" for CRM business errors), or the Bitrix '
        "service's own (NETWORK_ERROR, TIMEOUT, ...).",
    )
    retryable: bool | None = Field(
        default=None,
        description="On an error: whether sending the same change again may succeed (network, "
        "timeout, 5xx, limits) or not before the user or the setup changes (validation, auth, "
        "scope). Absent when the sender does not say (the original NestJS service).",
    )
    skipped: bool | None = Field(
        default=None,
        description="A success that wrote nothing: the event was superseded by a newer one of "
        "the same user, or older than the version already applied. Proves nothing about the "
        "lead by itself.",
    )
    applied_version: int | None = Field(
        default=None,
        ge=1,
        description="On a skipped reply: the version the Bitrix service had already applied.",
    )

    @model_validator(mode="before")
    @classmethod
    def _read_nestjs_shape(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        reason = raw.get("reason")
        if reason is None and isinstance(raw.get("error"), str):
            reason = raw["error"]
        if isinstance(reason, str) and len(reason) > MAX_REASON_CHARS:
            reason = reason[: MAX_REASON_CHARS - 1] + "…"
        return {**raw, "reason": reason} if reason is not None else raw

    @model_validator(mode="after")
    def _names_one_user(self) -> ReplyData:
        if self.user is None and self.user_id is None:
            raise ValueError("a reply names its user by user.id or user_id")
        if self.user is not None and self.user_id is not None and self.user.id != self.user_id:
            raise ValueError(f"user.id {self.user.id} and user_id {self.user_id} disagree")
        return self

    @property
    def target_user_id(self) -> int:
        """The user the reply is about."""
        if self.user is not None:
            return self.user.id
        assert self.user_id is not None  # checked by the validator
        return self.user_id

    @property
    def version(self) -> int | None:
        """The user version the reply says it answers, when the sender tells."""
        return self.user.version if self.user is not None else None

    def wire(self) -> dict[str, Any]:
        body = self.model_dump(mode="json", exclude_none=True, exclude={"user"})
        if self.user is not None:
            body["user"] = self.user.wire()
        body.setdefault("user_id", self.target_user_id)
        return body


class Reply(BaseModel):
    pattern: str = REPLY_PATTERN
    data: ReplyData

    def wire(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "data": self.data.wire()}


class MalformedMessageError(ValueError):
    """A message body that is not JSON or does not match the schema."""


def parse_reply(body: bytes | str) -> ReplyData:
    """Reads a reply sent either inside the NestJS envelope or bare (the ``data`` object alone)."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessageError(f"reply is not JSON: {exc}") from exc
    if isinstance(raw, dict) and isinstance(raw.get("data"), dict) and "status" not in raw:
        raw = raw["data"]
    try:
        return ReplyData.model_validate(raw)
    except ValidationError as exc:
        raise MalformedMessageError(f"reply does not match the schema: {exc}") from exc


def parse_event(body: bytes | str) -> Event:
    """Reads an event in the NestJS envelope; raises `MalformedMessageError` with the reason."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessageError(f"event is not JSON: {exc}") from exc
    try:
        return Event.model_validate(raw)
    except ValidationError as exc:
        raise MalformedMessageError(f"event does not match the schema: {exc}") from exc
