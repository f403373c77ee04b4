"""Signal deliveries: one row per SSF receiver and task that left active (broker.signals).

Revision ID: 0015
Revises: 0011
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "signal_deliveries",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("receiver", sa.String(64), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("task_id", sa.String(64), sa.ForeignKey("tasks.id"), nullable=False),
        sa.Column("initiator", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("occurred_at", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Float),
        sa.Column("resolved_at", sa.Float),
        sa.Column("last_error", sa.String(512)),
    )
    op.create_index("ix_signal_deliveries_due", "signal_deliveries", ["state", "next_attempt_at"])
    op.create_index("ix_signal_deliveries_task", "signal_deliveries", ["task_id"])


def downgrade() -> None:
    op.drop_index("ix_signal_deliveries_task", table_name="signal_deliveries")
    op.drop_index("ix_signal_deliveries_due", table_name="signal_deliveries")
    op.drop_table("signal_deliveries")
