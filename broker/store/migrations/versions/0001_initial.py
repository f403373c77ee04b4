"""Tasks, leases and audit events.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("user", sa.String(320), nullable=False),
        sa.Column("agent", sa.String(2048), nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("ended_at", sa.Float),
        sa.Column("token_accessor", sa.String(128), nullable=False),
        sa.Column("sealed_token", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_tasks_user", "tasks", ["user"])
    op.create_index("ix_tasks_agent", "tasks", ["agent"])
    op.create_index("ix_tasks_tenant", "tasks", ["tenant"])
    op.create_index("ix_tasks_state", "tasks", ["state"])
    op.create_table(
        "leases",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("task_id", sa.String(64), sa.ForeignKey("tasks.id"), nullable=False),
        sa.Column("grant", sa.String(64), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("vault_lease_id", sa.String(512), nullable=False),
        sa.Column("issued_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("renewable", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("revoked_at", sa.Float),
    )
    op.create_index("ix_leases_task", "leases", ["task_id"])
    op.create_index("ix_leases_state", "leases", ["state"])
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("user", sa.String(320)),
        sa.Column("agent", sa.String(2048)),
        sa.Column("task", sa.String(64)),
        sa.Column("tenant", sa.String(64)),
        sa.Column("resource", sa.String(512)),
        sa.Column("action", sa.String(32)),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("lease", sa.String(64)),
        sa.Column("vault_request_id", sa.String(64)),
        sa.Column("prev_hash", sa.String(64)),
        sa.Column("hash", sa.String(64)),
    )
    op.create_index("ix_audit_user", "audit_events", ["user"])
    op.create_index("ix_audit_agent", "audit_events", ["agent"])
    op.create_index("ix_audit_task", "audit_events", ["task"])
    op.create_index("ix_audit_time", "audit_events", ["time"])


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_table("leases")
    op.drop_table("tasks")
