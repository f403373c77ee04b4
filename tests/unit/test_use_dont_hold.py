"""The pure parts of "use, don't hold": endpoints, host allow-lists, result bounds, Redis screening, redaction,
and where ``broker mcp`` gets its SVID (no sockets)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from broker.config import GrantSettings
from broker.connectors import Redactor, secrets_of
from broker.endpoints import Endpoint, HostAllowList
from broker.errors import ConfigError, ToolRefused
from broker.mcp.bounds import Limits, RowCollector, bound_text, bound_value, jsonable, parse_redis_command
from broker.mcp.server import RedactingFormatter
from broker.mcp.svid import SvidFile, WorkloadApiSvid


class TestEndpoint:
    @pytest.mark.parametrize(("text", "kind", "shown"), [
        ("postgresql://db.internal:5432/tickets", "postgresql", "postgresql://db.internal:5432/tickets"),
        ("postgres://DB.internal/tickets", "postgresql", "postgres://db.internal:5432/tickets"),
        ("mysql://127.0.0.1/app", "mysql", "mysql://127.0.0.1:3306/app"),
        ("redis://cache:6380/2", "redis", "redis://cache:6380/2"),
        ("rediss://cache", "redis", "rediss://cache:6379"),
        ("https://api.example.org", "http", "https://api.example.org:443"),
        ("http://127.0.0.1:8200", "http", "http://127.0.0.1:8200"),
        ("http://[::1]:8200", "http", "http://[::1]:8200"),
    ])
    def test_accepted(self, text: str, kind: str, shown: str) -> None:
        """Known schemes parse to a kind, a host, a default port and (for databases) a database."""
        e = Endpoint.parse(text)
        assert e.kind == kind and str(e) == shown

    @pytest.mark.parametrize(("text", "why"), [
        ("postgresql://app:s3cret-pw@db/tickets", "must not carry credentials"),
        ("postgresql://app@db/tickets", "must not carry credentials"),
        ("postgresql://db/tickets?password=s3cret-pw", "no query"),
        ("https://api.example.org/#frag", "no query"),
        ("http://api.example.org", "clear text"),
        ("ftp://files", "scheme must be one of"),
        ("postgresql://db", "names its database"),
        ("redis://cache/x", "database number"),
        ("https://api.example.org/v1", "the path goes in each request"),
        ("postgresql://db:70000/x", "valid port"),
        ("postgresql://db/a;drop", "database name"),
    ])
    def test_refused(self, text: str, why: str) -> None:
        """No credentials, queries, clear-text HTTP off loopback, unknown schemes or odd paths."""
        with pytest.raises(ValueError, match=why):
            Endpoint.parse(text)

    def test_the_catalog_refuses_a_password_without_repeating_it(self, tmp_path: Path) -> None:
        """A grant whose endpoint holds a password fails to load, and the error does not contain it."""
        from broker.config import load_settings

        (tmp_path / "b.toml").write_text("""
[server]
audience = "agent-broker"
[vault]
token_file = "token"
[store]
key_file = "store.key"
[[task_roles]]
name = "r"
tenant = "t"
agents = ["spiffe://example.org/a"]
delegators = ["group:g"]
max_ttl = "10m"
  [[task_roles.grants]]
  name = "db"
  path = "database/creds/x"
  max_ttl = "5m"
  endpoint = "postgresql://app:hunter2-canary@db/tickets"
