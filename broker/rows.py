"""The broker's records as the store returns them: frozen dataclasses, no behaviour, no I/O (pure code may use them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker.audit import AuditRecord


@dataclass(frozen=True)
class TaskRow:
    id: str
    user: str
    agent: str
    role: str
    tenant: str
    reason: str
    created_at: float
    expires_at: float
    state: str
    ended_at: float | None
    token_accessor: str
    sealed_token: bytes
    token_state: str = "live"  # noqa: S105 -- a state, not a password
    revoke_attempts: int = 0
    next_attempt_at: float | None = None
    revocation_id: str | None = None
    user_name: str | None = None
    user_email: str | None = None
    live_leases: int = 0  # its active leases (the budgets' count), as the store last wrote it

    def __repr__(self) -> str:  # the sealed token is not secret without the key, but keep reprs short
        return f"TaskRow(id={self.id!r}, user={self.user!r}, agent={self.agent!r}, state={self.state!r})"


@dataclass(frozen=True)
class LeaseRow:
    id: str
    task_id: str
    grant: str
    path: str
    kind: str
    vault_lease_id: str
    issued_at: float
    expires_at: float
    renewable: bool
    state: str
    revoked_at: float | None
    issuance_accessor: str | None = None


@dataclass(frozen=True)
class Intent:
    id: str
    kind: str
    task_id: str
    grant: str | None
    accessor: str | None
    created_at: float
    state: str = "open"
    resolved_at: float | None = None
    attempts: int = 0
    next_attempt_at: float | None = None
    # Read with the task token, the id in Vault's audit log (broker.journal); no issuance token.
    journaled: bool = False
    vault_ref: str | None = None  # what Vault's answer named, when the broker got it but did not record it
    vault_ref_kind: str | None = None  # "lease" or "token"


@dataclass(frozen=True)
class RevocationRow:
    id: str
    kind: str
    value: str
    reason: str
    created_by: str
    created_at: float
    lock: bool
    lifted_at: float | None
    lifted_by: str | None
    tasks: int
    leases: int
    created_by_name: str | None = None
    lifted_by_name: str | None = None


@dataclass(frozen=True)
class LeaseLimits:
    per_agent: int
    per_user: int


@dataclass(frozen=True)
class AuditRow:
    seq: int
    record: AuditRecord


@dataclass(frozen=True)
class VaultAuditPosition:
    """Where the Vault audit tailer is: the file (device, inode) and the offset after the last merged line."""

    path: str
    device: int
    inode: int
    offset: int
    lines: int = 0
    last_entry_at: float | None = None  # Vault's time of the newest entry read from the file


@dataclass(frozen=True)
class ChainSource:
    """How another process reads the chain as ``Store.chain_rows`` does: the DB-API module to connect with,
    its connection arguments, and the page query (``after``, ``lim``) rendered for that database, with
    its parameter order (None: named parameters) and default values."""

    module: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    sql: str
    order: tuple[str, ...] | None
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LookupSource:
    """How another process runs the Vault audit merge's look-ups as ``Store.vault_audit_context`` does: the
    DB-API module, its connection arguments, and the two queries rendered for that database (a learned
    token by its accessor, a task by its id), each with its parameter order (None: named parameters)."""

    module: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    token_sql: str
    token_order: tuple[str, ...] | None
    task_sql: str
    task_order: tuple[str, ...] | None


@dataclass(frozen=True)
class CheckpointRow:
    """A stored checkpoint: the chain's head at ``seq`` records and the signed note (broker.audit.signing)."""

    seq: int
    head_hash: str
    time: float
    note: str
    key_id: str


@dataclass(frozen=True)
class ApprovalRow:
    id: str
    task_id: str
    grant: str
    path: str
    ttl: int
    user: str
    agent: str
    tenant: str
    digest: str
    required: int
    state: str  # pending, approved, denied, expired, consumed
    created_at: float
    expires_at: float
    decided_at: float | None
    consumed_lease: str | None
    user_name: str | None = None


@dataclass(frozen=True)
class Person:
    """The person behind a request: id, display name, the email their token carried trusted (or None), and
    the email it claimed at all (or None), which only ever refuses (locks, self-approval, second votes)."""

    id: str
    name: str
    trusted_email: str | None
    email: str | None = None


@dataclass(frozen=True)
class JournalEntry:
    """An entry of Vault's audit device for a journaled intent (``X-Broker-Intent``), as the tailer read it.

    ``kind`` is ``"request"`` (Vault received it, at ``at``) or ``"response"`` (Vault answered: ``failed``,
    or the ``lease_id`` / token ``accessor`` it created). ``task_id`` is the task whose token made it.
    """

    intent_id: str
    kind: str
    task_id: str
    request_id: str
    at: float
    failed: bool
    lease_id: str | None = None
    accessor: str | None = None
    swept: bool = False
    checked: bool = False
    # Vault's backend failed the request (not a refusal before it ran): it may have left a lease its log
    # cannot name (broker.journal rule 9); ``path`` is the request's, to look for it there.
    vault_error: bool = False
    path: str | None = None
