"""Intents, operator revocations and locks, and the task token's revocation state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as t:
        t.add_column(sa.Column("token_state", sa.String(16), nullable=False, server_default="live"))
        t.add_column(sa.Column("revoke_attempts", sa.Integer, nullable=False, server_default="0"))
        t.add_column(sa.Column("next_attempt_at", sa.Float))
        t.add_column(sa.Column("revocation_id", sa.String(64)))
    with op.batch_alter_table("leases") as t:
        t.add_column(sa.Column("issuance_accessor", sa.String(128)))
    op.create_table(
        "intents",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("grant", sa.String(64)),
        sa.Column("accessor", sa.String(128)),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("resolved_at", sa.Float),
    )
    op.create_index("ix_intents_state", "intents", ["state"])
    op.create_table(
        "revocations",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("value", sa.String(2048), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_by", sa.String(320), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("lock", sa.Boolean, nullable=False),
        sa.Column("lifted_at", sa.Float),
        sa.Column("lifted_by", sa.String(320)),
        sa.Column("tasks", sa.Integer, nullable=False),
        sa.Column("leases", sa.Integer, nullable=False),
    )
    op.create_index("ix_revocations_lock", "revocations", ["lock", "kind", "value"])


def downgrade() -> None:
    op.drop_table("revocations")
    op.drop_table("intents")
    with op.batch_alter_table("leases") as t:
        t.drop_column("issuance_accessor")
    with op.batch_alter_table("tasks") as t:
        t.drop_column("revocation_id")
        t.drop_column("next_attempt_at")
        t.drop_column("revoke_attempts")
        t.drop_column("token_state")
