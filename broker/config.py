"""The broker's settings: one TOML file, then ``BROKER_<SECTION>_<KEY>`` environment overrides.

Parsed once, at the edge (``cli``), into frozen models that the rest of the code receives. Nothing else
in the package reads the environment. Unknown keys are errors: a typo in a security setting must not
silently fall back to a default.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from broker.errors import ConfigError

_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
_NAME = r"^[a-z0-9][a-z0-9-]{0,62}$"
MAX_DURATION = 366 * 86400


def parse_duration(value: object) -> int:
    """Seconds from ``90``, ``"90"``, ``"90s"``, ``"10m"``, ``"1h30m"``.

    Raises:
        ValueError: not a positive duration.
    """
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '10m'")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str):
        text = value.strip()
        if len(text) > 20:
            raise ValueError("not a duration (use a number of seconds or e.g. '90s', '10m', '1h30m')")
        if text.isascii() and text.isdigit():
            seconds = int(text)
        else:
            m = _DURATION.fullmatch(text) if text.isascii() else None
            if not text or m is None:
                # The value is not repeated: over HTTP it is the caller's input (never echoed, TH-21).
                raise ValueError("not a duration (use a number of seconds or e.g. '90s', '10m', '1h30m')")
            h, mi, s = (int(g) if g else 0 for g in m.groups())
            seconds = h * 3600 + mi * 60 + s
    else:
        raise ValueError("a duration is a number of seconds or a string like '10m'")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    if seconds > MAX_DURATION:
        raise ValueError("a duration must be at most 366 days")
    return seconds


Duration = Annotated[int, BeforeValidator(parse_duration)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerSettings(_Frozen):
    listen: str = "127.0.0.1:8400"
    audience: str = Field(min_length=1)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, le=1024 * 1024)
    token_leeway: int = Field(default=30, ge=0, le=60)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        _host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError("listen must be HOST:PORT")
        return v


class VaultSettings(_Frozen):
    # One node, or every node of a cluster (integrated storage): the broker talks to the active one.
    addr: str | tuple[str, ...] = "http://127.0.0.1:8200"
    token_file: Path
    # The file audit device's file, or every node's (merged and deduplicated by request id).
    audit_log: Path | tuple[Path, ...] | None = None
    timeout: float = Field(default=5.0, gt=0, le=60)
    # With several nodes: how long one request may spend finding the active node (leader election takes
    # a few seconds) before its caller gets ``VaultUnavailable``.
    failover_timeout: float = Field(default=10.0, gt=0, le=120)
    namespace: str | None = None
    # How long `end` waits for Vault to confirm that a task's leases are gone before it reports
    # them `revoke_pending` (revoke-accessor returns before the leases are revoked).
    revoke_confirm_timeout: float = Field(default=5.0, gt=0, le=60)
    # A task token is created with this short TTL and extended to the task's end only once the task
    # is recorded: if the broker dies in between, the unrecorded token dies by itself this soon.
    task_token_bootstrap_ttl: int = Field(default=30, ge=5, le=300)

    @field_validator("addr")
    @classmethod
    def _addrs(cls, v: str | tuple[str, ...]) -> str | tuple[str, ...]:
        nodes = (v,) if isinstance(v, str) else v
        if not nodes or len(set(nodes)) != len(nodes):
            raise ValueError("addr is one URL or a list of distinct URLs")
        return v

    @field_validator("audit_log")
    @classmethod
    def _audit_logs(cls, v: Path | tuple[Path, ...] | None) -> Path | tuple[Path, ...] | None:
        if isinstance(v, tuple) and (not v or len(set(v)) != len(v)):
            raise ValueError("audit_log is one file or a list of distinct files")
        return v

    @property
    def addrs(self) -> tuple[str, ...]:
        """Every node's address, in the configured order (one for a single server)."""
        return (self.addr,) if isinstance(self.addr, str) else self.addr

    @property
    def audit_logs(self) -> tuple[Path, ...]:
        """Every node's audit file (empty: no tailer)."""
        if self.audit_log is None:
            return ()
        return (self.audit_log,) if isinstance(self.audit_log, Path) else self.audit_log


