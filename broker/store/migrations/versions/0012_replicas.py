"""Several replicas on one store: singleton leases, and Vault audit entries merged once across node files.

``singletons``: the work one replica does at a time (maintenance, the Vault audit tailer, the exporter)
is held under a lease row per kind of work: who holds it, until when (the database's clock), and a
fencing number that grows at every change of holder (broker.store.singletons).

``vault_audit_requests``: the Vault request ids already merged into the chain. Every node of a cluster
writes its own audit file and an entry can be in several of them: the merge keeps the first one.

Revision ID: 0012
Revises: 0014
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "singletons",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(200), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("fence", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "vault_audit_requests",
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("seen_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("vault_audit_requests")
    op.drop_table("singletons")
