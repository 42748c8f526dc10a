"""Messages on RabbitMQ, in the NestJS envelope the seed's own system uses.

Core -> ``bitrix_queue``::

    {"pattern": "user_created", "data": {"action": "create_card", "user": {...},
     "replyQueue": "bitrix.responses"}}

Bitrix -> the reply queue::

    {"pattern": "bitrix.responses", "data": {"status": "success", "action": "create_card",
     "user": {...}, "user_id": 123, "bitrix_lead_id": 456, "attempts": 1}}

Producers outside this project (the seed's NestJS Core) send no ``message_id`` and no
``user.version``; every added field is therefore optional on the way in.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_REPLY_QUEUE = "bitrix.responses"
REPLY_PATTERN = "bitrix.responses"


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


class UserPayload(BaseModel):
    """The user as carried in events and echoed in replies.

    Only ``id`` is required: a reply must be able to echo a user that failed validation
    (the seed's "Missing phone number" reply has no phone).
    """

    model_config = ConfigDict(extra="ignore")

    id: int
    full_name: str | None = None
    phone: str | None = None
    stage: str | None = None
    bitrix_lead_id: int | None = None
    version: int | None = Field(default=None, ge=1)

    def wire(self) -> dict[str, Any]:
        """The fields the sender actually set, so an echo looks like what came in."""
        return self.model_dump(mode="json", exclude_unset=True)


class EventData(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    action: Action
    user: UserPayload
    reply_queue: str = Field(default=DEFAULT_REPLY_QUEUE, alias="replyQueue", min_length=1)


class Event(BaseModel):
    model_config = ConfigDict(extra="ignore")

    pattern: Pattern
    data: EventData

    def wire(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern.value,
            "data": {
                "action": self.data.action.value,
                "user": self.data.user.wire(),
                "replyQueue": self.data.reply_queue,
            },
        }


class ReplyStatus(StrEnum):
    SUCCESS = "success"
    ERROR = "error"


class ReplyData(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: ReplyStatus
    action: Action | None = None
    user: UserPayload
    user_id: int | None = None
    bitrix_lead_id: int | None = None
    attempts: int | None = None
    reason: str | None = None
    # Bitrix24's error code on a permanent failure ("" for CRM business errors).
    error_code: str | None = None
    # Set on a success reply for an event that was older than what the lead already holds.
    skipped: bool | None = None

    def wire(self) -> dict[str, Any]:
        body = self.model_dump(mode="json", exclude_none=True, exclude={"user"})
        body["user"] = self.user.wire()
        body.setdefault("user_id", self.user.id)
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
