"""Wire models: what crosses HTTP, in both directions. The only module (with ``config``) that imports pydantic.

Requests forbid unknown fields, so a misspelt ``ttl`` is a 400 rather than a silently ignored limit.
Responses never carry Vault's lease ids, accessors or task tokens: only the broker's own ids.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_GRANT = r"^[a-z0-9][a-z0-9-]{0,62}$"


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

    _ttl_validator = field_validator("ttl", mode="before")(_ttl)


class RenewRequest(_Request):
    increment: int | None = Field(default=None, description="Seconds or a duration; capped by the grant and the task")

    _ttl_validator = field_validator("increment", mode="before")(_ttl)


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
    user: str
    agent: str
    role: str
    tenant: str
    reason: str
    state: Literal["active", "ended", "expired", "revoked"]
    created_at: float
    expires_at: float
    ended_at: float | None = None
    leases: list[LeaseOut] | None = None


class CredentialOut(BaseModel):
    lease_id: str
    grant: str
    expires_at: float
    renewable: bool
    data: dict[str, Any] = Field(description="The credential itself (username/password, certificate, token)")

    def __repr__(self) -> str:
        return f"CredentialOut(lease_id={self.lease_id!r}, data=<redacted>)"

    __str__ = __repr__


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
    user: str | None = None
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


class HealthOut(BaseModel):
    status: Literal["ok", "unavailable"]
    vault: Literal["ok", "sealed", "unreachable", "standby"]
    store: Literal["ok", "unavailable"]
    version: str


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    request_id: str | None = None
