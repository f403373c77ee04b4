"""Example set-up of the engines beyond PostgreSQL, PKI and tokens: what an organisation configures once.

MySQL/MariaDB and Redis through the database engine (``database/creds/<role>``), RabbitMQ through its
own engine (``rabbitmq/creds/<role>``), SSH certificates (``ssh/sign/<role>``) and a KV version 2 value
(``secret/data/<path>``). ``vault/setup-engines.sh`` does the same with the ``bao`` CLI; ``broker dev``
and the tests call these. Every function is idempotent and writes through ``VaultAdmin`` (hvac, off the
hot path). The admin credentials given here are the organisation's own: Vault keeps them, the broker
never sees them.

Revocation is what the broker relies on, so each role's revocation also cuts the live sessions where the
server allows it: MariaDB's ``KILL USER``, Redis's ``ACL DELUSER`` (it disconnects the user's clients) and
RabbitMQ's user deletion (it closes its connections).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from broker.dev.config import Grant
from broker.errors import BrokerError, ConfigError, VaultBadResponse
from broker.vault import Sensitive
from broker.vault.admin import VaultAdmin

__all__ = ["EngineSetup", "OptionalEngines", "configure_kv", "configure_mysql", "configure_optional",
           "configure_rabbitmq", "configure_redis", "configure_ssh", "kv_grant", "ssh_grant"]


def configure_mysql(
    admin: VaultAdmin, *, host: str, port: int, username: str, password: Sensitive, database: str,
    mount: str = "database", connection: str = "app-mysql", role: str = "app-ro", username_prefix: str = "v",
    default_ttl: str = "10m", max_ttl: str = "1h",
) -> None:
    """A MariaDB/MySQL connection (``mysql-database-plugin``) and a role that may read ``database``.

    Usernames are ``<username_prefix>_<random>`` (at most 32 characters): a prefix of its own lets whoever
    runs the server tell Vault's users apart.
    """
    admin.enable_secrets_engine(mount, "database")
    admin.database_configure(
        mount, connection, plugin_name="mysql-database-plugin",
        connection_url=f"{{{{username}}}}:{{{{password}}}}@tcp({host}:{port})/", username=username,
        password=password, allowed_roles=[role], verify_connection=True,
        username_template=username_prefix + "_{{random 16}}",
    )
    admin.database_put_role(
        mount, role, db_name=connection,
        creation_statements=["CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}';",
                             f"GRANT SELECT ON `{database}`.* TO '{{{{name}}}}'@'%';"],
        # DROP first, so no new login can start; then end the sessions the credential still holds.
        revocation_statements=["DROP USER IF EXISTS '{{name}}'@'%';", "KILL USER '{{name}}';"],
        default_ttl=default_ttl, max_ttl=max_ttl,
    )


def configure_redis(
    admin: VaultAdmin, *, host: str, port: int, username: str, password: Sensitive,
    mount: str = "database", connection: str = "cache-redis", role: str = "cache-rw",
    acl_rules: Sequence[str] = ("~app:*", "+@read", "+@write", "+ping"), default_ttl: str = "10m",
    max_ttl: str = "1h",
) -> None:
    """A Redis connection (``redis-database-plugin``, ACL users) and a role with ``acl_rules``.

    The admin user needs the ACL commands. Vault names users ``V_<DISPLAY>_<ROLE>_<RANDOM>_<TIME>``.
    """
    admin.enable_secrets_engine(mount, "database")
    admin.database_configure(
        mount, connection, plugin_name="redis-database-plugin", connection_url="", username=username,
        password=password, allowed_roles=[role], verify_connection=True, host=host, port=port,
    )
    admin.database_put_role(mount, role, db_name=connection, creation_statements=[json.dumps(list(acl_rules))],
                            revocation_statements=[], default_ttl=default_ttl, max_ttl=max_ttl)


def configure_rabbitmq(
    admin: VaultAdmin, *, management_url: str, username: str, password: Sensitive, vhost: str,
    mount: str = "rabbitmq", role: str = "agent", username_prefix: str = "v", tags: str = "",
    default_ttl: str = "10m", max_ttl: str = "1h",
) -> None:
    """The RabbitMQ engine on the management HTTP API, and a role with full rights on ``vhost`` only.

    The engine's leases default to 32 days: ``config/lease`` bounds them (the broker caps each further).
    """
    admin.enable_secrets_engine(mount, "rabbitmq")
    admin.write(f"{mount}/config/connection", {
        "connection_uri": management_url, "username": username, "password": password.reveal(),
        "verify_connection": True, "username_template": username_prefix + "-{{random 16}}",
    })
    admin.write(f"{mount}/config/lease", {"ttl": default_ttl, "max_ttl": max_ttl})
    admin.write(f"{mount}/roles/{role}", {
        "vhosts": json.dumps({vhost: {"configure": ".*", "write": ".*", "read": ".*"}}), "tags": tags,
    })


def configure_ssh(
    admin: VaultAdmin, *, mount: str = "ssh", role: str = "agents", allowed_users: Sequence[str] = ("deploy",),
    default_user: str = "deploy", ttl: str = "10m", max_ttl: str = "1h",
) -> str:
    """An SSH CA (its key generated in Vault, once) and a role signing user certificates; the CA's public key.

    ``allow_user_key_ids`` lets a grant set ``key_id = "{task}"``, so ``sshd``'s log names the task.
    Key types and sizes are the broker's to check (``broker.sshkeys``); the role accepts what it passes.
    """
    admin.enable_secrets_engine(mount, "ssh")
    try:
        current = admin.read(f"{mount}/config/ca")
    except VaultBadResponse:  # 400 "keys haven't been configured yet"
        current = None
    ca = current.get("public_key") if current else None
    if not isinstance(ca, str) or not ca:
        made = admin.write(f"{mount}/config/ca", {"generate_signing_key": True, "key_type": "ssh-ed25519"}) or {}
        ca = str(made.get("public_key", ""))
    settings: Mapping[str, Any] = {
        "key_type": "ca", "allow_user_certificates": True, "allow_host_certificates": False,
        "allowed_users": ",".join(allowed_users), "default_user": default_user, "allow_user_key_ids": True,
        "ttl": ttl, "max_ttl": max_ttl, "allowed_extensions": "permit-pty",
        "default_extensions": {"permit-pty": ""},
    }
    admin.write(f"{mount}/roles/{role}", settings)
    return ca.strip()


_KV_UPGRADE_WAIT = 10.0  # seconds; OpenBao's upgrade of an empty mount takes well under one


def configure_kv(admin: VaultAdmin, *, path: str, data: Mapping[str, str], mount: str = "secret") -> None:
    """A KV version 2 mount (``secret/`` in a dev server already is one) and one value at ``path``.

    A KV v2 mount just made upgrades itself in the background and refuses writes meanwhile ("Upgrading
    from non-versioned to versioned data"): the write is tried again for up to 10 s.
    """
    admin.enable_secrets_engine(mount, "kv", options={"version": "2"})
    deadline = time.monotonic() + _KV_UPGRADE_WAIT
    while True:
        try:
            admin.write(f"{mount}/data/{path}", {"data": dict(data)})
            return
        except VaultBadResponse as exc:
            if "Upgrading from non-versioned to versioned data" not in exc.reason or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- broker dev: the engines this machine can serve ------------------------------------------------------


@dataclass(frozen=True)
class OptionalEngines:
    """Admin URLs of the servers ``broker dev`` may add grants for (each ``None``: skipped, and said so).

    ``mysql://ADMIN:PASSWORD@HOST:PORT/DB``, ``redis://ADMIN:PASSWORD@HOST:PORT``,
    ``http://ADMIN:PASSWORD@HOST:15672/VHOST`` (RabbitMQ's management API; vhost ``/`` when absent).
    """

    mysql_url: str | None = None
    redis_url: str | None = None
    rabbitmq_url: str | None = None


@dataclass(frozen=True)
class EngineSetup:
    """One optional engine as ``broker dev`` left it: the grant it added, or why it added none."""

    name: str
    grant: Grant | None
    note: str


def _parts(url: str, default_port: int) -> tuple[str, int, str, str, str]:
    u = urlsplit(url)
    if not u.hostname or u.username is None or u.password is None:
        msg = "needs ADMIN:PASSWORD@HOST in the URL"
        raise ConfigError(msg)
    return u.hostname, u.port or default_port, unquote(u.username), unquote(u.password), unquote(u.path.lstrip("/"))


def configure_optional(admin: VaultAdmin, engines: OptionalEngines) -> list[EngineSetup]:
    """Set up each engine whose admin URL is given; one ``EngineSetup`` per engine, never an exception.

    A server that cannot be configured (unreachable, refused) is reported and skipped: the demo runs on.
    """
    out = []
    for name, url, hint, setup in (
        ("MariaDB/MySQL", engines.mysql_url, "--mysql-url mysql://ADMIN:PASSWORD@HOST:3306/DB", _mysql),
        ("Redis", engines.redis_url, "--redis-url redis://ADMIN:PASSWORD@HOST:6379", _redis),
        ("RabbitMQ", engines.rabbitmq_url, "--rabbitmq-url http://ADMIN:PASSWORD@HOST:15672/VHOST", _rabbitmq),
    ):
        if url is None:
            out.append(EngineSetup(name, None, f"skipped: give {hint}"))
            continue
        try:
            grant = setup(admin, url)
        except BrokerError as exc:
            detail = f"{exc} ({exc.reason})" if exc.reason != str(exc) else str(exc)
            secret = urlsplit(url).password
            # The admin password is the organisation's: never on the terminal, whatever a server echoed.
            out.append(EngineSetup(name, None, "skipped: " + (detail.replace(unquote(secret), "***") if secret
                                                              else detail)))
            continue
        out.append(EngineSetup(name, grant, f"grant {grant.name} -> {grant.path}"))
    return out


def _mysql(admin: VaultAdmin, url: str) -> Grant:
    host, port, user, password, db = _parts(url, 3306)
    configure_mysql(admin, host=host, port=port, username=user, password=Sensitive(password), database=db or "app")
    return Grant(name="app-db-ro", path="database/creds/app-ro", max_ttl="5m")


def _redis(admin: VaultAdmin, url: str) -> Grant:
    host, port, user, password, _ = _parts(url, 6379)
    configure_redis(admin, host=host, port=port, username=user, password=Sensitive(password))
    return Grant(name="cache-rw", path="database/creds/cache-rw", max_ttl="5m")


def _rabbitmq(admin: VaultAdmin, url: str) -> Grant:
    host, port, user, password, vhost = _parts(url, 15672)
    scheme = urlsplit(url).scheme or "http"
    configure_rabbitmq(admin, management_url=f"{scheme}://{host}:{port}", username=user,
                       password=Sensitive(password), vhost=vhost or "/")
    return Grant(name="queue", path="rabbitmq/creds/agent", max_ttl="5m")


def ssh_grant() -> Grant:
    """An SSH certificate for user ``deploy`` naming the task (``configure_ssh``); the agent sends its key."""
    return Grant(name="deploy-ssh", path="ssh/sign/agents", max_ttl="5m",
                 params={"valid_principals": "deploy", "key_id": "{task}", "cert_type": "user"})


def kv_grant(path: str = "demo/api-key") -> Grant:
    """A KV value (``configure_kv``): static, so the grant must say so."""
    return Grant(name="api-key", path=f"secret/data/{path}", max_ttl="5m", allow_static=True)
