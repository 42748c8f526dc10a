"""converge on state: per-field versions and retry state on users; each event's version and
answer on outbox_events

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The version at which each field last changed: an event carries the fields changed since
    # the version Bitrix24 last confirmed (`synced_version`).
    for field in ("full_name", "phone", "stage"):
        op.add_column(
            "users",
            sa.Column(f"{field}_version", sa.Integer, nullable=False, server_default="1"),
        )
    op.add_column("users", sa.Column("sync_error_code", sa.Text, nullable=True))
    op.add_column("users", sa.Column("sync_retryable", sa.Boolean, nullable=True))
    op.add_column(
        "users", sa.Column("sync_retries", sa.Integer, nullable=False, server_default="0")
    )
    op.add_column("users", sa.Column("next_sync_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("users", sa.Column("sync_failed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "users", sa.Column("sync_force", sa.Boolean, nullable=False, server_default="false")
    )
    # What the rows knew: every field as changed at the current version (a pending user sends
    # them all once more; a synced one nothing), and every failure but the seed's validation
    # error ("Missing phone number") retried soon: its answer then says whether to go on.
    op.execute(
        "UPDATE users SET full_name_version = version, phone_version = version,"
        " stage_version = version"
    )
    op.execute(
        "UPDATE users SET sync_failed_at = updated_at,"
        " sync_retryable = coalesce(sync_error, '') <> 'Missing phone number'"
        " WHERE sync_status = 'failed'"
    )
    op.execute(
        "UPDATE users SET next_sync_at = now() WHERE sync_status = 'failed' AND sync_retryable"
    )
    # The retry sweep reads the users whose next retry is due, earliest first.
    op.create_index(
        "ix_users_next_sync_at",
        "users",
        ["next_sync_at"],
        postgresql_where=sa.text("next_sync_at IS NOT NULL"),
    )

    op.add_column("outbox_events", sa.Column("version", sa.Integer, nullable=True))
    op.add_column(
        "outbox_events", sa.Column("answered_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column("outbox_events", sa.Column("answer_status", sa.String(16), nullable=True))
    op.add_column("outbox_events", sa.Column("answer_reason", sa.Text, nullable=True))
    op.execute(
        "UPDATE outbox_events AS e SET version = coalesce("
        " (e.body->'data'->'user'->>'version')::integer, u.version)"
        " FROM users AS u WHERE u.id = e.user_id"
    )
    # Published events are taken as answered as far as the users' state says: up to the synced
    # version with a success, the rest of a failed user's with an error. A pending user's
    # later events stay unanswered: their replies may still come, or they are sent again.
    op.execute(
        "UPDATE outbox_events AS e SET answered_at = coalesce(u.synced_at, now()),"
        " answer_status = 'success'"
        " FROM users AS u WHERE u.id = e.user_id AND e.published_at IS NOT NULL"
        " AND e.version <= u.synced_version"
    )
    op.execute(
        "UPDATE outbox_events AS e SET answered_at = now(), answer_status = 'error',"
        " answer_reason = u.sync_error"
        " FROM users AS u WHERE u.id = e.user_id AND e.published_at IS NOT NULL"
        " AND e.answered_at IS NULL AND u.sync_status = 'failed'"
    )
    op.alter_column("outbox_events", "version", nullable=False)
    op.create_check_constraint(
        "outbox_events_answer_status_check",
        "outbox_events",
        "answer_status IN ('success', 'skipped', 'error', 'superseded')",
    )
    # An event answered before it went out (superseded while held back) is never published.
    op.drop_index("ix_outbox_events_pending", table_name="outbox_events")
    op.create_index(
        "ix_outbox_events_pending",
        "outbox_events",
        ["seq"],
        postgresql_where=sa.text("published_at IS NULL AND answered_at IS NULL"),
    )
    # The search for unanswered changes reads only events that left and got no answer yet.
    op.create_index(
        "ix_outbox_events_unanswered",
        "outbox_events",
        ["published_at"],
        postgresql_where=sa.text("published_at IS NOT NULL AND answered_at IS NULL"),
    )


def downgrade() -> None:
    # Without answers, an event superseded before it went out would be published after all.
    op.execute(
        "UPDATE outbox_events SET published_at = answered_at"
        " WHERE published_at IS NULL AND answered_at IS NOT NULL"
    )
    op.drop_index("ix_outbox_events_unanswered", table_name="outbox_events")
    op.drop_index("ix_outbox_events_pending", table_name="outbox_events")
    op.create_index(
        "ix_outbox_events_pending",
        "outbox_events",
        ["seq"],
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.drop_constraint("outbox_events_answer_status_check", "outbox_events")
    for column in ("answer_reason", "answer_status", "answered_at", "version"):
        op.drop_column("outbox_events", column)
    op.drop_index("ix_users_next_sync_at", table_name="users")
    for column in (
        "sync_force",
        "sync_failed_at",
        "next_sync_at",
        "sync_retries",
        "sync_retryable",
        "sync_error_code",
        "stage_version",
        "phone_version",
        "full_name_version",
    ):
        op.drop_column("users", column)
