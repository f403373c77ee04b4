"""Who may delegate which task role to which agent, and what a task may obtain. Pure: no I/O.

Rules this file keeps (deny by default; each check raises, none returns a bool to forget):
1. A role that is not in the catalog cannot be delegated, and the answer is the same as for a role
   the user may not delegate, so the API is not an oracle for role names.
2. A user may delegate a role only if named among its delegators, directly or through a group.
3. An agent may take a role only if its SPIFFE ID matches one of the role's patterns, segment-wise.
4. A task's TTL never exceeds its role's max TTL; a lease's TTL never exceeds its grant's max TTL nor
   the task's remaining time.
5. The user a credential is issued for comes from the task record, never from the request.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from broker.config import GrantSettings, Settings, TaskRoleSettings
from broker.endpoints import Endpoint, HostAllowList
from broker.engines import DYNAMIC, Engine, Revocation, infer_engine
from broker.errors import (
    AgentNotAllowed,
    BadRequest,
    ConfigError,
    Denied,
    Gone,
    GrantNotInRole,
    NotDelegator,
    NotTaskAgent,
)
from broker.identity import (
    AgentIdentity,
    SpiffeId,
    SpiffePattern,
    UserIdentity,
    is_person_id,
    normalize_email,
)
from broker.paths import validate_path
from broker.sshkeys import parse_public_key

Risk = Literal["low", "high"]
HttpAuth = Literal["bearer", "vault-token", "client-certificate"]
_PLACEHOLDER = re.compile(r"\{(task|agent|user|user_id|user_email|tenant|role)\}")


@dataclass(frozen=True)
class Principal:
    """A delegator, operator, auditor or approver entry: ``group:NAME`` or ``user:NAME`` (bare = user).

    A user is named by their person id (``user:https://idp.example.com#248289761001``: issuer, ``#``,
    subject), which matches that pair exactly, or by an email address, which matches only a person whose
    token carries that address *trusted* (verified by the issuer, or the issuer's ``trust_email``).
    """

    kind: Literal["user", "group"]
    name: str

    @classmethod
    def parse(cls, text: str) -> Principal:
        """Raises: ConfigError: empty name or unknown prefix."""
        kind, sep, name = text.partition(":")
        if not sep:
            kind, name = "user", text
        if kind not in ("user", "group") or not name:
            msg = f"principal must be 'user:NAME' or 'group:NAME', got {text!r}"
            raise ConfigError(msg)
        if kind == "user" and not is_person_id(name):
            name = normalize_email(name)  # an email address: compared as the verifier stores them
        return cls(kind, name)  # type: ignore[arg-type]

    def includes(self, user: UserIdentity) -> bool:
        if self.kind == "group":
            return self.name in user.groups
        if is_person_id(self.name):
            return self.name == user.id
        return user.trusted_email is not None and self.name == user.trusted_email


def any_includes(principals: Iterable[Principal], user: UserIdentity) -> bool:
    return any(p.includes(user) for p in principals)


@dataclass(frozen=True)
class Grant:
    name: str
    path: str
    max_ttl: int
    risk: Risk
    method: Literal["GET", "POST"]
    params: Mapping[str, str | int | bool] = field(default_factory=dict)
    approvals_required: int = 1
    engine: Engine = DYNAMIC
    allow_static: bool = False
    # Where `broker mcp` and the SDK's helpers use the credential (broker.endpoints), and for HTTP to
    # which hosts it may go and how it is carried.
    endpoint: Endpoint | None = None
    allowed_hosts: HostAllowList | None = None
    http_auth: HttpAuth | None = None

    @property
    def revocation(self) -> Revocation:
        """How a credential of this grant ends: ``revocable``, ``expiry-only`` or ``static`` (broker.engines)."""
        return self.engine.revocation

    def request_params(self, *, task: str, agent: str, user: str, tenant: str, role: str, ttl: int,
                       user_id: str | None = None, user_email: str | None = None,
                       inputs: Mapping[str, str] | None = None) -> dict[str, object]:
        """The body sent to Vault: the configured params with the task's values substituted, plus the TTL.

        Substitution is literal (no format-string evaluation), so a user or agent name cannot inject
        further placeholders. ``{user}`` is the person's display name (their trusted email, else ``sub``:
        two issuers' "alice" read alike), ``{user_id}`` their person id (unique), ``{user_email}`` their
        trusted email, which a grant that names it requires.

        Raises:
            Denied: a parameter names ``{user_email}`` and the task's person has no trusted email.
        """
        if user_email is None and any(isinstance(v, str) and "{user_email}" in v for v in self.params.values()):
            msg = "this grant needs a verified email address for the task's user"
            raise Denied(msg, reason=f"grant {self.name} uses {{user_email}}; the task's user has none trusted")
        values = {"task": task, "agent": agent, "user": user, "tenant": tenant, "role": role,
                  "user_id": user_id or user, "user_email": user_email or ""}
        out: dict[str, object] = {}
        for key, value in self.params.items():
            # One pass: a substituted value is never scanned again.
            out[key] = _PLACEHOLDER.sub(lambda m: values[m.group(1)], value) if isinstance(value, str) else value
        # The agent's own inputs were checked by check_inputs (never a key the params fix): sent verbatim.
        for key, value in (inputs or {}).items():
            out.setdefault(key, value)
        if self.engine.ttl_param:
            out["ttl"] = f"{ttl}s"
        return out


@dataclass(frozen=True)
class AgentInputs:
    """What the agent chose for one issuance (only what its grant's engine leaves open), checked.

    ``key_fingerprint`` names the SSH public key signed (the agent's or the one the grant fixes).
    """

    params: Mapping[str, str]
    key_fingerprint: str | None = None


def check_inputs(grant: Grant, *, public_key: str | None) -> AgentInputs:
    """The agent's request fields for ``grant``, parsed; refuses anything its engine does not leave open.

    Raises:
        BadRequest: a ``public_key`` for a grant that takes none (or whose params fix it), none where one is
            needed, or a key that is not an accepted OpenSSH public key (``broker.sshkeys``).
        Denied: a static grant without ``allow_static`` (the catalog refuses those at load too).
    """
    if grant.engine.revocation == "static" and not grant.allow_static:
        msg = "this grant hands out a static secret and does not allow it"
        raise Denied(msg, reason=f"grant {grant.name} is static without allow_static")
    fixed = grant.params.get("public_key")
    open_key = "public_key" in grant.engine.agent_inputs and fixed is None
    if public_key is None:
        if open_key:
            msg = "this grant signs your SSH public key: send public_key"
            raise BadRequest(msg, reason=f"grant {grant.name}: no public_key sent")
        fingerprint = parse_public_key(fixed).fingerprint if isinstance(fixed, str) else None
        return AgentInputs({}, fingerprint)
    if not open_key:
        msg = "this grant takes no public_key"
        raise BadRequest(msg, reason=f"grant {grant.name}: public_key sent where the grant takes none")
    key = parse_public_key(public_key)
    return AgentInputs({"public_key": key.openssh}, key.fingerprint)


@dataclass(frozen=True)
class TaskRole:
    name: str
    tenant: str
    agents: tuple[SpiffePattern, ...]
    delegators: tuple[Principal, ...]
    max_ttl: int
    grants: Mapping[str, Grant]

    @property
    def vault_policy(self) -> str:
        """Name of the Vault policy (and token role) that holds exactly this role's grants."""
        return f"broker-task-{self.name}"


@dataclass(frozen=True)
class Catalog:
    roles: Mapping[str, TaskRole]
    operators: tuple[Principal, ...] = ()
    auditors: tuple[Principal, ...] = ()
    approvers: tuple[Principal, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> Catalog:
        """Raises: ConfigError: a pattern, principal or Vault path does not parse."""
        roles = {r.name: _role(r) for r in settings.task_roles}
        p = settings.people
        return cls(
            roles=roles,
            operators=tuple(Principal.parse(x) for x in p.operators),
            auditors=tuple(Principal.parse(x) for x in p.auditors),
            approvers=tuple(Principal.parse(x) for x in p.approvers),
        )


def _role(r: TaskRoleSettings) -> TaskRole:
    grants = {}
    for g in r.grants:
        try:
            path = validate_path(g.path)
        except BadRequest as exc:
            msg = f"task role {r.name}, grant {g.name}: invalid Vault path {g.path!r}"
            raise ConfigError(msg) from exc
        if g.max_ttl > r.max_ttl:
            msg = f"task role {r.name}, grant {g.name}: max_ttl exceeds the role's max_ttl"
            raise ConfigError(msg)
        engine = _engine(r, g, path)
        endpoint = Endpoint.parse(g.endpoint) if g.endpoint is not None else None
        hosts = (HostAllowList.parse(g.allowed_hosts, default=endpoint.host)
                 if endpoint is not None and endpoint.kind == "http" else None)
        grants[g.name] = Grant(g.name, path, g.max_ttl, g.risk, _method(r, g, engine), dict(g.params),
                               g.approvals_required, engine, g.allow_static, endpoint=endpoint,
                               allowed_hosts=hosts, http_auth=g.http_auth)
    return TaskRole(
        name=r.name,
        tenant=r.tenant,
        agents=tuple(SpiffePattern.parse(a) for a in r.agents),
        delegators=tuple(Principal.parse(d) for d in r.delegators),
        max_ttl=r.max_ttl,
        grants=grants,
    )


def _engine(r: TaskRoleSettings, g: GrantSettings, path: str) -> Engine:
    where = f"task role {r.name}, grant {g.name}"
    try:
        engine = infer_engine(path, g.engine)
    except ConfigError as exc:
        msg = f"{where}: {exc}"
        raise ConfigError(msg) from exc
    if engine.revocation == "static" and not g.allow_static:
        msg = (f"{where}: {path!r} is a static secret (a {engine.name} read the broker can never revoke); "
               "set allow_static = true to hand it out anyway")
        raise ConfigError(msg)
    key = g.params.get("public_key")
    if key is not None:
        if "public_key" not in engine.agent_inputs or not isinstance(key, str):
            msg = f"{where}: public_key is a parameter of SSH signing grants only"
            raise ConfigError(msg)
        try:
            parse_public_key(key)
        except BadRequest as exc:
            msg = f"{where}: params.public_key: {exc.reason}"
            raise ConfigError(msg) from exc
    return engine


def _method(r: TaskRoleSettings, g: GrantSettings, engine: Engine) -> Literal["GET", "POST"]:
    asked: Literal["GET", "POST"] | None = {"read": "GET", "write": "POST", None: None}[g.method]
    if engine.method is None:  # dynamic: as the grant says, else a write when it has params
        return asked or ("POST" if g.params else "GET")
    if asked is not None and asked != engine.method:
        msg = (f"task role {r.name}, grant {g.name}: a {engine.name} grant is a "
               f"{'write' if engine.method == 'POST' else 'read'}, not a {g.method}")
        raise ConfigError(msg)
    return engine.method


@dataclass(frozen=True)
class StartDecision:
    role: TaskRole
    agent: SpiffeId
    ttl: int


def check_start(
    catalog: Catalog, user: UserIdentity, *, agent: str, role: str, ttl: int, tenant: str | None
) -> StartDecision:
    """May ``user`` delegate ``role`` to ``agent`` for ``ttl`` seconds?

    The TTL is capped at the role's max TTL (the caller reports the resulting ``expires_at``).

    Raises:
        InvalidIdentity: ``agent`` is not a valid SPIFFE ID (from the parser).
        NotDelegator: no such role, another tenant's role, or the user is not a delegator.
        AgentNotAllowed: the agent does not match the role's patterns.
        BadRequest: ``ttl`` is not positive.
    """
    if ttl <= 0:
        msg = "ttl must be positive"
        raise BadRequest(msg)
    agent_id = _parse_agent(agent)
    r = catalog.roles.get(role)
    if r is None or not any_includes(r.delegators, user) or (tenant is not None and tenant != r.tenant):
        msg = "this role cannot be delegated by this user"
        raise NotDelegator(msg, reason=f"user {user.id} may not delegate role {role!r} (tenant {tenant!r})")
    if not any(p.matches(agent_id) for p in r.agents):
        msg = "this agent may not take this role"
        raise AgentNotAllowed(msg, reason=f"agent {agent_id} matches no pattern of role {role}")
    return StartDecision(role=r, agent=agent_id, ttl=min(ttl, r.max_ttl))


def _parse_agent(agent: str) -> SpiffeId:
    from broker.errors import InvalidIdentity

    try:
        return SpiffeId.parse(agent)
    except InvalidIdentity as exc:
        msg = "agent must be a valid SPIFFE ID"
        raise BadRequest(msg, reason=exc.reason) from exc


@dataclass(frozen=True)
class TaskView:
    """The parts of a task that grant decisions need (decoupled from the store's row type)."""

    id: str
    agent: str
    role: str
    state: str
    expires_at: float


def check_grant(catalog: Catalog, task: TaskView, caller: AgentIdentity, grant: str, *, now: float) -> Grant:
    """May ``caller`` obtain ``grant`` under ``task`` now?

    Raises:
        NotTaskAgent: the caller is not the task's agent.
        Gone: the task is not active or has passed its deadline.
        GrantNotInRole: the grant is not part of the task's role (or the role left the catalog).
    """
    if str(caller.spiffe_id) != task.agent:
        msg = "only the task's agent may obtain its credentials"
        raise NotTaskAgent(msg, reason=f"{caller.spiffe_id} is not the agent of task {task.id}")
    if task.state != "active" or task.expires_at <= now:
        msg = "the task is no longer active"
        raise Gone(msg, reason=f"task {task.id} is {task.state}")
    role = catalog.roles.get(task.role)
    g = role.grants.get(grant) if role is not None else None
    if g is None:
        msg = "this grant is not part of the task's role"
        raise GrantNotInRole(msg, reason=f"grant {grant!r} not in role {task.role}")
    return g


def cap_ttl(grant: Grant, task: TaskView, requested: int | None, *, now: float) -> int:
    """The lease TTL to ask Vault for: ``min(requested, grant max, task remaining)``, whole seconds.

    Raises:
        BadRequest: ``requested`` is not positive.
        Gone: less than one second of the task remains.
    """
    if requested is not None and requested <= 0:
        msg = "ttl must be positive"
        raise BadRequest(msg)
    remaining = math.floor(task.expires_at - now)
    if remaining < 1:
        msg = "the task is no longer active"
        raise Gone(msg, reason=f"task {task.id} has {remaining}s left")
    return min(requested or grant.max_ttl, grant.max_ttl, remaining)
