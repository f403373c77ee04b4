"""Vault's audit device as the issuance journal: one Vault request per credential (issue 10).

``intents.journaled``: the credential is read with the task token itself, with the intent's id in the
``X-Broker-Intent`` request header, which Vault's audit device writes in plain text. Such an intent holds
no issuance token: what Vault issued for it is found in ``vault_journal`` (filled by the audit tailer)
or in ``intents.vault_ref``, the lease id or token accessor of an answer the broker received but could
not record.

``vault_journal``: for each journaled intent, the ``request`` and ``response`` entries Vault's audit
device wrote for it, as the tailer read them: when Vault received it, and the lease or token it created;
``swept`` once what it created is revoked (an answer that arrived after its intent was given up included).

``vault_audit_position.last_entry_at``: the time of the newest journal entry the tailer has read from a file, so
that "no entry for this intent" can be told apart from "not read yet".

``ix_tasks_user_state``, ``ix_tasks_agent_state``: the live-lease budget counts through live tasks only.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The live-lease budget counts through live tasks only (broker.store.statements).
    op.create_index("ix_tasks_user_state", "tasks", ["user", "state"])
    op.create_index("ix_tasks_agent_state", "tasks", ["agent", "state"])
    with op.batch_alter_table("intents") as t:
        t.add_column(sa.Column("journaled", sa.Boolean, nullable=False, server_default=sa.false()))
        t.add_column(sa.Column("vault_ref", sa.String(1024)))
        t.add_column(sa.Column("vault_ref_kind", sa.String(8)))
    with op.batch_alter_table("vault_audit_position") as t:
        t.add_column(sa.Column("last_entry_at", sa.Float))
    op.create_table(
        "vault_journal",
        sa.Column("intent_id", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(8), primary_key=True),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("failed", sa.Boolean, nullable=False),
        sa.Column("lease_id", sa.String(1024)),
        sa.Column("accessor", sa.String(128)),
        sa.Column("swept", sa.Boolean, nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_agent_state", "tasks")
    op.drop_index("ix_tasks_user_state", "tasks")
    op.drop_table("vault_journal")
    with op.batch_alter_table("vault_audit_position") as t:
        t.drop_column("last_entry_at")
    with op.batch_alter_table("intents") as t:
        t.drop_column("vault_ref_kind")
        t.drop_column("vault_ref")
        t.drop_column("journaled")
