"""``broker mcp`` end to end: the SDK's own MCP client drives the server against a real broker, OpenBao and
SCRAM PostgreSQL; every JSON-RPC message and every log line is recorded and searched for the credentials.

The broker here has its own task role (``mcp-triage``) whose grants name endpoints: the tickets database,
OpenBao itself (a Vault token sent as ``X-Vault-Token`` to ``lookup-self``, which answers with the token),
a loopback HTTP target that echoes the bearer token it got, and a high-risk database grant.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pymysql
import pytest
import pytest_asyncio
from aiohttp import web
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.shared.memory import create_client_server_memory_streams

from broker.app import make_app
from broker.audit.signing import generate_signing_key_file
from broker.config import Settings, load_settings
from broker.delegation import Catalog
from broker.dev.config import DEV_PEOPLE, AgentTrust, BrokerConfig, Grant, TaskRole, UserIssuer
from broker.errors import HostNotAllowed, ToolRefused
from broker.mcp.bounds import Limits
from broker.mcp.server import RedactingFormatter, build_server
from broker.mcp.svid import SvidFile, WorkloadApiSvid
from broker.mcp.tools import TaskTools
from broker.sdk import AgentClient, UserClient
from broker.sealing import TokenSealer
from broker.vault import Sensitive
from broker.vault.admin import VaultAdmin
from tests.conftest import IDP, TD, Identities
from tests.support.crash import write_broker_token
from tests.support.fixtures import BaoEngines

AGENT = f"spiffe://{TD}/agent/support-7"
LEAD = ("lena@example.com", ("secops-leads",))
PLANTED = "CANARY-planted-7f3a9c1e"
_RUN = secrets.token_hex(4)
MARIA_DB = f"mcp_{_RUN}"          # this module's own database on the machine's MariaDB
REDIS_PREFIX = f"mcp-{_RUN}:"     # and its own keys on the machine's Redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The loopback TLS target that wants a client certificate. Its port goes into the catalog at import, and
# the target listens much later: the socket is bound now and held, so no other process (a connection's
# ephemeral port, another worker's server) takes the port in between (seen in CI: "address already in use").
TLS_SOCKET = socket.socket()
TLS_SOCKET.bind(("127.0.0.1", 0))
TLS_PORT = int(TLS_SOCKET.getsockname()[1])


@dataclass
class McpSite:
    root: Path
    settings: Settings
    ids: Identities
    echo_port: int
    engines: BaoEngines


@pytest.fixture(scope="module")
def mcp_root(tmp_path_factory: pytest.TempPathFactory, bao_with_engines: BaoEngines,
             identities: Identities) -> Iterator[tuple[Path, int]]:
    root = tmp_path_factory.mktemp("mcp-broker")
    identities.spiffe.write_jwks(root / "spiffe.jwks")
    identities.idp.write_jwks(root / "idp.jwks")
    TokenSealer.generate_key_file(root / "store.key")
    generate_signing_key_file(root / "audit-signing.key")
    bao, pg = bao_with_engines.bao, bao_with_engines.pg
    echo_port = free_port()
    db = f"postgresql://127.0.0.1:{pg.port}/postgres"
    maria_db, redis_prefix = MARIA_DB, REDIS_PREFIX
    role = TaskRole(name="mcp-triage", tenant="acme", agents=(f"spiffe://{TD}/agent/support-*",),
                    delegators=("group:support",), max_ttl="30m", grants=(
        Grant(name="tickets-db", path=bao_with_engines.db_creds_ro, max_ttl="10m", endpoint=db),
        Grant(name="tickets-db-rw", path=bao_with_engines.db_creds_rw, max_ttl="5m", risk="high", endpoint=db),
        Grant(name="vault-self", path="auth/token/create/agent-child", method="write", max_ttl="10m",
              endpoint=bao.addr, http_auth="vault-token"),
        Grant(name="echo-api", path="auth/token/create/agent-child", method="write", max_ttl="10m",
              endpoint=f"http://127.0.0.1:{echo_port}"),
        Grant(name="no-endpoint", path=bao_with_engines.db_creds_ro, max_ttl="10m"),
        Grant(name="app-db", path="mcpdb/creds/app", max_ttl="10m", endpoint=f"mysql://127.0.0.1:3306/{maria_db}"),
        Grant(name="cache", path="mcpdb/creds/cache", max_ttl="10m", endpoint="redis://127.0.0.1:6379/0"),
        Grant(name="mtls-api", path=bao_with_engines.pki_issue, max_ttl="10m", http_auth="client-certificate",
              params={"common_name": f"{{task}}.agents.{TD}"}, endpoint=f"https://127.0.0.1:{TLS_PORT}"),
    ))
    cfg = BrokerConfig(vault_addr=bao.addr, audit_log=bao.audit_log, signing_key_file="audit-signing.key",
                       agents=(AgentTrust(trust_domain=TD, jwks_file="spiffe.jwks"),),
                       users=(UserIssuer(issuer=IDP, jwks_file="idp.jwks"),), people=DEV_PEOPLE, task_roles=(role,))
    settings = load_settings({}, cfg.write(root / "broker.toml"))
    with VaultAdmin(bao.addr, token=bao.root_token) as admin:
        # A broker policy of its own: the session's `agent-broker` policy (every other test's broker token)
        # must keep the session catalog's grants.
        write_broker_token(admin, Catalog.from_settings(settings), root / "vault-token", policy="agent-broker-mcp")
        configure_mysql_and_redis(admin, maria_db, redis_prefix)
    yield root, echo_port
    with VaultAdmin(bao.addr, token=bao.root_token) as admin:
        admin.write("sys/leases/revoke-prefix/mcpdb", {})  # every MariaDB and Redis user these tests made
    with pymysql.connect(host="127.0.0.1", port=3306, user="root", password="") as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{maria_db}`")


def configure_mysql_and_redis(admin: VaultAdmin, maria_db: str, redis_prefix: str) -> None:
    """A database mount ``mcpdb`` with the machine's MariaDB (root) and Redis, each with one role of our own.

    The MariaDB role may read one database that this module creates (and drops); the Redis role only keys
    under this module's prefix.
    """
    with pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", autocommit=True) as conn, \
            conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{maria_db}`")
        cur.execute(f"CREATE TABLE `{maria_db}`.tickets (id INT PRIMARY KEY, title VARCHAR(100))")
        cur.execute(f"INSERT INTO `{maria_db}`.tickets VALUES (1, 'printer'), (2, 'vpn'), (3, 'mail')")
    admin.enable_secrets_engine("mcpdb", "database")
    admin.database_configure("mcpdb", "maria", plugin_name="mysql-database-plugin",
                             connection_url="{{username}}:{{password}}@tcp(127.0.0.1:3306)/", username="root",
                             password=Sensitive(""), allowed_roles=["app"])
    admin.database_put_role("mcpdb", "app", db_name="maria", default_ttl="5m", max_ttl="10m",
                            creation_statements=["CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}';",
                                                 f"GRANT SELECT ON `{maria_db}`.* TO '{{{{name}}}}'@'%';"],
                            revocation_statements=["DROP USER IF EXISTS '{{name}}'@'%';"])
    # The machine's Redis has a password-less default user, which accepts any password.
    admin.database_configure("mcpdb", "cache", plugin_name="redis-database-plugin", connection_url="",
                             username="default", password=Sensitive("any"), allowed_roles=["cache"],
                             host="127.0.0.1", port=6379, tls=False)
    admin.database_put_role("mcpdb", "cache", db_name="cache", default_ttl="5m", max_ttl="10m",
                            creation_statements=[json.dumps([f"~{redis_prefix}*", "+@read", "+@write", "+ping"])],
                            revocation_statements=[])


@pytest.fixture
def msite(mcp_root: tuple[Path, int], identities: Identities, tmp_path: Path,
          bao_with_engines: BaoEngines) -> McpSite:
    root, port = mcp_root
    settings = load_settings({"BROKER_STORE_URL": f"sqlite:///{tmp_path / 'broker.db'}"}, root / "broker.toml")
    return McpSite(root=root, settings=settings, ids=identities, echo_port=port, engines=bao_with_engines)


@pytest_asyncio.fixture
async def broker_url(msite: McpSite, aiohttp_server: Any) -> str:
    server = await aiohttp_server(make_app(msite.settings))
    return str(server.make_url("")).rstrip("/")


@pytest_asyncio.fixture
async def echo(msite: McpSite) -> AsyncIterator[list[str]]:
    """A loopback HTTP target that answers with the Authorization header it got (and a base64 copy)."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        seen.append(header)
        return web.json_response({"you_sent": header, "b64": base64.b64encode(header.encode()).decode(),
                                  "note": PLANTED})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", msite.echo_port).start()
    yield seen
    await runner.cleanup()


