"""The broker's settings: one TOML file, then ``BROKER_<SECTION>_<KEY>`` environment overrides.

Parsed once, at the edge (``cli``), into frozen models that the rest of the code receives. Nothing else
in the package reads the environment. Unknown keys are errors: a typo in a security setting must not
silently fall back to a default.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

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
    # "json": one JSON object per log line (broker.logs); `broker serve --log-format` overrides it.
    log_format: Literal["text", "json"] = "text"

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
    # The CA certificate(s), PEM, that Vault's TLS certificate must chain to (as VAULT_CACERT does for the
    # vault CLI), for every https address: only these, the environment (VAULT_CACERT, SSL_CERT_FILE) adds
    # nothing. Unset: OpenSSL's default trust store (which SSL_CERT_FILE and SSL_CERT_DIR may replace).
    ca_cert: Path | None = None
    # How long `end` waits for Vault to confirm that a task's leases are gone before it reports
    # them `revoke_pending` (revoke-accessor returns before the leases are revoked).
    revoke_confirm_timeout: float = Field(default=5.0, gt=0, le=60)
    # A task token is created with this short TTL and extended to the task's end only once the task
    # is recorded: if the broker dies in between, the unrecorded token dies by itself this soon.
    task_token_bootstrap_ttl: int = Field(default=30, ge=5, le=300)
    # Use Vault's audit device (audit_log) as the issuance journal: one Vault request per credential
    # (broker.journal). Off, or until the start-up probe finds the device records X-Broker-Intent in plain
    # text, each credential is read with its own issuance token (two requests).
    journal: bool = True

    @field_validator("addr")
    @classmethod
    def _addrs(cls, v: str | tuple[str, ...]) -> str | tuple[str, ...]:
        nodes = (v,) if isinstance(v, str) else v
        if not nodes or len(set(nodes)) != len(nodes):
            raise ValueError("addr is one URL or a list of distinct URLs")
        return v

    @model_validator(mode="after")
    def _ca_cert_for_https(self) -> VaultSettings:
        if self.ca_cert is not None and not any(a.startswith("https://") for a in self.addrs):
            raise ValueError("vault.ca_cert is for https: no [vault].addr is an https URL")
        return self

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


class KubernetesCluster(_Frozen):
    """One cluster whose projected service-account tokens name agents ``spiffe://<trust_domain>/ns/<ns>/sa/<name>``."""

    trust_domain: str
    # The cluster's --service-account-issuer, exactly as its tokens' `iss` says it.
    issuer: str = Field(min_length=1)
    jwks_file: Path | None = None
    jwks_url: str | None = None  # the cluster's /openid/v1/jwks
    # Projected tokens live 1 h by default (at least 10 min); a longer-lived one is refused.
    max_token_lifetime: Duration = 3600

    @model_validator(mode="after")
    def _one_source(self) -> KubernetesCluster:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("give exactly one of jwks_file or jwks_url")
        return self


class AgentsSettings(_Frozen):
    trust: tuple[AgentTrust, ...] = ()
    kubernetes: tuple[KubernetesCluster, ...] = ()
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


class DelegationIssuer(_Frozen):
    """An IdP whose RFC 8693 token-exchange tokens (``sub`` the user, ``act.sub`` the agent) start tasks."""

    issuer: str
    jwks_file: Path | None = None
    jwks_url: str | None = None
    groups_claim: str = "groups"
    # How long a delegation token may live; the broker remembers each one's jti until it has expired.
    max_token_lifetime: Duration = 3600

    @model_validator(mode="after")
    def _one_source(self) -> DelegationIssuer:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("give exactly one of jwks_file or jwks_url")
        return self


