"""Hash chain: the head row, and the chain computed over any records written before it existed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    from broker.audit import GENESIS, AuditRecord, canonical_bytes, chain_hash

    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    conn = op.get_bind()
    events = sa.table("audit_events", *[sa.column(c) for c in (
        "seq", "time", "event", "user", "agent", "task", "tenant", "resource", "action", "outcome", "reason",
        "lease", "vault_request_id", "prev_hash", "hash")])
    prev, seq = GENESIS, 0
    names = tuple(AuditRecord.__dataclass_fields__)
    for row in conn.execute(sa.select(events).order_by(events.c.seq)).mappings().all():
        seq = row["seq"]
        h = chain_hash(prev, canonical_bytes(AuditRecord(**{k: row[k] for k in names}), seq))
        conn.execute(events.update().where(events.c.seq == seq).values(prev_hash=prev.hex(), hash=h.hex()))
        prev = h
    op.bulk_insert(head, [{"id": 1, "seq": seq, "hash": prev.hex()}])


def downgrade() -> None:
    op.drop_table("audit_head")