def user(msite: McpSite, who: tuple[str, tuple[str, ...]] = ("alice@example.com", ("support",))) -> str:
    return msite.ids.user(who[0], who[1], auth_time=time.time() - 5)


async def start(url: str, msite: McpSite, tmp_path: Path) -> tuple[str, Path]:
    async with UserClient(url, user(msite)) as u:
        task = await u.start_task(agent=AGENT, role="mcp-triage", ttl="20m", reason="mcp test")
    svid = tmp_path / "svid.jwt"
    svid.write_text(msite.ids.agent(AGENT) + "\n")
    return task.id, svid


class Tap:
    """A transport stream that records every JSON-RPC message passing through it (either direction)."""

    def __init__(self, inner: Any, log: list[str]) -> None:
        self._inner = inner
        self._log = log

    def _record(self, item: Any) -> None:
        message = getattr(item, "message", None)
        self._log.append(message.model_dump_json(by_alias=True) if message is not None else repr(item))

    async def send(self, item: Any) -> None:
        self._record(item)
        await self._inner.send(item)

    async def receive(self) -> Any:
        item = await self._inner.receive()
        self._record(item)
        return item

    def __aiter__(self) -> Tap:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Tap:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._inner.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@asynccontextmanager
async def in_process(tools: TaskTools, wire: list[str]) -> AsyncIterator[ClientSession]:
    """The real MCPServer over in-memory streams, the SDK's ClientSession on the other end, every message taped."""
    server = build_server(tools)
    low = server._lowlevel_server
    try:
        async with create_client_server_memory_streams() as ((c_read, c_write), (s_read, s_write)), \
                anyio.create_task_group() as tg:
            tg.start_soon(lambda: low.run(s_read, s_write, low.create_initialization_options()))
            try:
                async with ClientSession(Tap(c_read, wire), Tap(c_write, wire)) as session:
                    await session.initialize()
                    yield session
            finally:
                tg.cancel_scope.cancel()
    finally:
        await tools.close()  # outside the cancelled scope, so it runs to the end


