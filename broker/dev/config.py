"""DEV ONLY: the broker's TOML configuration built from typed pieces, for ``broker dev``, the tests and the benchmarks.

One builder instead of a TOML template per caller: ``BrokerConfig`` holds what a dev or test broker
varies (where it listens, the Vault it talks to, its files, whom it trusts, its task roles) with the
defaults they share, and ``to_toml()`` writes the file that ``broker.config.load_settings`` reads. A
caller states only what differs from the defaults, e.g. ``dataclasses.replace(cfg, vault_timeout=2)``.

Rules this file keeps:
- It only writes text; ``broker.config`` stays the one place that reads and validates it. Keys the
  builder leaves out get the broker's own defaults, so an omitted value and a default one load alike.
- Override tables (``limits``, ``maintenance``) are checked against the settings models' field names
  here, so a typo fails where it was written, not later as an "unknown key" of a file on disk.
- ``render_toml`` handles the subset these files use (tables, arrays of tables, inline tables, arrays,
  strings, ints, floats, bools) and refuses anything else rather than writing TOML that might not
  read back the same; tests/unit/test_devconfig.py round-trips it through ``tomllib``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from broker.config import LimitsSettings, MaintenanceSettings

# The audience every dev and test identity is minted for.
AUDIENCE = "agent-broker"


@dataclass(frozen=True, kw_only=True)
class Grant:
    """One ``[[task_roles.grants]]`` entry. ``risk`` and ``approvals_required`` are written only if not the default."""

    name: str
    path: str
    max_ttl: str | int
    risk: Literal["low", "high"] = "low"
    approvals_required: int = 1
    method: Literal["read", "write"] | None = None
    params: Mapping[str, str | int | bool] = field(default_factory=dict)
    endpoint: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    http_auth: Literal["bearer", "vault-token", "client-certificate"] | None = None
    engine: str | None = None
    allow_static: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "path": self.path}
        if self.engine is not None:
            d["engine"] = self.engine
        if self.allow_static:
            d["allow_static"] = True
        if self.method is not None:
            d["method"] = self.method
        d["max_ttl"] = self.max_ttl
        if self.risk != "low":
            d["risk"] = self.risk
        if self.approvals_required != 1:
            d["approvals_required"] = self.approvals_required
        if self.params:
            d["params"] = dict(self.params)
        if self.endpoint is not None:
            d["endpoint"] = self.endpoint
        if self.allowed_hosts:
            d["allowed_hosts"] = list(self.allowed_hosts)
        if self.http_auth is not None:
            d["http_auth"] = self.http_auth
        return d


@dataclass(frozen=True, kw_only=True)
class TaskRole:
    """One ``[[task_roles]]`` entry: which agents, delegated by whom, get which grants, for how long."""

    name: str
    tenant: str
    agents: tuple[str, ...]
    delegators: tuple[str, ...]
    max_ttl: str | int
    grants: tuple[Grant, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tenant": self.tenant, "agents": list(self.agents),
                "delegators": list(self.delegators), "max_ttl": self.max_ttl,
                "grants": [g.to_dict() for g in self.grants]}


@dataclass(frozen=True, kw_only=True)
class AgentTrust:
    """One ``[[agents.trust]]`` entry: a SPIFFE trust domain and the JWKS file of its JWT-SVID keys."""

    trust_domain: str
    jwks_file: str | Path

    def to_dict(self) -> dict[str, Any]:
        return {"trust_domain": self.trust_domain, "jwks_file": str(self.jwks_file)}


@dataclass(frozen=True, kw_only=True)
class UserIssuer:
    """One ``[[users.issuers]]`` entry: an OIDC issuer and the JWKS file of its signing keys."""

    issuer: str
    jwks_file: str | Path
    groups_claim: str = "groups"

    def to_dict(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "jwks_file": str(self.jwks_file), "groups_claim": self.groups_claim}


@dataclass(frozen=True, kw_only=True)
class KubernetesCluster:
    """One ``[[agents.kubernetes]]`` entry: a cluster's service-account issuer and keys, and the trust domain
    its pods' agents get (``spiffe://<trust_domain>/ns/<namespace>/sa/<name>``)."""

    trust_domain: str
    issuer: str
    jwks_file: str | Path

    def to_dict(self) -> dict[str, Any]:
        return {"trust_domain": self.trust_domain, "issuer": self.issuer, "jwks_file": str(self.jwks_file)}


