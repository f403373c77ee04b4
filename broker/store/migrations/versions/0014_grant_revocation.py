"""Every grant says how it ends: the audit record's ``revocation`` and ``key_fingerprint``.

``audit_events.revocation``: how the credential a ``lease.issued`` record describes ends (``revocable``,
``expiry-only``, ``static``; broker.engines). ``audit_events.key_fingerprint``: the SHA-256 fingerprint of
the SSH public key a certificate was signed for. Both are null in records from before them; the chain's
canonical form writes them only when set (broker.audit ``ADDED_FIELDS``), so old records keep their hashes.
Lease kinds ``cert`` and ``static`` fit the existing ``leases.kind`` column.

Revision ID: 0014
Revises: 0017
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("audit_events", sa.Column("revocation", sa.String(16)))
    op.add_column("audit_events", sa.Column("key_fingerprint", sa.String(128)))


def downgrade() -> None:
    with op.batch_alter_table("audit_events") as t:
        t.drop_column("key_fingerprint")
        t.drop_column("revocation")