async def call(session: ClientSession, tool: str, **args: Any) -> tuple[bool, Any]:
    """(is_error, structured result or the error text)."""
    result = await session.call_tool(tool, args)
    if result.is_error:
        return True, " ".join(getattr(c, "text", "") for c in result.content)
    return False, result.structured_content


@pytest.fixture
def captured_logs() -> Iterator[list[str]]:
    """Every log line of the process, formatted as ``broker mcp`` formats them (before redaction is asserted)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Keep(level=logging.DEBUG)
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield lines
    root.removeHandler(handler)
    root.setLevel(old)


def assert_no_canary(texts: list[str], canaries: list[str]) -> None:
    canaries = [c for c in canaries if c]
    assert canaries
    for text in texts:
        for canary in canaries:
            assert canary not in text, f"a secret leaked into: {text[:200]}"
            assert base64.b64encode(canary.encode()).decode().rstrip("=") not in text


class TestMcpTools:
    async def test_tools_use_credentials_and_never_show_them(self, msite: McpSite, broker_url: str,
                                                              echo: list[str], tmp_path: Path,
                                                              captured_logs: list[str]) -> None:
        """list_grants, sql_query, http_request (Vault token and bearer): results, no secret in any message or log."""
        task_id, svid = await start(broker_url, msite, tmp_path)
        wire: list[str] = []
        async with AgentClient(broker_url, SvidFile(svid)) as agent:
            session_task = agent.task(task_id, end_on_exit=False)
            tools = TaskTools(session_task, Limits(max_rows=3, max_bytes=4096, timeout=5))
            # captured_logs keeps the raw lines (no redaction: nothing may log a secret in the first place);
            # redacted_logs is what `broker mcp` would write to stderr.
            redacted_logs: list[str] = []
            redacting = logging.Handler(level=logging.DEBUG)
            redacting.setFormatter(RedactingFormatter(tools.redactor))
            redacting.emit = lambda record: redacted_logs.append(redacting.format(record))  # type: ignore[method-assign]
            logging.getLogger().addHandler(redacting)
            tools.redactor.add(svid.read_text().strip())
            async with in_process(tools, wire) as mcp:
                listed = await mcp.list_tools()
                assert sorted(t.name for t in listed.tools) == ["http_request", "list_grants", "redis_command",
                                                                  "sql_query"]
                err, grants = await call(mcp, "list_grants")
                assert not err
                by_name = {g["name"]: g for g in grants["grants"]}
                assert by_name["tickets-db"]["tool"] == "sql_query" and by_name["tickets-db"]["risk"] == "low"
                assert by_name["tickets-db"]["revocation"] == "revocable"
                assert by_name["tickets-db-rw"]["risk"] == "high"
                assert by_name["echo-api"]["allowed_hosts"] == ["127.0.0.1"]

                err, rows = await call(mcp, "sql_query", grant="tickets-db", sql="SELECT current_user, 1 + 1 AS two")
                assert not err, rows
                assert rows["columns"] == ["current_user", "two"] and rows["rows"][0][1] == 2
                db_user = rows["rows"][0][0]
                assert db_user.startswith("v-")  # Vault's dynamic role, not the superuser

                err, many = await call(mcp, "sql_query", grant="tickets-db", sql="SELECT generate_series(1, 50)")
                assert not err and many["row_count"] == 3 and many["truncated"] is True

                err, again = await call(mcp, "sql_query", grant="tickets-db", sql="SELECT current_user")
                assert not err and again["rows"][0][0] == db_user  # the credential is reused, not re-issued

                err, slow = await call(mcp, "sql_query", grant="tickets-db", sql="SELECT pg_sleep(30)")
                assert err and "upstream_failed" in slow and "statement timeout" in slow

                err, done = await call(mcp, "sql_query", grant="tickets-db", sql="CREATE TEMP TABLE t (a int)")
                assert not err and done["status"] == "done" and done["rows"] == [], done
                err, multi = await call(mcp, "sql_query", grant="tickets-db", sql="SELECT 1; SELECT 2")
                assert err and "multiple commands" in multi

                err, bad = await call(mcp, "sql_query", grant="tickets-db", sql="SELECT * FROM no_such_table")
                assert err and "no_such_table" in bad

                err, me = await call(mcp, "http_request", grant="vault-self", method="GET",
                                     url="/v1/auth/token/lookup-self")
                assert not err and me["status"] == 200, me
                body = json.loads(me["body"])
                assert body["data"]["role"] == "agent-child"  # OpenBao got the grant's token in X-Vault-Token...
                assert body["data"]["id"] == "[redacted]"    # ...and echoed it back, which the model never sees

                err, echoed = await call(mcp, "http_request", grant="echo-api", method="POST", url="/anything",
                                         body={"q": 1})
                assert not err and echoed["status"] == 200
                assert echo and echo[-1].startswith("Bearer ")
                assert json.loads(echoed["body"])["you_sent"] == "Bearer [redacted]"

                err, refused = await call(mcp, "http_request", grant="echo-api", method="GET",
                                          url="https://example.org/")
                assert err and "host_not_allowed" in refused and len(echo) == 1

                err, wrong = await call(mcp, "redis_command", grant="tickets-db", command="PING")
                assert err and "tool_refused" in wrong
                err, none = await call(mcp, "sql_query", grant="no-endpoint", sql="SELECT 1")
                assert err and "tool_refused" in none

                held = [cred for cred, _ in session_task._held.values()]
                assert {c.grant for c in held} == {"tickets-db", "vault-self", "echo-api"}
                canaries = [svid.read_text().strip(), echo[-1].removeprefix("Bearer ")]
                canaries += [str(c.data.get(k)) for c in held for k in ("password", "token") if c.data.get(k)]
                assert len(canaries) == 5
        logging.getLogger().removeHandler(redacting)
        assert wire and captured_logs and redacted_logs
        assert_no_canary(wire + captured_logs + redacted_logs, canaries)

    async def test_high_risk_grant_answers_waiting_then_delivers(self, msite: McpSite, broker_url: str,
                                                                   tmp_path: Path) -> None:
        """A high-risk grant answers at once with the approval id; after approval the retry with it works."""
        task_id, svid = await start(broker_url, msite, tmp_path)
        async with AgentClient(broker_url, SvidFile(svid)) as agent:
            tools = TaskTools(agent.task(task_id, end_on_exit=False), Limits(timeout=5))
            async with in_process(tools, []) as mcp:
                began = time.monotonic()
                err, waiting = await call(mcp, "sql_query", grant="tickets-db-rw", sql="SELECT 1")
                assert err and "waiting for approval" in waiting and time.monotonic() - began < 5
                approval_id = waiting.split("approval_id ")[1].split()[0]
                err, still = await call(mcp, "sql_query", grant="tickets-db-rw", sql="SELECT 1")
                assert err and approval_id in still  # the same approval, not a second one
                async with UserClient(broker_url, user(msite, LEAD)) as lead:
                    await lead.call("POST", f"/v1/approvals/{approval_id}",
                                    body={"decision": "approve", "reason": "change 42"})
                err, done = await call(mcp, "sql_query", grant="tickets-db-rw", sql="SELECT 1 AS one",
                                       approval_id=approval_id)
                assert not err and done["rows"] == [[1]]

    async def test_task_end_turns_every_tool_into_an_error_and_drops_everything(
            self, msite: McpSite, broker_url: str, echo: list[str], tmp_path: Path) -> None:
        """After the task ends: every tool is an error, no connection or credential is held, nothing is re-asked."""
        task_id, svid = await start(broker_url, msite, tmp_path)
        async with AgentClient(broker_url, SvidFile(svid)) as agent:
            tools = TaskTools(agent.task(task_id, end_on_exit=False), Limits(timeout=5))
            async with in_process(tools, []) as mcp:
                assert not (await call(mcp, "sql_query", grant="tickets-db", sql="SELECT 1"))[0]
                assert not (await call(mcp, "http_request", grant="echo-api", method="GET", url="/"))[0]
                assert tools.holding == 4  # two connections, two credentials
                async with UserClient(broker_url, user(msite)) as u:
                    await u.end_task(task_id)
                for tool, args in (("list_grants", {}), ("sql_query", {"grant": "tickets-db", "sql": "SELECT 1"}),
                                   ("redis_command", {"grant": "tickets-db", "command": "PING"}),
                                   ("http_request", {"grant": "echo-api", "method": "GET", "url": "/"})):
                    err, text = await call(mcp, tool, **args)
                    assert err and "gone" in text and "ended" in text, (tool, text)
                assert tools.holding == 0
                assert len(echo) == 1  # nothing was sent after the end

    async def test_a_rotated_svid_file_is_read_again(self, msite: McpSite, broker_url: str, tmp_path: Path) -> None:
        """The SVID file is re-read when it changes: a broken file fails the call, the rotated one works."""
        task_id, svid = await start(broker_url, msite, tmp_path)
        source = SvidFile(svid)
        async with AgentClient(broker_url, source) as agent:
            tools = TaskTools(agent.task(task_id, end_on_exit=False), Limits(timeout=5))
            assert (await tools.list_grants())["task"] == task_id
            svid.write_text(msite.ids.stranger.mint_svid(AGENT, audience="agent-broker"))
            with pytest.raises(Exception, match="bearer token was not accepted"):
                await tools.list_grants()
            rotated = tmp_path / "svid.new"
            rotated.write_text(msite.ids.agent(AGENT))
            rotated.replace(svid)  # the usual rotation: a rename, a new inode
            assert (await tools.list_grants())["task"] == task_id


class TestClientCertificate:
    async def test_a_pki_grant_is_presented_as_a_client_certificate(self, msite: McpSite, broker_url: str,
                                                                     tmp_path: Path, captured_logs: list[str]) -> None:
        """http_request on a PKI grant: the issued certificate authenticates TLS to a target that requires one;
        the private key appears in no message and no log line."""
        import ssl

        with VaultAdmin(msite.engines.bao.addr, token=msite.engines.bao.root_token) as admin:
            ca = str((admin.read("pki/cert/ca") or {})["certificate"])
            server = admin.write(msite.engines.pki_issue, {"common_name": "127.0.0.1", "ip_sans": "127.0.0.1",
                                                           "ttl": "10m"}) or {}
        (tmp_path / "ca.pem").write_text(ca)
        (tmp_path / "server.pem").write_text(f"{server['certificate']}\n{server['private_key']}\n")
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tmp_path / "ca.pem"))
        tls.verify_mode = ssl.CERT_REQUIRED
        tls.load_cert_chain(str(tmp_path / "server.pem"))

        async def whoami(request: web.Request) -> web.Response:
            peer = request.transport.get_extra_info("peercert") if request.transport else None
            subject = dict(x[0] for x in (peer or {}).get("subject", ()))
            return web.json_response({"cn": subject.get("commonName")})

        app = web.Application()
        app.router.add_get("/whoami", whoami)
        runner = web.AppRunner(app)
        await runner.setup()
        TLS_SOCKET.listen()
        await web.SockSite(runner, TLS_SOCKET, ssl_context=tls).start()
        try:
            task_id, svid = await start(broker_url, msite, tmp_path)
            wire: list[str] = []
            async with AgentClient(broker_url, SvidFile(svid)) as agent:
                session_task = agent.task(task_id, end_on_exit=False)
                tools = TaskTools(session_task, Limits(timeout=5), ca_file=str(tmp_path / "ca.pem"))
                async with in_process(tools, wire) as mcp:
                    err, me = await call(mcp, "http_request", grant="mtls-api", method="GET", url="/whoami")
                    assert not err, me
                    assert json.loads(me["body"]) == {"cn": f"{task_id}.agents.{TD}"}
                    key = str(next(c for c, _ in session_task._held.values()).data["private_key"])
                async with agent.task(task_id) as task, \
                        task.http("mtls-api", ca_file=str(tmp_path / "ca.pem")) as http, http.get("/whoami") as resp:
                    assert (await resp.json())["cn"] == f"{task_id}.agents.{TD}"
        finally:
            await runner.cleanup()
        body = "\n".join(line for line in key.splitlines() if "-----" not in line)
        assert_no_canary(wire + captured_logs, [body, *(line for line in body.splitlines() if len(line) > 20)])


class TestMysqlAndRedis:
    async def test_mysql_and_redis_grants(self, msite: McpSite, broker_url: str, tmp_path: Path,
                                          captured_logs: list[str]) -> None:
        """sql_query on a MariaDB grant and redis_command on a Redis grant, as Vault's users; gone after the end."""
        task_id, svid = await start(broker_url, msite, tmp_path)
        wire: list[str] = []
        async with AgentClient(broker_url, SvidFile(svid)) as agent:
            session_task = agent.task(task_id, end_on_exit=False)
            tools = TaskTools(session_task, Limits(max_rows=2, timeout=5))
            async with in_process(tools, wire) as mcp:
                err, rows = await call(mcp, "sql_query", grant="app-db", sql="SELECT id, title FROM tickets ORDER BY id")
                assert not err, rows
                assert rows["columns"] == ["id", "title"] and rows["rows"] == [[1, "printer"], [2, "vpn"]]
                assert rows["truncated"] is True
                err, who = await call(mcp, "sql_query", grant="app-db", sql="SELECT CURRENT_USER()")
                assert not err and who["rows"][0][0].startswith("v-"), who
                err, denied = await call(mcp, "sql_query", grant="app-db", sql="DELETE FROM tickets")
                assert err and "upstream_failed" in denied and "denied" in denied.lower()

                key = f"{REDIS_PREFIX}ticket"
                err, ok = await call(mcp, "redis_command", grant="cache", command=f'SET {key} "a b c"')
                assert not err and ok["reply"] == "OK", ok
                err, got = await call(mcp, "redis_command", grant="cache", command=f"GET {key}")
                assert not err and got["reply"] == "a b c"
                err, off = await call(mcp, "redis_command", grant="cache", command="GET someone-elses-key")
                assert err and "NoPermissionError" in off  # the ACL Vault wrote: this module's keys only
                err, refused = await call(mcp, "redis_command", grant="cache", command="AUTH default x")
                assert err and "tool_refused" in refused
                await call(mcp, "redis_command", grant="cache", command=f"DEL {key}")

                held = {c.grant: c for c, _ in session_task._held.values()}
                canaries = [str(held["app-db"].data["password"]), str(held["cache"].data["password"])]
                users = [str(held["app-db"].data["username"]), str(held["cache"].data["username"])]
                async with UserClient(broker_url, user(msite)) as u:
                    await u.end_task(task_id)
                err, text = await call(mcp, "sql_query", grant="app-db", sql="SELECT 1")
                assert err and "ended" in text
        assert_no_canary(wire + captured_logs, canaries)
        with pymysql.connect(host="127.0.0.1", port=3306, user="root", password="") as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM mysql.user WHERE user = %s", (users[0],))
            assert cur.fetchone() == (0,)  # Vault dropped the MariaDB user with the task
        import redis

        with redis.Redis(host="127.0.0.1", port=6379) as r:
            assert users[1].encode() not in r.acl_users()


