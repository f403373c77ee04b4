"""An index on leases (task_id, state): live-lease budgets are checked on every issuance.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_leases_task_state", "leases", ["task_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_leases_task_state", "leases")
