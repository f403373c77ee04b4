"""Wire models: what crosses HTTP, in both directions. The only module (with ``config``) that imports pydantic.

Requests forbid unknown fields, so a misspelt ``ttl`` is a 400 rather than a silently ignored limit.
Responses never carry Vault's lease ids, accessors or task tokens: only the broker's own ids.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

_GRANT = r"^[a-z0-9][a-z0-9-]{0,62}$"
_PERSON = "The person: their id, '<issuer>#<subject>' of their ID token (what every decision compares)"
_PERSON_NAME = "Their display name (the trusted email, else the subject): for people to read, never matched"
_REVOCATION = ("How the credential ends: 'revocable' (a Vault lease or token, revoked when the task ends), "
               "'expiry-only' (a certificate: nothing can pull it back, it lives at most its TTL), "
               "'static' (a KV value: the broker only stops handing it out; valid until rotated)")
Revocation = Literal["revocable", "expiry-only", "static"]
LeaseState = Literal["active", "revoke_pending", "revoked", "expired", "released"]


def _ttl(value: object) -> object:
    """A wire duration, exactly as ``DURATION_SCHEMA`` documents it (tests/unit/test_wire_durations.py).

    An integer number of seconds (``600``; also ``600.0``, which JSON Schema counts as an integer, while
    ``600.5`` is refused), or a string of digits or of ``h``/``m``/``s`` parts (``"600"``, ``"15m"``,
    ``"1h30m"``) without surrounding spaces. At least 1 s, at most 366 days.
    """
    from broker.config import parse_duration

    if value is None:
        return None
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError("a duration is a whole number of seconds or a string like '10m'")
        value = int(value)
    if isinstance(value, str) and (value != value.strip() or not value):
        raise ValueError("not a duration (use a number of seconds or e.g. '90s', '10m', '1h30m')")
    return parse_duration(value)


# What the API takes as a duration (``ttl``, ``increment``), in the OpenAPI document; ``_ttl`` accepts exactly it.
DURATION_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "integer", "minimum": 1, "maximum": 366 * 86400},  # broker.config.MAX_DURATION
        {"type": "string", "maxLength": 20,
         "pattern": "^(?:[0-9]+|[0-9]+h(?:[0-9]+m)?(?:[0-9]+s)?|[0-9]+m(?:[0-9]+s)?|[0-9]+s)$"},
    ],
}
WireDuration = Annotated[int, BeforeValidator(_ttl), WithJsonSchema(DURATION_SCHEMA)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskCreate(_Request):
    agent: str = Field(min_length=1, max_length=2048, description="The agent's SPIFFE ID")
    role: str = Field(pattern=_GRANT, description="A task role from the catalog")
    ttl: WireDuration = Field(description="Integer seconds (600), or a duration string ('600', '15m', '1h30m'); "
                                          "capped at the role's max_ttl")
    reason: str = Field(min_length=1, max_length=500, description="Why the task exists, for the audit trail")
    tenant: str | None = Field(default=None, pattern=_GRANT)


class DelegatedTaskCreate(_Request):
    """``POST /v1/tasks`` by an agent with ``X-Delegation-Token``: the user is the token's, the agent the caller."""

    role: str = Field(pattern=_GRANT, description="A task role from the catalog; the token's scope must name "
                                                  "task:<role>")
    ttl: WireDuration = Field(description="Integer seconds (600), or a duration string ('600', '15m', '1h30m'); "
                                          "capped at the role's max_ttl")
    reason: str = Field(min_length=1, max_length=500, description="Why the task exists, for the audit trail")
    tenant: str | None = Field(default=None, pattern=_GRANT)


class CredentialRequest(_Request):
    grant: str = Field(pattern=_GRANT)
    ttl: WireDuration | None = Field(default=None, description="Integer seconds, or a duration string ('15m'); "
                                                               "capped by the grant and the task")
    approval_id: str | None = Field(default=None, max_length=64,
                                    description="For a high-risk grant: the approval that covers this exact request")
    public_key: str | None = Field(default=None, min_length=1, max_length=16384,
                                   description="For an SSH grant whose params do not fix one: the OpenSSH public key "
                                               "to sign (ssh-ed25519, ecdsa-sha2-nistp256/384/521, or ssh-rsa of "
                                               "at least 3072 bits). The only field an agent chooses.")