class UsersSettings(_Frozen):
    issuers: tuple[UserIssuer, ...] = ()
    delegation_issuers: tuple[DelegationIssuer, ...] = ()


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
    # Where a tool uses the credential (`broker mcp`, the SDK's helpers), never with credentials in it:
    # "postgresql://HOST:PORT/DB", "mysql://HOST:PORT/DB", "redis://HOST:PORT/N", "https://HOST[:PORT]".
    endpoint: str | None = None
    # For an https endpoint: the hosts `http_request` may send this credential to ("api.example.org",
    # "*.example.org"). Default: the endpoint's own host.
    allowed_hosts: tuple[str, ...] = ()
    # How an HTTP request carries the credential: "bearer" (Authorization: Bearer TOKEN), "vault-token"
    # (X-Vault-Token), "client-certificate" (TLS). Default: a token as bearer, a certificate as itself.
    http_auth: Literal["bearer", "vault-token", "client-certificate"] | None = None

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        from broker.endpoints import Endpoint

        return None if v is None else str(Endpoint.parse(v))

    @model_validator(mode="after")
    def _http_only(self) -> GrantSettings:
        from broker.endpoints import Endpoint, HostAllowList

        kind = Endpoint.parse(self.endpoint).kind if self.endpoint is not None else None
        if (self.allowed_hosts or self.http_auth is not None) and kind != "http":
            raise ValueError(f"grant {self.name}: allowed_hosts and http_auth need an https endpoint")
        HostAllowList.parse(self.allowed_hosts)
        return self
    # The secrets engine behind `path` (broker.engines: token, ssh, rabbitmq, database, pki, kv, dynamic);
    # inferred from the path when absent (`ssh/sign/x` is ssh, `secret/data/x` is kv, ...).
    engine: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9-]{0,31}$")
    # A `static` grant (a KV read) hands out a value the broker can never take back: refused unless set.
    allow_static: bool = False


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


