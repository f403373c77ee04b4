"""IdP-issued delegation: each token's jti accepted once, and noted in the audit record.

``delegation_tokens``: (issuer, jti) of every delegation token a task start accepted, kept until the
token has expired; the primary key is what refuses a replay, on any replica.

``audit_events.delegation_jti``: the jti a ``task.started`` (or refused start) came with. An added
audit field (``broker.audit.chain.ADDED_FIELDS``): null in every older record, which keeps its hash.

Revision ID: 0013
Revises: 0015
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "delegation_tokens",
        sa.Column("issuer", sa.String(320), primary_key=True),
        sa.Column("jti", sa.String(255), primary_key=True),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("accepted_at", sa.Float, nullable=False),
        sa.Column("agent", sa.String(2048), nullable=False),
    )
    op.create_index("ix_delegation_tokens_expires", "delegation_tokens", ["expires_at"])
    op.add_column("audit_events", sa.Column("delegation_jti", sa.String(255)))


def downgrade() -> None:
    op.drop_column("audit_events", "delegation_jti")
    op.drop_index("ix_delegation_tokens_expires", "delegation_tokens")
    op.drop_table("delegation_tokens")
