"""Audit records name where the operation came from: ``audit_events.caller_address``.

The HTTP caller's socket peer, or the remote address OpenBao logged for a Vault request; the OCSF export
maps it to ``src_endpoint``. Null in records written before it (and by background work): the canonical
form leaves the field out when it is null (``broker.audit.ADDED_FIELDS``), so existing chains verify.

Revision ID: 0017
Revises: 0013
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as t:
        t.add_column(sa.Column("caller_address", sa.String(128)))


def downgrade() -> None:
    with op.batch_alter_table("audit_events") as t:
        t.drop_column("caller_address")
