"""Approvals of high-risk grants and the approvers' votes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "approvals",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("task_id", sa.String(64), sa.ForeignKey("tasks.id"), nullable=False),
        sa.Column("grant", sa.String(64), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("ttl", sa.Integer, nullable=False),
        sa.Column("user", sa.String(320), nullable=False),
        sa.Column("agent", sa.String(2048), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("required", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("decided_at", sa.Float),
        sa.Column("consumed_lease", sa.String(64), unique=True),
    )
    op.create_index("ix_approvals_state", "approvals", ["state"])
    op.create_table(
        "approval_votes",
        sa.Column("approval_id", sa.String(64), sa.ForeignKey("approvals.id"), primary_key=True),
        sa.Column("approver", sa.String(320), primary_key=True),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("auth_time", sa.Float, nullable=False),
        sa.Column("decided_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("approval_votes")
    op.drop_table("approvals")