class LimitsSettings(_Frozen):
    """Budgets that keep one runaway agent or user from flooding Vault (lease quotas are Enterprise-only)."""

    max_live_leases_per_agent: int = Field(default=1000, ge=1)
    max_live_leases_per_user: int = Field(default=5000, ge=1)
    # Token buckets: sustained issuances per second and burst, per agent and per user.
    issue_rate_per_agent: float = Field(default=50.0, gt=0)
    issue_burst_per_agent: int = Field(default=100, ge=1)
    issue_rate_per_user: float = Field(default=200.0, gt=0)
    issue_burst_per_user: int = Field(default=400, ge=1)
    # Every other call that costs Vault or store work, per person or per agent (429 + Retry-After):
    # a task start creates a Vault token (a refused one writes an audit row), a renewal calls Vault,
    # a decision writes a vote, a console sign-in makes a session.
    task_start_rate_per_user: float = Field(default=5.0, gt=0)
    task_start_burst_per_user: int = Field(default=20, ge=1)
    renew_rate_per_agent: float = Field(default=10.0, gt=0)
    renew_burst_per_agent: int = Field(default=50, ge=1)
    decide_rate_per_approver: float = Field(default=2.0, gt=0)
    decide_burst_per_approver: int = Field(default=20, ge=1)
    sign_in_rate_per_person: float = Field(default=0.2, gt=0)
    sign_in_burst_per_person: int = Field(default=10, ge=1)
    # Every authenticated API request, whatever the route, per agent or person: a flood guard above the
    # specific limits (reads of the store, task ends, revocations included).
    request_rate_per_identity: float = Field(default=200.0, gt=0)
    request_burst_per_identity: int = Field(default=1000, ge=1)
    # Long polls (GET /v1/approvals/{id}?wait=) one identity may hold at once.
    long_polls_per_identity: int = Field(default=4, ge=1, le=100)
    # Console sessions one person may hold; a new sign-in past it ends that person's oldest session.
    console_sessions_per_person: int = Field(default=5, ge=1, le=100)


class MaintenanceSettings(_Frozen):
    """The background loop: reconcile intents, retry revocations, mark expiries."""

    interval: float = Field(default=2.0, gt=0, le=60)
    # An open intent younger than this may belong to an issuance still in flight on some replica.
    intent_grace: float = Field(default=30.0, gt=0, le=600)
    # Revocation retries back off exponentially from 1 s up to this.
    max_backoff: float = Field(default=60.0, ge=1, le=3600)


class StoreSettings(_Frozen):
    url: str = "sqlite:///broker.db"
    # AES-256-GCM key that seals task tokens at rest. It must not live in the store itself.
    key_file: Path


class AgentTrust(_Frozen):
    trust_domain: str
    jwks_file: Path | None = None
    jwks_url: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> AgentTrust:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("give exactly one of jwks_file or jwks_url")
        return self


class AgentsSettings(_Frozen):
    trust: tuple[AgentTrust, ...] = ()
    # SVIDs are short-lived by design; a longer-lived token is refused (threat TH-06).
    max_token_lifetime: Duration = 900


