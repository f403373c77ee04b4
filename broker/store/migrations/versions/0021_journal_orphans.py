"""The journal's orphan sweep: answers whose intent the broker never wrote (broker.journal rule 8).

A journaled issuance now writes its intent once, in the transaction that records the lease after Vault
answered. A broker that dies between Vault's answer and that commit leaves an answer in ``vault_journal``
that no intent names; the maintenance loop claims such answers (``checked``) and revokes what they name.
Every entry already here was written under the old scheme, whose intent came first: marked checked.

``vault_error`` and ``path``: an answer whose backend failed (rather than a refusal before it ran), where
OpenBao can leave a lease that its log never names (broker.journal rule 9).

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vault_journal") as batch:
        batch.add_column(sa.Column("checked", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("vault_error", sa.Boolean, nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("path", sa.String(1024)))
    op.execute(sa.text("UPDATE vault_journal SET checked = :t").bindparams(t=True))
    op.create_index("ix_vault_journal_checked", "vault_journal", ["checked", "kind", "at"])


def downgrade() -> None:
    op.drop_index("ix_vault_journal_checked", table_name="vault_journal")
    with op.batch_alter_table("vault_journal") as batch:
        batch.drop_column("path")
        batch.drop_column("vault_error")
        batch.drop_column("checked")
