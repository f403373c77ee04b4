"""Each task counts its active leases, so the live-lease budgets cost O(tasks), not O(leases), per credential.

``tasks.live_leases`` is incremented by the transaction that inserts a lease and recounted for the tasks
whose leases leave ``active``; the budgets sum it over the user's or the agent's active tasks (issue 10:
issuance must not slow as live leases pile up). Existing active tasks are counted here once.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("live_leases", sa.Integer, nullable=False, server_default="0"))
    op.execute("UPDATE tasks SET live_leases = (SELECT count(*) FROM leases WHERE leases.task_id = tasks.id"
               " AND leases.state = 'active') WHERE state = 'active'")


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("live_leases")
