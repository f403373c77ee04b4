"""Wire models: what crosses HTTP, in both directions. The only module (with ``config``) that imports pydantic.

Requests forbid unknown fields, so a misspelt ``ttl`` is a 400 rather than a silently ignored limit.
Responses never carry Vault's lease ids, accessors or task tokens: only the broker's own ids.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_GRANT = r"^[a-z0-9][a-z0-9-]{0,62}$"
_PERSON = "The person: their id, '<issuer>#<subject>' of their ID token (what every decision compares)"
_PERSON_NAME = "Their display name (the trusted email, else the subject): for people to read, never matched"


def _ttl(value: object) -> object:
    from broker.config import parse_duration

    return value if value is None else parse_duration(value)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskCreate(_Request):
    agent: str = Field(min_length=1, max_length=2048, description="The agent's SPIFFE ID")
    role: str = Field(pattern=_GRANT, description="A task role from the catalog")
    ttl: int = Field(description="Seconds, or a duration like '15m'; capped at the role's max_ttl")
    reason: str = Field(min_length=1, max_length=500, description="Why the task exists, for the audit trail")
    tenant: str | None = Field(default=None, pattern=_GRANT)

    _ttl_validator = field_validator("ttl", mode="before")(_ttl)


class CredentialRequest(_Request):
    grant: str = Field(pattern=_GRANT)
    ttl: int | None = Field(default=None, description="Seconds or a duration; capped by the grant and the task")
    approval_id: str | None = Field(default=None, max_length=64,
                                    description="For a high-risk grant: the approval that covers this exact request")

    _ttl_validator = field_validator("ttl", mode="before")(_ttl)


class RenewRequest(_Request):
    increment: int | None = Field(default=None, description="Seconds or a duration; capped by the grant and the task")

    _ttl_validator = field_validator("increment", mode="before")(_ttl)


class RevocationCreate(_Request):
    """Exactly one selector, and a reason for the audit trail."""

    user: str | None = Field(default=None, min_length=1, max_length=320,
                             description="A person id ('<issuer>#<subject>'), or an email address: every person "
                                         "whose tokens carried it trusted, whatever their next token says")
    agent: str | None = Field(default=None, min_length=1, max_length=2048)
    task: str | None = Field(default=None, min_length=1, max_length=64)
    tenant: str | None = Field(default=None, pattern=_GRANT)
    reason: str = Field(min_length=1, max_length=500)
    wait: float = Field(default=10.0, ge=0, le=60, description="Seconds to wait for Vault to confirm")

    @model_validator(mode="after")
    def _one_selector(self) -> RevocationCreate:
        given = [k for k in ("user", "agent", "task", "tenant") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of user, agent, task, tenant")
        return self

    @property
    def selector(self) -> tuple[Literal["user", "agent", "task", "tenant"], str]:
        for k in ("user", "agent", "task", "tenant"):
            value = getattr(self, k)
            if value is not None:
                return k, value
        raise AssertionError("validated")


class RevocationLift(_Request):
    reason: str = Field(min_length=1, max_length=500)


class RevocationOut(BaseModel):
    id: str
    kind: Literal["user", "agent", "task", "tenant"]
    value: str
    reason: str
    created_by: str = Field(description="The operator. " + _PERSON)
    created_by_name: str | None = Field(default=None, description=_PERSON_NAME)
    created_at: float
    lock: bool = Field(description="Whether new tasks and credentials are blocked for this user, agent or tenant")
    lifted_at: float | None = None
    lifted_by: str | None = None
    lifted_by_name: str | None = None
    tasks: int = Field(description="Live tasks the revocation ended")
    leases: int = Field(description="Live leases those tasks held")
    revoked: int = Field(description="Leases Vault confirmed gone")
    pending: int = Field(description="Leases not yet confirmed; the broker retries until Vault confirms")
    state: Literal["in_progress", "done"]


class RevocationList(BaseModel):
    revocations: list[RevocationOut]


class LeaseListItem(BaseModel):
    id: str
    task: str
    user: str = Field(description=_PERSON)
    user_name: str | None = Field(default=None, description=_PERSON_NAME)
    agent: str
    tenant: str
    grant: str
    path: str
    state: Literal["active", "revoke_pending", "revoked", "expired"]
    issued_at: float
    expires_at: float
    revoked_at: float | None = None


class LeasePage(BaseModel):
    leases: list[LeaseListItem]
    next_after: str | None


class LeaseOut(BaseModel):
    id: str
    grant: str
    path: str
    state: Literal["active", "revoke_pending", "revoked", "expired"]
    issued_at: float
    expires_at: float
    renewable: bool


class TaskOut(BaseModel):
    id: str
    user: str = Field(description=_PERSON)
    user_name: str | None = Field(default=None, description=_PERSON_NAME)
    agent: str
    role: str
    tenant: str
    reason: str
    state: Literal["active", "ended", "expired", "revoked"]
    created_at: float
    expires_at: float
    ended_at: float | None = None
    leases: list[LeaseOut] | None = None


class TaskPage(BaseModel):
    tasks: list[TaskOut]
    next_after: str | None


class CredentialOut(BaseModel):
    lease_id: str
    grant: str
    expires_at: float
    renewable: bool
    data: dict[str, Any] = Field(description="The credential itself (username/password, certificate, token)")

    def __repr__(self) -> str:
        return f"CredentialOut(lease_id={self.lease_id!r}, data=<redacted>)"

    __str__ = __repr__


class ApprovalPendingOut(BaseModel):
    approval_id: str
    state: Literal["pending"] = "pending"
    expires_at: float


class ApprovalVote(BaseModel):
    approver: str = Field(description=_PERSON)
    approver_name: str | None = Field(default=None, description=_PERSON_NAME)
    decision: Literal["approve", "deny"]
    reason: str
    auth_time: float
    decided_at: float


class ApprovalOut(BaseModel):
    id: str
    state: Literal["pending", "approved", "denied", "expired", "consumed"]
    task: str
    user: str = Field(description="Who delegated the task. " + _PERSON)
    user_name: str | None = Field(default=None, description=_PERSON_NAME)
    agent: str
    tenant: str
    grant: str
    path: str
    ttl: int
    required: int = Field(description="Approvals needed (N of the approvers)")
    created_at: float
    expires_at: float
    decided_at: float | None = None
    task_reason: str | None = Field(default=None, description="Why the task exists, as its user said")
    votes: list[ApprovalVote] | None = None


class ApprovalList(BaseModel):
    approvals: list[ApprovalOut]


class ApprovalDecision(_Request):
    decision: Literal["approve", "deny"]
    reason: str = Field(min_length=1, max_length=500)


class RenewOut(BaseModel):
    lease_id: str
    expires_at: float


class EndOut(BaseModel):
    id: str
    state: Literal["ended", "expired", "revoked"]
    revoked: int = Field(description="Leases whose revocation Vault confirmed by this call")


class AuditOut(BaseModel):
    seq: int
    time: float
    event: str
    outcome: str
    user: str | None = Field(default=None, description=_PERSON)
    user_name: str | None = Field(default=None, description=_PERSON_NAME)
    agent: str | None = None
    task: str | None = None
    tenant: str | None = None
    resource: str | None = None
    action: str | None = None
    reason: str | None = None
    lease: str | None = None
    vault_request_id: str | None = None


class AuditPage(BaseModel):
    records: list[AuditOut]
    next_after: int | None = Field(description="Pass as `after` to get the next page; null at the end")


class AuditVerifyOut(BaseModel):
    """The audit chain recomputed and every checkpoint checked (``broker.audit.verify``)."""

    ok: bool
    records: int = Field(description="Records whose chain verified")
    checkpoints: int = Field(description="Stored checkpoints whose signature and head verified")
    witnessed: int = Field(default=0, description="Witness checkpoints that verified")
    first_bad_seq: int | None = Field(default=None, description="The first record the log no longer proves")
    reason: str | None = None


class HealthOut(BaseModel):
    """Readiness: whether this replica can issue now, and which part cannot when it cannot."""

    status: Literal["ok", "unavailable"]
    vault: Literal["ok", "sealed", "unreachable", "standby"] = Field(
        description="unreachable: Vault did not answer sys/health in time")
    store: Literal["ok", "unavailable", "unwritable"] = Field(
        description="unwritable: reads work but a write cannot commit (a full disk, a read-only file)")
    version: str
    singletons: list[str] = Field(default_factory=list, description=(
        "the work this replica does for all replicas now, under its lease in the store: maintenance, "
        "vault-audit-tailer, audit-exporter"))


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    request_id: str | None = None