def _is_loopback_http(url: str) -> bool:
    """``http://`` to this machine only (127.0.0.0/8, ::1, localhost): tests and a local dev stack."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme != "http":
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # a literal address: "127.evil.example" is a name
    except ValueError:
        return False


def _check_signal_url(url: str, what: str) -> str:
    """An https URL (or loopback http), without credentials or a fragment.

    Why https: a SET names a person and an agent (privacy), and only TLS proves that the one answering
    ``202`` is the receiver: over plain http anyone on the path could read it, or acknowledge it and drop
    it, and the receiver would never learn that the session ended. RFC 8935 requires TLS; SSF requires
    https for the issuer and its ``jwks_uri``. Loopback http is allowed for tests and a local dev stack.
    """
    parts = urlsplit(url)
    if parts.scheme != "https" and not _is_loopback_http(url):
        raise ValueError(f"{what} must be an https URL (http only to 127.0.0.1, ::1 or localhost): over plain "
                         "http a SET can be read, or acknowledged and dropped, on the way")
    if not parts.hostname or parts.username is not None or parts.password is not None or parts.fragment:
        raise ValueError(f"{what} needs a host, and no user:password@ and no #fragment")
    return url


class SignalReceiver(_Frozen):
    """One SSF receiver: where its SETs are pushed (RFC 8935) and what it is sent."""

    # Names the receiver in the store and in audit records (never its URL, which may carry a secret query).
    name: str = Field(pattern=_NAME)
    url: str
    events: tuple[Literal["session-revoked"], ...] = ("session-revoked",)
    # The SET's aud: how the receiver recognises SETs meant for it. Default: the URL's origin.
    audience: str | None = Field(default=None, min_length=1, max_length=512)
    # A file holding the whole Authorization header value (e.g. "Bearer ..."), sent with every push.
    authorization_file: Path | None = None
    # Seconds for one push: connect, send, answer.
    timeout: float = Field(default=5.0, gt=0, le=60)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return _check_signal_url(v, "a receiver's url")

    @property
    def aud(self) -> str:
        if self.audience is not None:
            return self.audience
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"


class SignalsSettings(_Frozen):
    """The SSF transmitter: ``session-revoked`` SETs pushed to receivers when tasks end (broker.signals)."""

    # The transmitter's issuer: the broker's public origin, as receivers reach it. It is every SET's iss,
    # and /.well-known/ssf-configuration is served under it.
    issuer: str | None = None
    # EC P-256 (ES256) or RSA >= 2048 bits (RS256) private key, PEM, mode 0600 (broker.signals.keys).
    signing_key_file: Path | None = None
    # Keys rotated out, still published in the JWKS (PEM public or private key files).
    retired_key_files: tuple[Path, ...] = ()
    receivers: tuple[SignalReceiver, ...] = ()
    # Retries: exponential backoff from 1 s with jitter, up to max_backoff, at most max_attempts pushes,
    # and none once the signal is older than max_age.
    max_attempts: int = Field(default=50, ge=1, le=1000)
    max_age: Duration = 86400
    max_backoff: Duration = 1800
    # How often the worker looks for due deliveries (it is also woken when a task ends on this replica).
    poll_interval: float = Field(default=1.0, gt=0, le=60)

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str | None) -> str | None:
        if v is None:
            return v
        _check_signal_url(v, "signals.issuer")
        parts = urlsplit(v)
        # The metadata lives at /.well-known/ssf-configuration under the issuer's host; with a path the
        # receiver would look for it at /.well-known/ssf-configuration/<path>, which the broker does not serve.
        if parts.path not in ("", "/") or parts.query:
            raise ValueError("signals.issuer must be an origin (https://host[:port]) without a path or query")
        return f"{parts.scheme}://{parts.netloc}"

    @model_validator(mode="after")
    def _complete(self) -> SignalsSettings:
        if self.receivers and (self.issuer is None or self.signing_key_file is None):
            raise ValueError("signals.receivers need signals.issuer and signals.signing_key_file")
        names = [r.name for r in self.receivers]
        if len(names) != len(set(names)):
            raise ValueError("signals.receivers: names must be unique")
        return self


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
    signals: SignalsSettings = SignalsSettings()
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
        "server": ("listen", "audience", "log_format"),
        "vault": ("addr", "token_file", "audit_log", "timeout", "namespace", "ca_cert"),
        "store": ("url", "key_file"),
    }.items()
    for key in keys
}

# Of those, the ones that take a list (BROKER_VAULT_ADDR="http://a:8200,http://b:8200").
_LIST_KEYS = frozenset({("vault", "addr"), ("vault", "audit_log")})


# Required settings that only the serving broker uses, with the stand-ins ``vault_setup`` puts where they
# are absent (never read: they name nothing).
_SERVING_ONLY: tuple[tuple[str, str, str], ...] = (
    ("server", "audience", "<unused by vault sync>"),
    ("vault", "token_file", "/nonexistent/unused-by-vault-sync"),
    ("store", "key_file", "/nonexistent/unused-by-vault-sync"),
)


def load_settings(environ: Mapping[str, str], path: str | Path | None, *, vault_setup: bool = False) -> Settings:
    """Read the TOML file (if any), apply ``BROKER_*`` overrides, validate.

    Relative paths in the file are taken relative to the file's directory. ``vault_setup``: for
    ``broker vault sync``, which needs neither ``[server].audience``, ``[vault].token_file`` nor
    ``[store].key_file``; they may be absent (stand-ins fill them; never use those three then).

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
    if vault_setup:
        # `broker vault sync` reads the catalog, [people], [vault].addr/audit_log and [audit].vault_device
        # only: what only the serving broker needs may be absent. Every key present is still validated.
        for section, key, unused in _SERVING_ONLY:
            if isinstance(raw.setdefault(section, {}), dict):
                raw[section].setdefault(key, unused)
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
    signals = raw.get("signals")
    if isinstance(signals, dict):
        fix(signals, "signing_key_file")
        if isinstance(signals.get("retired_key_files"), list):
            signals["retired_key_files"] = [f if not isinstance(f, str) or Path(f).is_absolute() else str(base / f)
                                            for f in signals["retired_key_files"]]
        for r in signals.get("receivers") or []:
            fix(r, "authorization_file")
    for t in (raw.get("agents") or {}).get("trust") or []:
        fix(t, "jwks_file")
    for c in (raw.get("agents") or {}).get("kubernetes") or []:
        fix(c, "jwks_file")
    for i in (raw.get("users") or {}).get("issuers") or []:
        fix(i, "jwks_file")
    for i in (raw.get("users") or {}).get("delegation_issuers") or []:
        fix(i, "jwks_file")
    store = raw.get("store")
    if isinstance(store, dict) and isinstance(store.get("url"), str):
        url: str = store["url"]
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
            store["url"] = prefix + str(base / url[len(prefix):])
