"""Lease indexes: one fewer written per lease, and an expiry scan that reads only what is due.

``ix_leases_task`` is a prefix of ``ix_leases_task_state``, so every lookup by task is served by the
latter; each lease insert and state change wrote both. ``ix_leases_state`` becomes
``(state, expires_at)``: the maintenance loop's scan for active leases past their expiry read every
active lease through it (issue 10: no work that grows with live leases).

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_leases_task", table_name="leases")
    op.drop_index("ix_leases_state", table_name="leases")
    op.create_index("ix_leases_state_expires", "leases", ["state", "expires_at"])


def downgrade() -> None:
    op.drop_index("ix_leases_state_expires", table_name="leases")
    op.create_index("ix_leases_state", "leases", ["state"])
    op.create_index("ix_leases_task", "leases", ["task_id"])
