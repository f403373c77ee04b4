"""The engines beyond PostgreSQL, PKI and tokens, on the session OpenBao, against this machine's servers.

MariaDB (127.0.0.1:3306, root without a password), Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672,
management API on 15672, guest/guest) are shared with other test runs: everything here is named with a
session id (``brk<sid>``), and only what it created is removed, at the session's end. SSH and KV need no
server and are set up in ``bao_with_engines`` itself.

Unreachable servers fail the fixture with the reason (never a skip: a test that cannot fail is a defect).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import pymysql
import pytest
import redis
import requests

from broker.dev.engines import configure_mysql, configure_rabbitmq, configure_redis
from broker.vault import Sensitive
from broker.vault.admin import VaultAdmin
from tests.support.fixtures import BaoEngines

__all__ = ["MANAGEMENT", "SESSION_SID", "ExternalEngines", "external_engines", "redis_role"]

# One id per test session: the Redis role (Vault names Redis users after their role, so that is how this
# session's users are told apart from other runs' on the shared server) and every object's name.
SESSION_SID: Final = secrets.token_hex(3)


def redis_role(sid: str = SESSION_SID) -> str:
    return f"cache-{sid}"

MYSQL = ("127.0.0.1", 3306)
REDIS = ("127.0.0.1", 6379)
MANAGEMENT = "http://127.0.0.1:15672"
AMQP = ("127.0.0.1", 5672)
_GUEST = ("guest", "guest")


@dataclass(frozen=True)
class ExternalEngines:
    """What the session created: names to connect with and to find its own users by.

    Vault paths: ``database/creds/app-ro`` (MariaDB, SELECT on ``database``, table ``t`` holding 42),
    ``database/creds/cache-<sid>`` (Redis, keys ``key_prefix*``), ``rabbitmq/creds/agent`` (vhost ``vhost``).
    """

    engines: BaoEngines
    sid: str
    database: str
    key_prefix: str
    vhost: str
    user_prefix: str


def _mysql_root() -> pymysql.connections.Connection[pymysql.cursors.Cursor]:
    return pymysql.connect(host=MYSQL[0], port=MYSQL[1], user="root", password="", autocommit=True,
                           connect_timeout=5)


def _cleanup_mysql(database: str, admin_user: str, prefix: str) -> None:
    conn = _mysql_root()
    with conn.cursor() as cur:
        cur.execute("SELECT user FROM mysql.user WHERE user LIKE %s", (prefix.replace("_", "\\_") + "\\_%",))
        for (user,) in cur.fetchall():
            cur.execute("DROP USER IF EXISTS %s@'%%'", (user,))
        cur.execute(f"DROP DATABASE IF EXISTS `{database}`")
        cur.execute("DROP USER IF EXISTS %s@'%%'", (admin_user,))
    conn.close()


def _cleanup_redis(admin_user: str, role_marker: str, key_prefix: str) -> None:
    r = redis.Redis(host=REDIS[0], port=REDIS[1], socket_timeout=5)
    users = [u.decode() if isinstance(u, bytes) else str(u) for u in r.acl_users()]
    for user in users:
        if user == admin_user or role_marker in user:
            r.acl_deluser(user)
    for key in r.scan_iter(match=key_prefix + "*"):
        r.delete(key)
    r.close()


@pytest.fixture(scope="session")
def external_engines(bao_with_engines: BaoEngines) -> Iterator[ExternalEngines]:
    """MariaDB, Redis and RabbitMQ roles on the session OpenBao, over objects made for this session only."""
    sid = SESSION_SID
    prefix = f"brk{sid}"
    database, mysql_admin, redis_admin, vhost = f"{prefix}_db", f"{prefix}_admin", f"{prefix}_admin", f"{prefix}-vh"
    key_prefix = f"{prefix}:"
    password = secrets.token_urlsafe(24)
    bao = bao_with_engines.bao
    try:
        conn = _mysql_root()
    except pymysql.MySQLError as exc:
        pytest.fail(f"MariaDB is not reachable at {MYSQL[0]}:{MYSQL[1]} as root: {exc}")
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{database}`")
        cur.execute(f"CREATE TABLE `{database}`.t (x int)")
        cur.execute(f"INSERT INTO `{database}`.t VALUES (42)")
        cur.execute("CREATE USER %s@'%%' IDENTIFIED BY %s", (mysql_admin, password))
        # What Vault needs to create, grant and drop users and end their sessions (CONNECTION ADMIN).
        cur.execute(f"GRANT SELECT ON `{database}`.* TO %s@'%%' WITH GRANT OPTION", (mysql_admin,))
        cur.execute("GRANT CREATE USER, CONNECTION ADMIN ON *.* TO %s@'%%'", (mysql_admin,))
    conn.close()
    r = redis.Redis(host=REDIS[0], port=REDIS[1], socket_timeout=5)
    try:
        r.acl_setuser(redis_admin, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
                      commands=["+@all"])
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS[0]}:{REDIS[1]} (or has no ACLs): {exc}")
    r.close()
    try:
        made = requests.put(f"{MANAGEMENT}/api/vhosts/{vhost}", auth=_GUEST, timeout=10)
    except requests.RequestException as exc:
        pytest.fail(f"RabbitMQ's management API is not reachable at {MANAGEMENT} "
                    f"(rabbitmq-plugins enable rabbitmq_management): {exc}")
    assert made.status_code in (201, 204), made.text
    role = redis_role(sid)
    try:
        with VaultAdmin(bao.addr, token=bao.root_token, timeout=30) as admin:
            configure_mysql(admin, host=MYSQL[0], port=MYSQL[1], username=mysql_admin, password=Sensitive(password),
                            database=database, username_prefix=prefix)
            configure_redis(admin, host=REDIS[0], port=REDIS[1], username=redis_admin, password=Sensitive(password),
                            role=role, acl_rules=(f"~{key_prefix}*", "+@read", "+@write", "+ping"))
            configure_rabbitmq(admin, management_url=MANAGEMENT, username=_GUEST[0], password=Sensitive(_GUEST[1]),
                               vhost=vhost, username_prefix=prefix)
        yield ExternalEngines(engines=bao_with_engines, sid=sid, database=database, key_prefix=key_prefix, vhost=vhost,
                              user_prefix=prefix)
    finally:
        _cleanup_mysql(database, mysql_admin, prefix)
        # Vault names Redis users V_<DISPLAY>_<ROLE>_...: the role's name carries the session id.
        _cleanup_redis(redis_admin, f"_{role.upper()}_", key_prefix)
        for user in requests.get(f"{MANAGEMENT}/api/users", auth=_GUEST, timeout=10).json():
            if user["name"].startswith(prefix + "-"):
                requests.delete(f"{MANAGEMENT}/api/users/{user['name']}", auth=_GUEST, timeout=10)
        requests.delete(f"{MANAGEMENT}/api/vhosts/{vhost}", auth=_GUEST, timeout=10)