class UserIssuer(_Frozen):
    issuer: str
    jwks_file: Path | None = None
    jwks_url: str | None = None
    groups_claim: str = "groups"
    # Trust every email this issuer puts in a token, verified or not (only for an IdP whose directory
    # assigns the addresses). Otherwise only `email_verified: true` makes an address match anything.
    trust_email: bool = False
    # The email domains this issuer may vouch for (e.g. ["example.com"]); empty: any. With several
    # issuers, give each its own: otherwise one IdP can mint a trusted address another one owns.
    email_domains: tuple[str, ...] = ()

    @field_validator("email_domains")
    @classmethod
    def _domains(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(d.strip().casefold() for d in v)

    @model_validator(mode="after")
    def _one_source(self) -> UserIssuer:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("give exactly one of jwks_file or jwks_url")
        return self


class UsersSettings(_Frozen):
    issuers: tuple[UserIssuer, ...] = ()


class PeopleSettings(_Frozen):
    operators: tuple[str, ...] = ()
    auditors: tuple[str, ...] = ()
    approvers: tuple[str, ...] = ()
    approval_max_auth_age: Duration = 300
    # How long an approval waits for its approvers, and then for its one use.
    approval_ttl: Duration = 900


class GrantSettings(_Frozen):
    name: str = Field(pattern=_NAME)
    path: str
    max_ttl: Duration
    risk: Literal["low", "high"] = "low"
    # For a high-risk grant: how many distinct approvers must approve (a two-person rule is 2).
    approvals_required: int = Field(default=1, ge=1, le=10)
    # How the credential is obtained: "read" (GET, e.g. database/creds/x) or "write" (POST with
    # `params`, e.g. pki/issue/x). Default: "write" when params are given, else "read".
    method: Literal["read", "write"] | None = None
    # Fixed request parameters. The agent cannot supply parameters: that would let it widen what it
    # gets (a certificate for any name). `{task}`, `{agent}`, `{user}` (display name), `{user_id}`
    # (the person id, unique), `{user_email}` (trusted email; required if named), `{tenant}`, `{role}`
    # are substituted with the task's values.
    params: Mapping[str, str | int | bool] = Field(default_factory=dict)


class TaskRoleSettings(_Frozen):
    name: str = Field(pattern=_NAME)
    tenant: str = Field(pattern=_NAME)
    agents: tuple[str, ...] = Field(min_length=1)
    delegators: tuple[str, ...] = Field(min_length=1)
    max_ttl: Duration
    grants: tuple[GrantSettings, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_grants(self) -> TaskRoleSettings:
        names = [g.name for g in self.grants]
        if len(names) != len(set(names)):
            raise ValueError(f"task role {self.name}: grant names must be unique")
        return self


class AuditSettings(_Frozen):
    """The tamper-evident log: signed checkpoints, a witness, Vault's audit device, export sinks."""

    # Ed25519 private key (PKCS#8 PEM) that signs checkpoints. Keep it off the database host.
    signing_key_file: Path | None = None
    # A checkpoint every this many records, or this many seconds, whichever comes first.
    checkpoint_every: int = Field(default=100, ge=1, le=100_000)
    checkpoint_interval: float = Field(default=60.0, gt=0, le=3600)
    # Checkpoints are also appended to this file (a witness outside the store).
    witness_file: Path | None = None
    origin: str = "agent-broker"
    # The name of Vault's file audit device (for sys/audit-hash); its file is [vault].audit_log. With
    # several files, one name per file in the same order (each node's device has its own salt).
    vault_device: str | tuple[str, ...] = "main"
    # Export sinks: JSON lines (or OCSF) appended to a file, and/or POSTed to a webhook.
    export_file: Path | None = None
    export_format: Literal["jsonl", "ocsf"] = "jsonl"
    export_url: str | None = None
    # Records not yet exported beyond this many: issuance fails closed until the sink catches up.
    export_backlog_limit: int = Field(default=10_000, ge=1)


    @property
    def vault_devices(self) -> tuple[str, ...]:
        return (self.vault_device,) if isinstance(self.vault_device, str) else self.vault_device


class Settings(_Frozen):
    server: ServerSettings
    vault: VaultSettings
    store: StoreSettings
    agents: AgentsSettings = AgentsSettings()
    users: UsersSettings = UsersSettings()
    people: PeopleSettings = PeopleSettings()
    limits: LimitsSettings = LimitsSettings()
    maintenance: MaintenanceSettings = MaintenanceSettings()
    audit: AuditSettings = AuditSettings()
    task_roles: tuple[TaskRoleSettings, ...] = ()

    @model_validator(mode="after")
    def _unique_roles(self) -> Settings:
        names = [r.name for r in self.task_roles]
        if len(names) != len(set(names)):
            raise ValueError("task role names must be unique")
        return self

    @model_validator(mode="after")
    def _one_device_per_file(self) -> Settings:
        devices, files = self.audit.vault_devices, self.vault.audit_logs
        if len(files) > 1 and not isinstance(self.audit.vault_device, str) and len(devices) != len(files):
            raise ValueError("audit.vault_device: one device name per [vault].audit_log file")
        return self


# Scalar settings that the environment may override, e.g. BROKER_VAULT_ADDR.
_ENV_KEYS: dict[str, tuple[str, str]] = {
    f"BROKER_{section.upper()}_{key.upper()}": (section, key)
    for section, keys in {
        "server": ("listen", "audience"),
        "vault": ("addr", "token_file", "audit_log", "timeout", "namespace"),
        "store": ("url", "key_file"),
    }.items()
    for key in keys
}

# Of those, the ones that take a list (BROKER_VAULT_ADDR="http://a:8200,http://b:8200").
_LIST_KEYS = frozenset({("vault", "addr"), ("vault", "audit_log")})


def load_settings(environ: Mapping[str, str], path: str | Path | None) -> Settings:
    """Read the TOML file (if any), apply ``BROKER_*`` overrides, validate.

    Relative paths in the file are taken relative to the file's directory.

    Raises:
        ConfigError: the file cannot be read or the settings are invalid.
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            msg = f"cannot read configuration {p}: {exc}"
            raise ConfigError(msg) from exc
        base = p.resolve().parent
    for var, (section, key) in _ENV_KEYS.items():
        if var in environ:
            text = environ[var]
            value: str | list[str] = text
            if (section, key) in _LIST_KEYS and "," in text:
                value = [v.strip() for v in text.split(",") if v.strip()]
            raw.setdefault(section, {})[key] = value
    _resolve_paths(raw, base)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        msg = "invalid configuration: " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(msg) from exc


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    def fix(d: Any, key: str) -> None:
        if isinstance(d, dict) and isinstance(d.get(key), str) and not Path(d[key]).is_absolute():
            d[key] = str(base / d[key])
        elif isinstance(d, dict) and isinstance(d.get(key), list):
            d[key] = [str(base / x) if isinstance(x, str) and not Path(x).is_absolute() else x for x in d[key]]

    fix(raw.get("vault"), "token_file")
    fix(raw.get("vault"), "audit_log")
    fix(raw.get("store"), "key_file")
    for key in ("signing_key_file", "witness_file", "export_file"):
        fix(raw.get("audit"), key)
    for t in (raw.get("agents") or {}).get("trust") or []:
        fix(t, "jwks_file")
    for i in (raw.get("users") or {}).get("issuers") or []:
        fix(i, "jwks_file")
    store = raw.get("store")
    if isinstance(store, dict) and isinstance(store.get("url"), str):
        url: str = store["url"]
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
            store["url"] = prefix + str(base / url[len(prefix):])
