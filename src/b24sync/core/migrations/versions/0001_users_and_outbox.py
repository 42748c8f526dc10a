"""users and outbox_events

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("full_name", sa.String(200), nullable=False),
        sa.Column("phone", sa.String(32), nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
        sa.Column("bitrix_lead_id", sa.BigInteger, nullable=True),
        sa.Column("sync_status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("sync_error", sa.Text, nullable=True),
        sa.Column("sync_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("synced_version", sa.Integer, nullable=True),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.CheckConstraint(
            "sync_status IN ('pending', 'synced', 'failed')", name="users_sync_status_check"
        ),
        sa.CheckConstraint("version >= 1", name="users_version_check"),
    )
    op.create_index("ix_users_stage", "users", ["stage", "id"])
    op.create_index("ix_users_sync_status", "users", ["sync_status", "id"])

    op.create_table(
        "outbox_events",
        sa.Column("id", postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column("seq", sa.BigInteger, sa.Identity(), nullable=False, unique=True),
        sa.Column(
            "user_id",
            sa.BigInteger,
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("pattern", sa.String(32), nullable=False),
        sa.Column("body", postgresql.JSONB, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
    )
    # The relay only ever reads unpublished events in seq order: keep that index small.
    op.create_index(
        "ix_outbox_events_pending",
        "outbox_events",
        ["seq"],
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.create_index("ix_outbox_events_user_id", "outbox_events", ["user_id"])


def downgrade() -> None:
    op.drop_table("outbox_events")
    op.drop_table("users")