@dataclass(frozen=True, kw_only=True)
class DelegationIssuer:
    """One ``[[users.delegation_issuers]]`` entry: an IdP whose RFC 8693 tokens let agents start tasks."""

    issuer: str
    jwks_file: str | Path
    groups_claim: str = "groups"

    def to_dict(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "jwks_file": str(self.jwks_file), "groups_claim": self.groups_claim}


@dataclass(frozen=True, kw_only=True)
class People:
    """``[people]``: who operates, audits and approves (``group:<name>`` or a person)."""

    operators: tuple[str, ...] = ()
    auditors: tuple[str, ...] = ()
    approvers: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in
                (("operators", self.operators), ("auditors", self.auditors), ("approvers", self.approvers)) if v}


# The dev groups: secops operates, audit audits, secops-leads approves high-risk grants.
DEV_PEOPLE = People(operators=("group:secops",), auditors=("group:audit",), approvers=("group:secops-leads",))


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """A dev or test broker's whole configuration. Relative paths are relative to the file written.

    Raises:
        ValueError: a ``limits`` or ``maintenance`` key that the broker does not have.
    """

    vault_addr: str | tuple[str, ...]
    listen: str = "127.0.0.1:0"
    audience: str = AUDIENCE
    token_file: str | Path = "vault-token"  # noqa: S105 -- the name of the file that holds it
    audit_log: str | Path | tuple[str | Path, ...] | None = None
    vault_device: str | tuple[str, ...] | None = None
    vault_timeout: float | None = None
    revoke_confirm_timeout: float | None = None
    task_token_bootstrap_ttl: int | None = None
    store_url: str = "sqlite:///broker.db"
    key_file: str | Path = "store.key"
    signing_key_file: str | Path | None = None
    witness_file: str | Path | None = None
    agents: tuple[AgentTrust, ...] = ()
    clusters: tuple[KubernetesCluster, ...] = ()
    users: tuple[UserIssuer, ...] = ()
    delegation_issuers: tuple[DelegationIssuer, ...] = ()
    people: People = People()
    limits: Mapping[str, int | float] = field(default_factory=dict)
    maintenance: Mapping[str, int | float] = field(default_factory=dict)
    task_roles: tuple[TaskRole, ...] = ()
    comment: str | None = None

    def __post_init__(self) -> None:
        for section, given, model in (("limits", self.limits, LimitsSettings),
                                      ("maintenance", self.maintenance, MaintenanceSettings)):
            unknown = sorted(set(given) - set(model.model_fields))
            if unknown:
                msg = f"[{section}] has no setting {', '.join(unknown)}"
                raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        addr = self.vault_addr if isinstance(self.vault_addr, str) else list(self.vault_addr)
        vault: dict[str, Any] = {"addr": addr, "token_file": str(self.token_file)}
        if isinstance(self.audit_log, tuple):
            vault["audit_log"] = [str(p) for p in self.audit_log]
        else:
            _put(vault, "audit_log", self.audit_log)
        _put(vault, "timeout", self.vault_timeout)
        _put(vault, "revoke_confirm_timeout", self.revoke_confirm_timeout)
        _put(vault, "task_token_bootstrap_ttl", self.task_token_bootstrap_ttl)
        doc: dict[str, Any] = {
            "server": {"listen": self.listen, "audience": self.audience},
            "vault": vault,
            "store": {"url": self.store_url, "key_file": str(self.key_file)},
        }
        audit: dict[str, Any] = {}
        if self.vault_device is not None:
            audit["vault_device"] = (self.vault_device if isinstance(self.vault_device, str)
                                     else list(self.vault_device))
        _put(audit, "signing_key_file", self.signing_key_file)
        _put(audit, "witness_file", self.witness_file)
        for name, table in (("audit", audit), ("limits", dict(self.limits)),
                            ("maintenance", dict(self.maintenance))):
            if table:
                doc[name] = table
        agents: dict[str, Any] = {}
        if self.agents:
            agents["trust"] = [a.to_dict() for a in self.agents]
        if self.clusters:
            agents["kubernetes"] = [c.to_dict() for c in self.clusters]
        if agents:
            doc["agents"] = agents
        users: dict[str, Any] = {}
        if self.users:
            users["issuers"] = [u.to_dict() for u in self.users]
        if self.delegation_issuers:
            users["delegation_issuers"] = [d.to_dict() for d in self.delegation_issuers]
        if users:
            doc["users"] = users
        if people := self.people.to_dict():
            doc["people"] = people
        if self.task_roles:
            doc["task_roles"] = [r.to_dict() for r in self.task_roles]
        return doc

    def to_toml(self) -> str:
        return render_toml(self.to_dict(), comment=self.comment)

    def write(self, path: Path) -> Path:
        """Write the TOML file to ``path`` and return ``path``."""
        path.write_text(self.to_toml())
        return path