""")
        with pytest.raises(ConfigError) as info:
            load_settings({}, tmp_path / "b.toml")
        assert "must not carry credentials" in str(info.value)
        assert "hunter2-canary" not in str(info.value)

    def test_allowed_hosts_need_an_http_endpoint(self) -> None:
        with pytest.raises(ValueError, match="need an https endpoint"):
            GrantSettings(name="db", path="database/creds/x", max_ttl=60, endpoint="postgresql://db/x",
                          allowed_hosts=("db",))


class TestHostAllowList:
    def test_exact_and_suffix(self) -> None:
        """Exact names, or any name below a '*.' suffix (never the suffix itself); case and a final dot ignored."""
        allowed = HostAllowList.parse(["API.example.org.", "*.svc.example.org"])
        assert allowed.allows("api.example.org") and allowed.allows("a.b.svc.example.org")
        assert not allowed.allows("svc.example.org") and not allowed.allows("example.org")
        assert not allowed.allows("api.example.org.evil.net") and not allowed.allows("evilsvc.example.org")
        assert allowed.patterns == ["api.example.org", "*.svc.example.org"]

    def test_default_is_the_endpoint_host_only(self) -> None:
        assert HostAllowList.parse([], default="api.example.org").patterns == ["api.example.org"]

    @pytest.mark.parametrize("bad", ["a*.example.org", "*", "exa mple.org", ""])
    def test_bad_patterns(self, bad: str) -> None:
        with pytest.raises(ValueError):
            HostAllowList.parse([bad])


class TestBounds:
    def test_rows_stop_at_the_row_limit(self) -> None:
        rows = RowCollector(Limits(max_rows=2))
        assert rows.add([1]) and rows.add([2]) and not rows.add([3])
        assert rows.rows == [[1], [2]] and rows.truncated

    def test_rows_stop_at_the_byte_limit(self) -> None:
        rows = RowCollector(Limits(max_rows=100, max_bytes=20))
        assert rows.add(["x" * 10]) and not rows.add(["y" * 10])
        assert rows.truncated and rows.bytes <= 20

    def test_values_become_json(self) -> None:
        import datetime
        import decimal
        import uuid

        assert jsonable(decimal.Decimal("1.50")) == "1.50"
        assert jsonable(b"text") == "text" and jsonable(b"\xff\x00") == {"base64": "/wA="}
        assert jsonable(datetime.date(2026, 1, 2)) == "2026-01-02"
        assert jsonable(uuid.UUID(int=1)) == "00000000-0000-0000-0000-000000000001"

    def test_replies_are_cut(self) -> None:
        value, cut = bound_value([b"a" * 10] * 100, 60)
        assert cut and isinstance(value, list) and 0 < len(value) < 100
        assert bound_text("é" * 10, 5) == ("éé", True)
        assert bound_value("short", 100) == ("short", False)

    def test_input_limits(self) -> None:
        with pytest.raises(ToolRefused, match="empty"):
            Limits().check_input("sql", "  ")
        with pytest.raises(ToolRefused, match="the limit is 10"):
            Limits(max_input_bytes=10).check_input("sql", "x" * 11)


class TestRedisCommands:
    def test_shell_quoting(self) -> None:
        assert parse_redis_command('SET "a key" \'a value\'') == ["SET", "a key", "a value"]

    @pytest.mark.parametrize("line", ["AUTH default pw", "hello 3 AUTH u p", "select 2", "MONITOR", "subscribe x",
                                      "BLPOP q 0", "CLIENT KILL ID 1", "", 'GET "unbalanced'])
    def test_refused(self, line: str) -> None:
        """Commands that change who the connection is, where it points, or never answer; and bad lines."""
        with pytest.raises(ToolRefused):
            parse_redis_command(line)


class TestRedaction:
    def test_secrets_and_their_encodings(self) -> None:
        """A secret is removed verbatim, URL-encoded, in base64 and in hex; short strings are left alone."""
        import base64

        r = Redactor()
        secret = "s.Abc123/def+ghi=="
        r.add(secret, "abc")
        for form in (secret, "s.Abc123%2Fdef%2Bghi%3D%3D", base64.b64encode(secret.encode()).decode(),
                     secret.encode().hex()):
            assert r.text(f"before {form} after") == "before [redacted] after"
        assert r.text("abc") == "abc"
        assert r.value({"k": [secret, {secret: 1}], "n": 2}) == {"k": ["[redacted]", {"[redacted]": 1}], "n": 2}
        r.clear()
        assert r.text(secret) == secret

    def test_which_fields_are_secret(self) -> None:
        data = {"username": "v-role-x", "password": "pw-123456", "token": "s.tok-123456", "ttl": 60,
                "certificate": "PUBLIC", "private_key": "-----BEGIN KEY-----\nAAAA\n-----END KEY-----"}
        assert sorted(secrets_of(data)) == sorted(["pw-123456", "s.tok-123456", data["private_key"]])

    def test_the_log_formatter_redacts_tracebacks_too(self) -> None:
        r = Redactor()
        r.add("pw-canary-123456")
        fmt = RedactingFormatter(r)
        try:
            raise RuntimeError("driver said pw-canary-123456")
        except RuntimeError:
            import sys

            record = logging.LogRecord("x", logging.ERROR, __file__, 1, "got %s", ("pw-canary-123456",),
                                       sys.exc_info())
        text = fmt.format(record)
        assert "pw-canary-123456" not in text and text.count("[redacted]") >= 2 and "Traceback" in text


class TestSvidSources:
    async def test_file_is_read_again_only_when_it_changes(self, tmp_path: Path) -> None:
        path = tmp_path / "svid"
        path.write_text("first.token.x\n")
        source = SvidFile(path)
        assert await source() == "first.token.x"
        path.write_text("second.token\n")  # another size: seen even within the same mtime tick
        assert await source() == "second.token"
        tmp = tmp_path / "new"
        tmp.write_text("third.token.\n")
        os.replace(tmp, path)  # a rename: a new inode
        assert await source() == "third.token."

    async def test_file_problems_are_config_errors(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="cannot be read"):
            await SvidFile(tmp_path / "missing")()
        (tmp_path / "empty").write_text("\n")
        with pytest.raises(ConfigError, match="empty"):
            await SvidFile(tmp_path / "empty")()

    async def test_workload_api_svid_is_cached_until_near_expiry(self) -> None:
        """The Workload API is asked for an SVID of the broker's audience, again only near the SVID's expiry."""
        now = [1000.0]
        calls: list[set[str]] = []

        class Svid:
            def __init__(self, n: int) -> None:
                self.token, self.expiry = f"svid-{n}", 1000 + 300

        class FakeClient:
            def fetch_jwt_svid(self, audience: set[str]) -> Svid:
                calls.append(audience)
                return Svid(len(calls))

        source = WorkloadApiSvid(FakeClient(), "agent-broker", clock=lambda: now[0])
        assert await source() == "svid-1" and await source() == "svid-1"
        now[0] = 1000 + 300 - 10
        assert await source() == "svid-2"
        assert calls == [{"agent-broker"}, {"agent-broker"}]

    async def test_workload_api_failure_is_a_config_error(self) -> None:
        class Broken:
            def fetch_jwt_svid(self, audience: set[str]) -> None:
                raise OSError("socket gone")

        with pytest.raises(ConfigError, match="gave no JWT-SVID"):
            await WorkloadApiSvid(Broken(), "agent-broker")()

    def test_a_bad_socket_path_is_a_config_error(self) -> None:
        with pytest.raises(ConfigError, match="Workload API socket"):
            WorkloadApiSvid.connect("tcp://nowhere", "agent-broker")


class TestCatalogGrants:
    def test_grants_carry_their_endpoint_allow_list_and_how_they_end(self) -> None:
        """The catalog parses endpoints once; an https grant's allow-list defaults to its own host."""
        from broker.delegation import Grant
        from broker.engines import infer_engine

        def grant(path: str, engine: str | None = None) -> Grant:
            # How a grant ends is its engine adapter's (broker.engines), inferred from the path as the catalog does.
            return Grant("g", path, 60, "low", "GET", engine=infer_engine(path, engine))

        assert grant("database/creds/ro").revocation == "revocable"
        assert grant("pki/issue/agents").revocation == "revocable"
        assert grant("ssh-client-signer/sign/ops", "ssh").revocation == "expiry-only"
        assert grant("secret/data/api-key").revocation == "static"

        from broker.config import TaskRoleSettings
        from broker.delegation import _role

        role = _role(TaskRoleSettings(name="r", tenant="t", agents=("spiffe://example.org/a",), delegators=("group:g",),
                                      max_ttl=600, grants=(
            GrantSettings(name="api", path="auth/token/create/x", max_ttl=60, endpoint="https://API.example.org"),
            GrantSettings(name="db", path="database/creds/x", max_ttl=60, endpoint="postgresql://db/tickets"))))
        api, db = role.grants["api"], role.grants["db"]
        assert api.endpoint is not None and api.endpoint.kind == "http"
        assert api.allowed_hosts is not None and api.allowed_hosts.patterns == ["api.example.org"]
        assert db.endpoint is not None and db.endpoint.database == "tickets" and db.allowed_hosts is None


class TestCommand:
    def test_broker_mcp_refuses_to_start_without_an_svid(self, tmp_path: Path) -> None:
        """Exactly one SVID source; a missing file ends the command at start with one line, not at the first call."""
        from click.testing import CliRunner

        from broker.cli import main

        runner = CliRunner()
        both = runner.invoke(main, ["mcp", "--url", "http://127.0.0.1:9", "--task", "t", "--svid-file",
                                    str(tmp_path / "s"), "--spiffe-socket", "unix:///x"])
        assert both.exit_code == 2 and "exactly one of --svid-file and --spiffe-socket" in both.output
        missing = runner.invoke(main, ["mcp", "--url", "http://127.0.0.1:9", "--task", "t", "--svid-file",
                                       str(tmp_path / "missing")])
        assert missing.exit_code == 1 and "invalid_config: the SVID file" in missing.output
