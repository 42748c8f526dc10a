"""Core's tables. The migrations in ``core/migrations`` are the source of truth for the schema;
these mappings mirror them for the repositories."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Identity,
    Integer,
    String,
    Text,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class SyncStatus(StrEnum):
    PENDING = "pending"
    SYNCED = "synced"
    FAILED = "failed"


class AnswerStatus(StrEnum):
    """What the Bitrix service answered to one event."""

    SUCCESS = "success"  # written to the lead
    SKIPPED = "skipped"  # a success that wrote nothing: proves nothing about the lead
    ERROR = "error"
    SUPERSEDED = "superseded"  # never sent: a create carrying its change took its place


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    full_name: Mapped[str] = mapped_column(String(200))
    phone: Mapped[str] = mapped_column(String(32))
    stage: Mapped[str] = mapped_column(String(64))
    # Grows with every change; events and replies carry it so stale replies can be recognised.
    version: Mapped[int] = mapped_column(Integer, default=1)
    # The version at which each field last changed: an event carries the fields changed since
    # `synced_version`, the last version Bitrix24 confirmed.
    full_name_version: Mapped[int] = mapped_column(Integer, default=1)
    phone_version: Mapped[int] = mapped_column(Integer, default=1)
    stage_version: Mapped[int] = mapped_column(Integer, default=1)
    bitrix_lead_id: Mapped[int | None] = mapped_column(BigInteger, default=None)
    sync_status: Mapped[str] = mapped_column(String(16), default=SyncStatus.PENDING.value)
    sync_error: Mapped[str | None] = mapped_column(Text, default=None)
    sync_error_code: Mapped[str | None] = mapped_column(Text, default=None)
    # Whether the last failure may pass by itself (Core sends the user again at next_sync_at)
    # or waits for a change of the user or `b24sync resync`.
    sync_retryable: Mapped[bool | None] = mapped_column(Boolean, default=None)
    # Attempts the Bitrix service reported for the last answer.
    sync_attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Times Core sent the user again by itself since the last change or success.
    sync_retries: Mapped[int] = mapped_column(Integer, default=0)
    # When the retry sweep sends the user again; NULL when no retry waits.
    next_sync_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    sync_failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # The lead holds a version Core never had: events restate the whole user, with `force`.
    sync_force: Mapped[bool] = mapped_column(Boolean, default=False)
    synced_version: Mapped[int | None] = mapped_column(Integer, default=None)
    synced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class OutboxEvent(Base):
    __tablename__ = "outbox_events"

    # The event id is also the AMQP message_id, so a re-published event is recognisable.
    id: Mapped[UUID] = mapped_column(primary_key=True)
    # Publication order; a user's events are inserted under its row lock, so seq = commit order.
    seq: Mapped[int] = mapped_column(BigInteger, Identity(), unique=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id", ondelete="CASCADE"))
    pattern: Mapped[str] = mapped_column(String(32))
    # The user version the event carries.
    version: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # Times the event was sent again because no answer came (see `sync_resend_after_s`).
    resends: Mapped[int] = mapped_column(Integer, default=0)
    # The Bitrix service's answer to this event (the latest, a success never overwritten).
    answered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    answer_status: Mapped[str | None] = mapped_column(String(16), default=None)
    answer_reason: Mapped[str | None] = mapped_column(Text, default=None)
