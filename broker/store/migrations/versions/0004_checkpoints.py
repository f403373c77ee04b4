"""Signed checkpoints of the audit chain.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("key_id", sa.String(8), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_checkpoints")