class TestSdkHelpers:
    async def test_use_dont_hold_helpers(self, msite: McpSite, broker_url: str, echo: list[str],
                                         tmp_path: Path) -> None:
        """task.postgres / mysql / redis / http yield a connection or a session; the credential is reused."""
        task_id, svid = await start(broker_url, msite, tmp_path)
        async with AgentClient(broker_url, SvidFile(svid)) as agent, agent.task(task_id) as task:
            async with task.postgres("tickets-db") as conn:
                first = (await (await conn.execute("SELECT current_user")).fetchone() or [""])[0]
            async with task.postgres("tickets-db") as conn:
                again = (await (await conn.execute("SELECT current_user")).fetchone() or [""])[0]
            assert first.startswith("v-") and first == again  # one credential, held while it lasts
            async with task.mysql("app-db") as my:
                cur = await my.cursor()
                await cur.execute("SELECT count(*) FROM tickets")
                assert await cur.fetchone() == (3,)
            async with task.redis("cache") as r:
                assert await r.ping() is True
            async with task.http("echo-api") as http:
                async with http.get("/hello") as resp:
                    assert resp.status == 200
                with pytest.raises(HostNotAllowed):
                    await http.get("http://localhost:1/")  # not on the grant's list: refused before connecting
            assert len(echo) == 1 and echo[0].startswith("Bearer ")
            with pytest.raises(ToolRefused, match="not a redis grant"):
                async with task.redis("tickets-db"):
                    pass
        assert (task.ended is not None and task.holding == 0) or task.ended is not None


    async def test_a_held_credential_is_renewed_or_replaced_near_its_end(self, msite: McpSite, broker_url: str,
                                                                         tmp_path: Path) -> None:
        """Reused while it has time left; near its end a renewable lease is renewed (same lease), a token that
        cannot be renewed is replaced by a new credential."""
        task_id, svid = await start(broker_url, msite, tmp_path)
        now = [time.time()]
        async with AgentClient(broker_url, SvidFile(svid)) as agent:
            task = agent.task(task_id, end_on_exit=False, clock=lambda: now[0])
            db = await task.held("tickets-db")
            assert (await task.held("tickets-db")).lease_id == db.lease_id
            now[0] = db.expires_at - 100  # inside the margin (a fifth of its life)
            renewed = await task.held("tickets-db")
            assert renewed.lease_id == db.lease_id and renewed.expires_at >= db.expires_at

            token = await task.held("echo-api")
            assert token.renewable is False
            now[0] = token.expires_at - 5
            fresh = await task.held("echo-api")
            assert fresh.lease_id != token.lease_id
            leases = (await agent.get_task(task_id)).leases or []
            assert sorted(x.grant for x in leases) == ["echo-api", "echo-api", "tickets-db"]
            await agent.end_task(task_id)


