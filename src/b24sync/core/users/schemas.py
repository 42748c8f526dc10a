"""The users API's request and response bodies."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    model_validator,
)
from pydantic.config import JsonDict

from b24sync.core.models import OutboxEvent, SyncStatus, User
from b24sync.core.outbox.service import user_fields

# Unicode's control characters (category Cc). NUL cannot be stored by PostgreSQL at all; tabs,
# newlines and the like have no place in a name, a phone or a stage, and would reach the lead.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _no_control_characters(value: str) -> str:
    if _CONTROL_CHARACTERS.search(value):
        raise ValueError("must not contain control characters")
    return value


NoControlCharacters = AfterValidator(_no_control_characters)
FullName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    NoControlCharacters,
]
# Format rules (region, E.164) live in the service; this only bounds the raw input.
Phone = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64), NoControlCharacters
]
Stage = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64), NoControlCharacters
]

# The seed's requests: the examples of the schemas and of the OpenAPI page.
CREATE_EXAMPLE: JsonDict = {"full_name": "Иван Иванов", "phone": "+77001112233", "stage": "NEW"}
UPDATE_EXAMPLE: JsonDict = {
    "full_name": "Иван Петров",
    "phone": "+77001112233",
    "stage": "IN_PROCESS",
}
MOVE_EXAMPLE: JsonDict = {"stage": "CONVERTED"}


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [CREATE_EXAMPLE]})

    full_name: FullName
    phone: Phone
    stage: Stage | None = Field(default=None, description="Defaults to NEW")


class UserUpdate(BaseModel):
    """Partial update: fields left out keep their value; none of them may be set to null."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [UPDATE_EXAMPLE]})

    full_name: FullName | None = None
    phone: Phone | None = None
    stage: Stage | None = None

    @model_validator(mode="after")
    def _no_nulls(self) -> UserUpdate:
        nulls = sorted(name for name in self.model_fields_set if getattr(self, name) is None)
        if nulls:
            raise ValueError(f"{', '.join(nulls)} may be omitted but not null")
        return self


class UserMove(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [MOVE_EXAMPLE]})

    stage: Stage


class SyncState(BaseModel):
    status: SyncStatus
    synced_version: int | None = Field(description="the last version Bitrix24 confirmed")
    error: str | None = Field(description="the last failure's reason")
    error_code: str | None = Field(description="the last failure's Bitrix24 or service code")
    retryable: bool | None = Field(
        description="whether Core sends the user again by itself after that failure"
    )
    attempts: int = Field(description="attempts the Bitrix service made for the last answer")
    retries: int = Field(description="times Core sent the user again since the last change")
    next_retry_at: datetime | None = Field(description="when Core sends the user again")
    failed_at: datetime | None = Field(description="when the last failure was answered")
    synced_at: datetime | None


class UserRead(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": 1,
                    "full_name": "Иван Иванов",
                    "phone": "+77001112233",
                    "stage": "NEW",
                    "bitrix_lead_id": None,
                    "version": 1,
                    "sync": {
                        "status": "pending",
                        "synced_version": None,
                        "error": None,
                        "error_code": None,
                        "retryable": None,
                        "attempts": 0,
                        "retries": 0,
                        "next_retry_at": None,
                        "failed_at": None,
                        "synced_at": None,
                    },
                    "created_at": "2026-01-01T00:00:00Z",
                    "updated_at": "2026-01-01T00:00:00Z",
                }
            ]
        }
    )

    id: int
    full_name: str
    phone: str
    stage: str
    bitrix_lead_id: int | None
    version: int
    sync: SyncState
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_user(cls, user: User) -> UserRead:
        return cls.model_validate(_read_fields(user))

    @staticmethod
    def json_of(user: User) -> bytes:
        """`from_user(user).model_dump_json()`, encoded, at half the cost: a user Core wrote
        needs no validation on its way out (a write's answer, on Core's hottest path)."""
        return _AS_JSON.dump_json(_read_fields(user))


# Dumps each value as pydantic dumps its type, datetimes included, as `UserRead` does.
_AS_JSON: TypeAdapter[Any] = TypeAdapter(Any)


def _read_fields(user: User) -> dict[str, Any]:
    """The user's fields in `UserRead`'s layout."""
    return {
        **user_fields(user),
        "sync": {
            "status": user.sync_status,
            "synced_version": user.synced_version,
            "error": user.sync_error,
            "error_code": user.sync_error_code,
            "retryable": user.sync_retryable,
            "attempts": user.sync_attempts,
            "retries": user.sync_retries,
            "next_retry_at": user.next_sync_at,
            "failed_at": user.sync_failed_at,
            "synced_at": user.synced_at,
        },
        "created_at": user.created_at,
        "updated_at": user.updated_at,
    }


class Pagination(BaseModel):
    total_count: int
    max_page: int


class UserList(BaseModel):
    items: list[UserRead]
    pagination: Pagination


class UserEvent(BaseModel):
    """One change sent to Bitrix24 (or waiting to be) and the answer it got."""

    id: UUID = Field(description="the event id, also the message's id")
    pattern: str = Field(description="user_created, user_updated or user_moved")
    version: int = Field(description="the user's version the event carries")
    changed: list[str] | None = Field(description="the fields it carries as changed")
    sent: dict[str, Any] = Field(description="the user's fields as the event carries them")
    force: bool
    created_at: datetime
    published_at: datetime | None = Field(description="when RabbitMQ confirmed it")
    resends: int = Field(description="times it was sent again for want of an answer")
    answered_at: datetime | None
    answer_status: str | None = Field(description="success, skipped, error or superseded")
    answer_reason: str | None

    @classmethod
    def from_event(cls, event: OutboxEvent) -> UserEvent:
        data = event.body.get("data", {})
        user = data.get("user", {})
        return cls(
            id=event.id,
            pattern=event.pattern,
            version=event.version,
            changed=data.get("changed"),
            sent={key: user[key] for key in ("full_name", "phone", "stage") if key in user},
            force=bool(data.get("force")),
            created_at=event.created_at,
            published_at=event.published_at,
            resends=event.resends,
            answered_at=event.answered_at,
            answer_status=event.answer_status,
            answer_reason=event.answer_reason,
        )


class UserHistory(BaseModel):
    user_id: int
    events: list[UserEvent] = Field(description="newest first")
