"""outbox_events.resends: how many times an unanswered event was sent again

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


def downgrade() -> None:
    op.drop_column("outbox_events", "resends")