class TestStdio:
    async def test_broker_mcp_over_stdio(self, msite: McpSite, broker_url: str, tmp_path: Path) -> None:
        """`broker mcp` as an MCP host runs it: a subprocess on stdio; its stdout and stderr hold no secret."""
        task_id, svid = await start(broker_url, msite, tmp_path)
        params = StdioServerParameters(command=sys.executable, args=[
            "-m", "broker", "mcp", "--url", broker_url, "--task", task_id, "--svid-file", str(svid),
            "--max-rows", "5", "--timeout", "5"], env={"PYTHONPATH": str(Path(__file__).resolve().parents[2]),
                                                      "PATH": "/usr/bin:/bin"})
        wire: list[str] = []
        errlog = tmp_path / "stderr.log"
        with errlog.open("w") as err_file:
            async with stdio_client(params, errlog=err_file) as (read, write), \
                    ClientSession(Tap(read, wire), Tap(write, wire)) as mcp:
                await mcp.initialize()
                err, rows = await call(mcp, "sql_query", grant="tickets-db", sql="SELECT count(*) FROM tickets")
                assert not err and rows["columns"] == ["count"], rows
                async with UserClient(broker_url, user(msite)) as u:
                    await u.end_task(task_id)
                err, text = await call(mcp, "sql_query", grant="tickets-db", sql="SELECT 1")
                assert err and "ended" in text
        await asyncio.sleep(0.2)
        logs = errlog.read_text()
        assert "broker mcp for task" in logs
        assert_no_canary([*wire, logs], [svid.read_text().strip()])

    async def test_broker_mcp_over_streamable_http(self, msite: McpSite, broker_url: str, tmp_path: Path) -> None:
        """`--transport streamable-http` serves the same tools on a loopback port; a non-loopback one is refused."""
        from mcp.client.streamable_http import streamable_http_client

        task_id, svid = await start(broker_url, msite, tmp_path)
        env = {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PATH": "/usr/bin:/bin"}
        args = ["-m", "broker", "mcp", "--url", broker_url, "--task", task_id, "--svid-file", str(svid),
                "--transport", "streamable-http"]
        refused = await asyncio.create_subprocess_exec(sys.executable, *args, "--listen", "0.0.0.0:9", env=env,
                                                       stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(refused.communicate(), 60)
        assert refused.returncode == 1 and b"loopback address only" in err
        port = free_port()
        proc = await asyncio.create_subprocess_exec(sys.executable, *args, "--listen", f"127.0.0.1:{port}", env=env,
                                                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60  # a loaded 2-core machine takes a while to import the MCP SDK
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                except OSError:
                    assert proc.returncode is None and time.monotonic() < deadline, "broker mcp did not listen"
                    await asyncio.sleep(0.1)
            async with streamable_http_client(f"http://127.0.0.1:{port}/mcp") as (read, write), \
                    ClientSession(read, write) as mcp:
                await mcp.initialize()
                err, rows = await call(mcp, "sql_query", grant="tickets-db", sql="SELECT 40 + 2 AS answer")
                assert not err and rows["rows"] == [[42]], rows
        finally:
            proc.terminate()
            _, logs = await asyncio.wait_for(proc.communicate(), 30)
        assert svid.read_text().strip() not in logs.decode()


class TestWorkloadApi:
    async def test_spiffe_socket_supplies_the_svid(self, msite: McpSite, broker_url: str, tmp_path: Path) -> None:
        """--spiffe-socket: py-spiffe's client asks a Workload API (a loopback gRPC server on a unix socket, speaking
        SPIFFE's own workload.proto) for a JWT-SVID of the broker's audience, and the tools run with it."""
        from concurrent import futures

        import grpc
        from spiffe._proto import workload_pb2, workload_pb2_grpc

        task_id, _ = await start(broker_url, msite, tmp_path)
        asked: list[tuple[list[str], bool]] = []

        class WorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
            def FetchJWTSVID(self, request: Any, context: Any) -> Any:  # the proto's method name
                header = dict(context.invocation_metadata()).get("workload.spiffe.io") == "true"
                asked.append((list(request.audience), header))
                token = msite.ids.agent(AGENT, audience=request.audience[0])
                return workload_pb2.JWTSVIDResponse(svids=[workload_pb2.JWTSVID(spiffe_id=AGENT, svid=token)])

        socket_path = tmp_path / "agent.sock"
        grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(WorkloadApi(), grpc_server)
        grpc_server.add_insecure_port(f"unix://{socket_path}")
        grpc_server.start()
        try:
            source = WorkloadApiSvid.connect(f"unix://{socket_path}", "agent-broker")
            async with AgentClient(broker_url, source) as agent:
                tools = TaskTools(agent.task(task_id, end_on_exit=False), Limits(timeout=5))
                assert (await tools.list_grants())["task"] == task_id
                rows = await tools.sql_query("tickets-db", "SELECT 1 AS one")
                assert rows["rows"] == [[1]]
                await tools.close()
            source.close()
        finally:
            grpc_server.stop(grace=None)
        assert asked and asked[0] == (["agent-broker"], True)
        assert len(asked) == 1  # cached while it has time left, not fetched per request
