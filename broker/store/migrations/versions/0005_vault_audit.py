"""Vault audit tailer: its position in OpenBao's file audit device, and the tokens it learned.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vault_audit_position",
        sa.Column("path", sa.String(1024), primary_key=True),
        sa.Column("device", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("inode", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("offset", sa.BigInteger, nullable=False),
        sa.Column("lines", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_table(
        "vault_audit_tokens",
        sa.Column("accessor_hmac", sa.String(128), primary_key=True),
        sa.Column("task", sa.String(64), nullable=False),
        sa.Column("lease", sa.String(64)),
        sa.Column("learned_at", sa.Float, nullable=False),
    )
    op.create_index("ix_vault_audit_tokens_task", "vault_audit_tokens", ["task"])


def downgrade() -> None:
    op.drop_index("ix_vault_audit_tokens_task", table_name="vault_audit_tokens")
    op.drop_table("vault_audit_tokens")
    op.drop_table("vault_audit_position")
