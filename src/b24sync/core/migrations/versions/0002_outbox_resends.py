"""outbox_events.resends: how many times an unanswered event was sent again; a user's events
indexed in seq order

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "outbox_events",
        sa.Column("resends", sa.Integer, nullable=False, server_default="0"),
    )
    # The search for unanswered changes reads each pending user's latest event: one probe of
    # this index per user. Without it PostgreSQL may walk the seq index backwards for each.
    op.create_index("ix_outbox_events_user_id_seq", "outbox_events", ["user_id", "seq"])
    op.drop_index("ix_outbox_events_user_id", table_name="outbox_events")


def downgrade() -> None:
    op.create_index("ix_outbox_events_user_id", "outbox_events", ["user_id"])
    op.drop_index("ix_outbox_events_user_id_seq", table_name="outbox_events")
    op.drop_column("outbox_events", "resends")
