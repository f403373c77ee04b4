"""People are (issuer, subject): display names and trusted emails beside the person ids.

``tasks.user``, ``approvals.user``, ``approval_votes.approver`` and ``revocations.created_by`` now hold
person ids (``<issuer>#<subject>``). Rows written before this revision hold the old name (the email, or
``sub`` when the email was unverified) with no issuer: they are kept as they are, copied into the new
display-name columns, and an old name that is an address becomes the row's trusted email, so an
operator's lock or revocation by that address still covers them. No new token yields such an id, so a
legacy task is reachable by operators and auditors, not by its user (tasks live minutes). Operators'
locks by email are lower-cased; a lock naming a bare subject keeps holding that subject, at any issuer.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_NAME = sa.String(320)


def upgrade() -> None:
    op.add_column("tasks", sa.Column("user_name", _NAME))
    op.add_column("tasks", sa.Column("user_email", _NAME))
    op.create_index("ix_tasks_user_email", "tasks", ["user_email"])
    op.add_column("approvals", sa.Column("user_name", _NAME))
    op.add_column("approval_votes", sa.Column("approver_name", _NAME))
    op.add_column("approval_votes", sa.Column("approver_email", _NAME))
    op.add_column("revocations", sa.Column("created_by_name", _NAME))
    op.add_column("revocations", sa.Column("lifted_by_name", _NAME))
    op.add_column("audit_events", sa.Column("user_name", _NAME))
    op.create_table(
        "person_emails",
        sa.Column("person", _NAME, primary_key=True),
        sa.Column("email", _NAME, primary_key=True),
        sa.Column("first_seen", sa.Float, nullable=False),
    )
    op.create_index("ix_person_emails_email", "person_emails", ["email"])
    # Legacy rows: the old name is the display name; an old name that is an address was trusted then.
    # (audit_events are left untouched: their hashes cover them as they are.)
    op.execute('UPDATE tasks SET user_name = "user", user_email = CASE WHEN "user" LIKE \'%@%\' '
               'THEN lower("user") END')
    op.execute('UPDATE approvals SET user_name = "user"')
    op.execute("UPDATE approval_votes SET approver_name = approver, approver_email = CASE WHEN approver LIKE "
               "'%@%' THEN lower(approver) END")
    op.execute("UPDATE revocations SET created_by_name = created_by, lifted_by_name = lifted_by")
    # Locks by email are compared case-folded from now on (broker.identity.normalize_email); a lock that
    # holds an old bare subject matches that subject at any issuer (the store's _LOCK_HIT).
    op.execute("UPDATE revocations SET value = lower(value) WHERE kind = 'user' AND value LIKE '%@%' "
               "AND value NOT LIKE '%://%'")


def downgrade() -> None:
    op.drop_index("ix_person_emails_email", "person_emails")
    op.drop_table("person_emails")
    op.drop_column("audit_events", "user_name")
    op.drop_column("revocations", "lifted_by_name")
    op.drop_column("revocations", "created_by_name")
    op.drop_column("approval_votes", "approver_email")
    op.drop_column("approval_votes", "approver_name")
    op.drop_column("approvals", "user_name")
    op.drop_index("ix_tasks_user_email", "tasks")
    op.drop_column("tasks", "user_email")
    op.drop_column("tasks", "user_name")
