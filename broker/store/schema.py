"""SQLAlchemy Core tables: one schema for SQLite (the default) and PostgreSQL (several replicas).

Times are Unix seconds as floats (REAL/double precision): comparable across both engines and free of
time-zone conversions. Alembic migrations under ``migrations/`` create exactly these tables; a test
checks that the migrated schema and this metadata agree.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
)

metadata = MetaData()

tasks = Table(
    "tasks",
    metadata,
    Column("id", String(64), primary_key=True),
    # The person who delegated: their id, "<issuer>#<subject>" (broker.identity.person_id). Every
    # decision compares this column; user_name is for people to read, user_email the address their
    # token carried *trusted* (else null), which operators' locks by email match.
    Column("user", String(320), nullable=False),
    Column("agent", String(2048), nullable=False),
    Column("role", String(64), nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("state", String(16), nullable=False),
    Column("ended_at", Float),
    # The task token's accessor can revoke the token but not use it.
    Column("token_accessor", String(128), nullable=False),
    # The task token itself, sealed with AES-256-GCM under a key the store does not hold.
    Column("sealed_token", LargeBinary, nullable=False),
    # Whether Vault still holds the task token: "live", "revoke_pending" (retried with backoff until
    # Vault confirms) or "revoked". A task can be ended in the store before Vault confirms.
    Column("token_state", String(16), nullable=False, server_default="live"),
    Column("revoke_attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Float),
    Column("revocation_id", String(64)),
    Column("user_name", String(320)),
    Column("user_email", String(320)),
    # How many of the task's leases are active: the live-lease budgets sum it over a user's or an agent's
    # active tasks instead of counting their leases (O(tasks), not O(leases), per credential). Written
    # with every lease insert and every move out of active (broker.store.statements).
    Column("live_leases", Integer, nullable=False, server_default="0"),
    Index("ix_tasks_user", "user"),
    Index("ix_tasks_user_email", "user_email"),
    Index("ix_tasks_agent", "agent"),
    Index("ix_tasks_tenant", "tenant"),
    Index("ix_tasks_state", "state"),
    Index("ix_tasks_user_state", "user", "state"),
    Index("ix_tasks_agent_state", "agent", "state"),
)

leases = Table(
    "leases",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("task_id", String(64), ForeignKey("tasks.id"), nullable=False),
    Column("grant", String(64), nullable=False),
    Column("path", String(512), nullable=False),
    # "lease" (a Vault lease id), "token" (a child token, tracked by accessor), "cert" (an SSH certificate:
    # its serial) or "static" (a KV value: path and version). broker.engines maps each to its adapter.
    Column("kind", String(8), nullable=False),
    Column("vault_lease_id", String(512), nullable=False),
    Column("issued_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("renewable", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("revoked_at", Float),
    # The per-issuance child token the credential was read with: revoking it revokes exactly this lease.
    Column("issuance_accessor", String(128)),
    # (task_id, state) serves lookups by task alone too; (state, expires_at) makes the expiry scan
    # read only what is due, not every active lease (migration 0020).
    Index("ix_leases_task_state", "task_id", "state"),
    Index("ix_leases_state_expires", "state", "expires_at"),
)

# Written before every Vault call that creates something, completed after it is recorded. What is given
# up on is ``aborting`` until Vault confirms its token is gone (broker.intents has the state table): the
# maintenance loop retries it with backoff, so a partition that fails the first revoke leaves nothing.
intents = Table(
    "intents",
    metadata,
    Column("id", String(64), primary_key=True),  # the task id or lease id it will become
    Column("kind", String(8), nullable=False),  # "task" or "lease"
    Column("task_id", String(64), nullable=False),
    Column("grant", String(64)),
    # The token to revoke if the intent is given up: the issuance token (lease intent), or the task token
    # once a failed start has learned it (task intent).
    Column("accessor", String(128)),
    Column("created_at", Float, nullable=False),
    Column("state", String(8), nullable=False),  # broker.intents.IntentState
    Column("resolved_at", Float),
    # Cleanups Vault has not confirmed yet, and when the next one is due (``aborting`` only).
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Float),
    # Read with the task token, the intent's id in Vault's audit log (``vault_journal``); ``vault_ref`` is
    # what Vault's answer named (a lease id or a token accessor) when the broker got it but did not record it.
    Column("journaled", Boolean, nullable=False, server_default=false()),
    Column("vault_ref", String(1024)),
    Column("vault_ref_kind", String(8)),  # "lease" or "token"
    Index("ix_intents_state", "state"),
)

# An operator's revocation by user, agent, task or tenant. For user, agent and tenant it is also a lock
# that blocks new tasks and new credentials until an operator lifts it.
revocations = Table(
    "revocations",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("kind", String(8), nullable=False),
    Column("value", String(2048), nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_by", String(320), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("lock", Boolean, nullable=False),
    Column("lifted_at", Float),
    Column("lifted_by", String(320)),
    Column("tasks", Integer, nullable=False),
    Column("leases", Integer, nullable=False),
    Column("created_by_name", String(320)),
    Column("lifted_by_name", String(320)),
    Index("ix_revocations_lock", "lock", "kind", "value"),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("time", Float, nullable=False),
    Column("event", String(32), nullable=False),
    Column("user", String(320)),
    Column("agent", String(2048)),
    Column("task", String(64)),
    Column("tenant", String(64)),
    Column("resource", String(512)),
    Column("action", String(32)),
    Column("outcome", String(16), nullable=False),
    Column("reason", Text),
    Column("lease", String(64)),
    Column("vault_request_id", String(64)),
    # The hash chain (see broker.audit): hex SHA-256 of the previous record and of this one.
    Column("prev_hash", String(64)),
    Column("hash", String(64)),
    # The person's display name beside ``user`` (their id); null in records from before it existed.
    Column("user_name", String(320)),
    # The ``jti`` of the IdP-issued delegation token a task was started with (null otherwise).
    Column("delegation_jti", String(255)),
    # Where the operation came from (HTTP socket peer or Vault's remote address); null when unknown.
    Column("caller_address", String(128)),
    # How an issued credential ends (revocable, expiry-only, static) and the SSH key it was signed for.
    Column("revocation", String(16)),
    Column("key_fingerprint", String(128)),
    Index("ix_audit_user", "user"),
    Index("ix_audit_agent", "agent"),
    Index("ix_audit_task", "task"),
    Index("ix_audit_time", "time"),
)

# The chain's head: one row, updated in every transaction that appends a record. Its row lock is what
# makes appends single-writer across replicas (PostgreSQL) without an advisory lock.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("hash", String(64), nullable=False),
)

# Signed checkpoints of the chain (broker.audit.signing): the head at ``seq`` records, as signed in ``note``.
# One per size: two replicas signing the same head store it once. The verifier trusts the note, and
# checks that these columns agree with it.
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("head_hash", String(64), nullable=False),
    Column("time", Float, nullable=False),
    Column("note", Text, nullable=False),
    Column("key_id", String(8), nullable=False),
)

# Where the Vault audit tailer is in OpenBao's file audit device (broker.audit.tailer): one row per file of the
# configured path, the current one and its rotated predecessors, known by device and inode (a rotated file
# keeps its position under its new name), with the offset just after the last complete line merged. Moved
# in the same transaction as the records it merged, so nothing is lost or repeated.
vault_audit_position = Table(
    "vault_audit_position",
    metadata,
    Column("path", String(1024), primary_key=True),
    Column("device", BigInteger, primary_key=True, autoincrement=False),
    Column("inode", BigInteger, primary_key=True, autoincrement=False),
    Column("offset", BigInteger, nullable=False),
    Column("lines", BigInteger, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("last_entry_at", Float),  # the newest journal entry read from this file (Vault's time)
)

# What Vault's audit device wrote for a journaled intent (``X-Broker-Intent``), as the tailer read it: its
# ``request`` entry (Vault received it) and its ``response`` entry (what Vault created, if anything); and
# ``issued``: what an issuance token's answer created, for the late-answer sweep (broker.journal rule 7).
vault_journal = Table(
    "vault_journal",
    metadata,
    Column("intent_id", String(64), primary_key=True),
    Column("kind", String(8), primary_key=True),  # "request", "response" or "issued"
    Column("task_id", String(64), nullable=False),
    Column("request_id", String(64), nullable=False),
    Column("at", Float, nullable=False),
    Column("failed", Boolean, nullable=False),
    Column("lease_id", String(1024)),
    Column("accessor", String(128)),  # as the device wrote it: HMAC'd unless hmac_accessor = false
    # What it created was revoked (broker.journal rule 6): the late-answer sweep no longer looks at it.
    Column("swept", Boolean, nullable=False, server_default=false()),
    # The orphan sweep (broker.journal rule 8) has seen this answer's intent recorded, or claimed it.
    Column("checked", Boolean, nullable=False, server_default=false()),
    # A backend failure, and the request's path, for the leftover search (broker.journal rule 9).
    Column("vault_error", Boolean, nullable=False, server_default=false()),
    Column("path", String(1024)),
    Index("ix_vault_journal_checked", "checked", "kind", "at"),
)

# Tokens with no metadata of their own (an agent's child token from a token-role grant), known by the
# HMAC'd accessor that Vault's audit entries show, and the task (and lease) they descend from.
vault_audit_tokens = Table(
    "vault_audit_tokens",
    metadata,
    Column("accessor_hmac", String(128), primary_key=True),
    Column("task", String(64), nullable=False),
    Column("lease", String(64)),
    Column("learned_at", Float, nullable=False),
    Index("ix_vault_audit_tokens_task", "task"),
)


# A high-risk request waiting for (or decided by) people: bound to the digest of the exact request.
approvals = Table(
    "approvals",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("task_id", String(64), ForeignKey("tasks.id"), nullable=False),
    Column("grant", String(64), nullable=False),
    Column("path", String(512), nullable=False),
    Column("ttl", Integer, nullable=False),
    Column("user", String(320), nullable=False),
    Column("agent", String(2048), nullable=False),
    Column("tenant", String(64), nullable=False),
    Column("digest", String(64), nullable=False),
    Column("required", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("decided_at", Float),
    Column("consumed_lease", String(64), unique=True),
    Column("user_name", String(320)),
    Index("ix_approvals_state", "state"),
)

# One vote per person per approval: the primary key holds the approver's person id; a second vote by
# the same trusted email (the same person through another issuer) is refused by the store too.
approval_votes = Table(
    "approval_votes",
    metadata,
    Column("approval_id", String(64), ForeignKey("approvals.id"), primary_key=True),
    Column("approver", String(320), primary_key=True),
    Column("decision", String(8), nullable=False),
    Column("reason", Text, nullable=False),
    Column("auth_time", Float, nullable=False),
    Column("decided_at", Float, nullable=False),
    Column("approver_name", String(320)),
    Column("approver_email", String(320)),
)

# Every address a person's tokens claimed (verified or not), as the broker saw them at task start, at
# approval and at any staff request: a lock named by email then holds the person behind it whatever
# their next token says, and two ids that shared an address count as one person where that refuses
# (self-approval, a second vote). It never grants anything: a claim can only lock its presenter out.
person_emails = Table(
    "person_emails",
    metadata,
    Column("person", String(320), primary_key=True),
    Column("email", String(320), primary_key=True),
    Column("first_seen", Float, nullable=False),
    Index("ix_person_emails_email", "email"),
)

# How far each audit export sink (broker.audit.export: "file", "webhook") has delivered the chain: the last
# sequence number it wrote. Backlog = the chain's head - the smallest of these.
audit_export = Table(
    "audit_export",
    metadata,
    Column("sink", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("updated_at", Float, nullable=False),
)


# One row that the readiness check rewrites (rate-limited): a store that can be read but cannot commit a
# write (a full disk, a read-only file, a PostgreSQL replica) cannot issue, so it is not ready.
health_probe = Table(
    "health_probe",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("probed_at", Float, nullable=False),
)


# One Security Event Token to push to one SSF receiver (broker.signals), written in the transaction that
# moved its task out of active. ``id`` is the SET's jti. State table: broker.signals.deliveries.DELIVERIES;
# ``next_attempt_at`` is when a pending row is due, or when a sending row's claim lapses.
signal_deliveries = Table(
    "signal_deliveries",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("receiver", String(64), nullable=False),
    Column("event", String(32), nullable=False),
    Column("task_id", String(64), ForeignKey("tasks.id"), nullable=False),
    # Who made the task end (CAEP initiating_entity) and the audit trail's reason for it.
    Column("initiator", String(16), nullable=False),
    Column("reason", Text, nullable=False),
    Column("occurred_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", Float),
    Column("resolved_at", Float),
    Column("last_error", String(512)),
    Index("ix_signal_deliveries_due", "state", "next_attempt_at"),
    Index("ix_signal_deliveries_task", "task_id"),
)

# Every IdP-issued delegation token a task start accepted (broker.identity.delegation_tokens), by issuer and
# jti, until the token has expired: the primary key makes the insert the one atomic "accept once" across
# replicas and concurrent requests. The maintenance loop deletes rows past ``expires_at``, when the token
# itself no longer verifies.
delegation_tokens = Table(
    "delegation_tokens",
    metadata,
    Column("issuer", String(320), primary_key=True),
    Column("jti", String(255), primary_key=True),
    Column("expires_at", Float, nullable=False),
    Column("accepted_at", Float, nullable=False),
    Column("agent", String(2048), nullable=False),
    Index("ix_delegation_tokens_expires", "expires_at"),
)

# The work one replica does at a time (broker.singletons): the holder's lease, in the database's clock
# (replicas' clocks may differ; the database's is one), and a fencing number that grows at every change
# of holder, so work done under a lost lease can be told from the new holder's.
singletons = Table(
    "singletons",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(200), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("fence", BigInteger, nullable=False),
)

# Vault request ids merged into the chain from any node's audit file (broker.audit.tailer): an entry
# that several nodes' files hold is merged once.
vault_audit_requests = Table(
    "vault_audit_requests",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("seen_at", Float, nullable=False),
)

# Console sessions (broker.console), shared by every replica: keyed by the SHA-256 of the session id (the id
# itself, the cookie's value, is never stored), holding the verified identity as JSON and the session's
# synchronizer token. ``person`` is the person id, for the per-person cap.
console_sessions = Table(
    "console_sessions",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("person", String(320), nullable=False),
    Column("identity", Text, nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("flash", Text),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_console_sessions_person", "person", "created_at"),
    Index("ix_console_sessions_expires", "expires_at"),
)