class RenewRequest(_Request):
    increment: WireDuration | None = Field(default=None, description="Integer seconds, or a duration string ('5m'); "
                                                                     "capped by the grant and the task")


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
    state: LeaseState = Field(description="released: its task ended and it cannot be revoked (see revocation)")
    revocation: Revocation = Field(description=_REVOCATION)
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
    state: LeaseState = Field(description="released: its task ended and it cannot be revoked (see revocation)")
    revocation: Revocation = Field(description=_REVOCATION)
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
    revocation: Literal["revoke_pending", "revoked"] | None = Field(
        default=None, description="Once the task left active: revoke_pending until Vault confirmed its token and "
                                  "every lease gone, then revoked")
    leases: list[LeaseOut] | None = None


class GrantOut(BaseModel):
    """One grant of a task's role as its agent may see it: what it is for, never how Vault is reached."""

    name: str
    risk: Literal["low", "high"]
    approvals_required: int
    max_ttl: int = Field(description="Seconds; a credential also never outlives its task")
    revocation: Literal["revocable", "expiry-only", "static"] = Field(
        description="How its credential ends: revoked with the task, only at its TTL, or never")
    endpoint: str | None = Field(default=None, description="Where the credential is used (no credentials in it)")
    kind: Literal["postgresql", "mysql", "redis", "http"] | None = Field(
        default=None, description="What the endpoint is, from its scheme")
    allowed_hosts: list[str] = Field(default_factory=list,
                                     description="For an http grant: the hosts its credential may be sent to")
    http_auth: Literal["bearer", "vault-token", "client-certificate"] | None = None


class TaskGrants(BaseModel):
    task: str
    state: Literal["active", "ended", "expired", "revoked"]
    expires_at: float
    grants: list[GrantOut]


class TaskPage(BaseModel):
    tasks: list[TaskOut]
    next_after: str | None


class CredentialOut(BaseModel):
    lease_id: str
    grant: str
    expires_at: float
    renewable: bool
    revocation: Revocation = Field(description=_REVOCATION)
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
    state: Literal["ended", "expired", "revoked"] = Field(description="The task's state")
    revocation: Literal["revoke_pending", "revoked"] = Field(
        default="revoked", description="revoked (200): Vault confirmed everything the task held is gone. "
        "revoke_pending (202): Vault answered but has not confirmed every lease yet; the broker keeps "
        "confirming, and GET /v1/tasks/{id} shows `revocation` and each lease's state until it is done")
    revoked: int = Field(description="Leases whose revocation Vault confirmed by this call")
    pending: int = Field(default=0, description="Leases Vault has not confirmed gone yet")


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
    delegation_jti: str | None = Field(default=None, description="The jti of the IdP-issued delegation token the "
                                                                 "task was started with")
    caller_address: str | None = Field(
        default=None, description="Where the operation came from: the HTTP caller's address (the socket peer), or "
                                  "the remote address OpenBao logged; null when unknown")
    revocation: Revocation | None = Field(default=None, description="lease.issued and lease.released: "
                                          + _REVOCATION)
    key_fingerprint: str | None = Field(default=None, description="The SHA-256 fingerprint of the SSH public key "
                                        "a certificate was signed for")


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
    issuance_journal: Literal["on", "probing", "off"] = Field(
        default="off", description="on: each credential is one Vault request, journaled by Vault's audit device "
                                   "(X-Broker-Intent); probing: not confirmed yet; off: issuance tokens")
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


# -- the SSF transmitter's metadata (broker.signals.web) ------------------------------------------------


class SsfConfiguration(BaseModel):
    """Transmitter Configuration Metadata (OpenID SSF 1.0 section 7.1), at /.well-known/ssf-configuration."""

    spec_version: Literal["1_0"] = "1_0"
    issuer: str = Field(description="Every SET's iss; https, no path")
    jwks_uri: str = Field(description="The keys SETs are signed with")
    delivery_methods_supported: list[str] = Field(description="urn:ietf:rfc:8935: push over HTTP")
    critical_subject_members: list[str] = Field(
        description="Members of the complex subject a receiver must interpret, or discard the event")


class Jwk(BaseModel):
    model_config = ConfigDict(extra="allow")
    kty: Literal["EC", "RSA"]
    kid: str
    alg: Literal["ES256", "RS256"]
    use: Literal["sig"]


class Jwks(BaseModel):
    """A JWK Set (RFC 7517): the signing key first, then retired keys still accepted by receivers."""

    keys: list[Jwk]