def _put(table: dict[str, Any], key: str, value: str | Path | float | None) -> None:
    if value is not None:
        table[key] = str(value) if isinstance(value, Path) else value


# --------------------------------------------------------------------------------------------------
# The example engines of broker.dev.stack, as grants (each caller names its own mounts)


def tickets_ro_grant(*, mount: str = "database", name: str = "tickets-db-ro", max_ttl: str = "10m") -> Grant:
    """A read-only login to the tickets database (``configure_database``'s ``tickets-ro`` role)."""
    return Grant(name=name, path=f"{mount}/creds/tickets-ro", max_ttl=max_ttl)


def agent_cert_grant(trust_domain: str, *, mount: str = "pki", name: str = "agent-cert",
                     max_ttl: str = "10m") -> Grant:
    """A certificate from ``configure_pki``'s ``agents`` role: ``<task>.agents.<trust_domain>``, URI SAN the agent."""
    return Grant(name=name, path=f"{mount}/issue/agents", max_ttl=max_ttl,
                 params={"common_name": f"{{task}}.agents.{trust_domain}", "uri_sans": "{agent}"})


def child_token_grant(*, token_role: str = "agent-child", name: str = "child-token",  # noqa: S107 -- role names
                      max_ttl: str = "10m") -> Grant:
    """A Vault token from ``configure_child_token_role``'s token role (a write: the create endpoint)."""
    return Grant(name=name, path=f"auth/token/create/{token_role}", method="write", max_ttl=max_ttl)


def example_grants(trust_domain: str, *, pki_mount: str = "pki", db_mount: str = "database",
                   token_role: str = "agent-child") -> tuple[Grant, Grant, Grant]:  # noqa: S107 -- a role name
    """The three low-risk grants over the example engines: a database login, a certificate, a child token."""
    return (tickets_ro_grant(mount=db_mount), agent_cert_grant(trust_domain, mount=pki_mount),
            child_token_grant(token_role=token_role))


# --------------------------------------------------------------------------------------------------
# A TOML writer for the subset above (the standard library only reads TOML)

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def render_toml(doc: Mapping[str, Any], *, comment: str | None = None) -> str:
    """TOML text for ``doc``: a mapping at the top level is a ``[table]``, a list of mappings at any level an
    ``[[array of tables]]``, and any other mapping (a grant's ``params``) an inline table.

    Raises:
        TypeError: a value TOML cannot hold this way (``None``, a date, bytes, a non-string key, ...).
        ValueError: a string with a lone surrogate (not Unicode text).
    """
    lines = [f"# {line}".rstrip() for line in comment.splitlines()] if comment else []
    _table(lines, (), doc, top=True)
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and bool(value) and all(
        isinstance(v, Mapping) for v in value)


def _table(lines: list[str], path: tuple[str, ...], table: Mapping[str, Any], *, top: bool = False,
           array_item: bool = False, depth: int = 0) -> None:
    """Key/value lines first, then sub-tables: TOML puts every later key/value in the last header's table.

    ``depth`` counts the arrays of tables this one sits in; it only indents (a grant under its task role).
    """
    plain = {k: v for k, v in table.items() if not (_is_table_array(v) or (top and isinstance(v, Mapping)))}
    header = ".".join(_key(p) for p in path)
    pad = "  " * max(depth - 1, 0)
    if array_item:
        lines += ["", f"{pad}[[{header}]]"]
    elif path and (plain or not table):  # a table holding only sub-tables needs no header of its own
        lines += ["", f"{pad}[{header}]"]
    lines += [f"{pad}{_key(k)} = {_value(v)}" for k, v in plain.items()]
    for k, v in table.items():
        if k in plain:
            continue
        if isinstance(v, Mapping):
            _table(lines, (*path, k), v, depth=depth)
        else:
            for item in v:
                _table(lines, (*path, k), item, array_item=True, depth=depth + 1)


def _key(key: object) -> str:
    if not isinstance(key, str):
        msg = f"a TOML key is a string, not {type(key).__name__}"
        raise TypeError(msg)
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch < " " or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        elif "\ud800" <= ch <= "\udfff":
            msg = "a lone surrogate is not a Unicode scalar value: TOML cannot hold it"
            raise ValueError(msg)
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Path):
        return _string(str(value))
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }" if value else "{}"
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    msg = f"TOML cannot hold {type(value).__name__} here"
    raise TypeError(msg)
