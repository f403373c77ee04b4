"""Intents that a failed cleanup leaves retryable, and the readiness check's write probe.

``intents.attempts`` and ``intents.next_attempt_at``: an ``aborting`` intent whose revoke Vault has not
confirmed is retried by the maintenance loop with backoff (broker.intents). An intent that an older
broker marked ``aborted`` without Vault's confirmation stays as it is: its token has since died with
its task or at its TTL.

``health_probe``: the one row ``GET /v1/health`` rewrites to prove the store can commit.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("intents") as t:
        t.add_column(sa.Column("attempts", sa.Integer, nullable=False, server_default="0"))
        t.add_column(sa.Column("next_attempt_at", sa.Float))
    op.create_table(
        "health_probe",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("probed_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("health_probe")
    with op.batch_alter_table("intents") as t:
        t.drop_column("next_attempt_at")
        t.drop_column("attempts")
