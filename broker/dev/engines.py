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
from collections.abc import Mapping, Sequence
from typing import Any

from broker.errors import VaultBadResponse
from broker.vault import Sensitive
from broker.vault.admin import VaultAdmin

__all__ = ["configure_kv", "configure_mysql", "configure_rabbitmq", "configure_redis", "configure_ssh"]


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


def configure_kv(admin: VaultAdmin, *, path: str, data: Mapping[str, str], mount: str = "secret") -> None:
    """A KV version 2 mount (``secret/`` in a dev server already is one) and one value at ``path``."""
    admin.enable_secrets_engine(mount, "kv", options={"version": "2"})
    admin.write(f"{mount}/data/{path}", {"data": dict(data)})
