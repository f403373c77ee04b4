"""Configuration, sealing, audit redaction, the state tables and the public surfaces."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import pytest

from broker import sdk
from broker.audit import AuditRecord, redact
from broker.config import load_settings, parse_duration
from broker.errors import ConfigError, SealBroken
from broker.openapi import spec
from broker.sealing import TokenSealer
from broker.vault import Sensitive

MINIMAL = """
[server]
audience = "agent-broker"
[vault]
token_file = "token"
[store]
key_file = "store.key"
url = "sqlite:///data/broker.db"
"""


class TestConfig:
    def test_relative_paths_are_relative_to_the_file(self, tmp_path: Path) -> None:
        """token_file, key_file and a relative SQLite path resolve beside the config file."""
        (tmp_path / "b.toml").write_text(MINIMAL)
        s = load_settings({}, tmp_path / "b.toml")
        assert s.vault.token_file == tmp_path / "token"
        assert s.store.url == f"sqlite:///{tmp_path}/data/broker.db"

    def test_environment_overrides(self, tmp_path: Path) -> None:
        """BROKER_<SECTION>_<KEY> overrides the file."""
        (tmp_path / "b.toml").write_text(MINIMAL)
        s = load_settings({"BROKER_VAULT_ADDR": "http://127.0.0.1:9", "BROKER_SERVER_LISTEN": "127.0.0.1:1"},
                          tmp_path / "b.toml")
        assert s.vault.addr == "http://127.0.0.1:9" and s.server.listen == "127.0.0.1:1"

    @pytest.mark.parametrize("extra", ["[server]\nudience = 'typo'\n", "[bogus]\nx = 1\n"])
    def test_unknown_keys_are_errors(self, tmp_path: Path, extra: str) -> None:
        """A misspelt setting is an error, not a silent default."""
        text = MINIMAL.replace("[server]\n", "[server]\n" + extra.split("\n", 1)[1]) if extra.startswith(
            "[server]") else MINIMAL + extra
        (tmp_path / "b.toml").write_text(text)
        with pytest.raises(ConfigError):
            load_settings({}, tmp_path / "b.toml")

    def test_leeway_is_bounded(self, tmp_path: Path) -> None:
        """A token leeway above 60 s is refused."""
        (tmp_path / "b.toml").write_text(MINIMAL.replace('audience = "agent-broker"',
                                                         'audience = "agent-broker"\ntoken_leeway = 300'))
        with pytest.raises(ConfigError):
            load_settings({}, tmp_path / "b.toml")

    @pytest.mark.parametrize(("text", "seconds"), [(90, 90), ("90", 90), ("90s", 90), ("10m", 600),
                                                   ("1h30m", 5400)])
    def test_durations(self, text: object, seconds: int) -> None:
        """Durations are seconds or h/m/s strings."""
        assert parse_duration(text) == seconds

    @pytest.mark.parametrize("text", ["", "0", "-5", "1d", "10 m", True, 1.5])
    def test_bad_durations(self, text: object) -> None:
        """Anything else is refused."""
        with pytest.raises(ValueError):
            parse_duration(text)


class TestSealing:
    def test_round_trip_bound_to_task(self, tmp_path: Path) -> None:
        """A sealed token opens for its task only, and never shows in reprs."""
        TokenSealer.generate_key_file(tmp_path / "k")
        assert os.stat(tmp_path / "k").st_mode & 0o777 == 0o600
        sealer = TokenSealer.from_file(tmp_path / "k")
        blob = sealer.seal(Sensitive("s.abcdefghijklmnopqrstuvwx"), task_id="tsk_1")
        assert b"abcdefghijklmnop" not in blob
        assert sealer.open(blob, task_id="tsk_1").reveal() == "s.abcdefghijklmnopqrstuvwx"
        with pytest.raises(SealBroken):
            sealer.open(blob, task_id="tsk_2")
        with pytest.raises(SealBroken):
            sealer.open(blob[:-1] + bytes([blob[-1] ^ 1]), task_id="tsk_1")
        assert "abcdef" not in repr(sealer) + repr(sealer.open(blob, task_id="tsk_1"))

    def test_wrong_key_does_not_open(self, tmp_path: Path) -> None:
        """Another key cannot open the token."""
        TokenSealer.generate_key_file(tmp_path / "a")
        TokenSealer.generate_key_file(tmp_path / "b")
        blob = TokenSealer.from_file(tmp_path / "a").seal(Sensitive("s.x"), task_id="t")
        with pytest.raises(SealBroken):
            TokenSealer.from_file(tmp_path / "b").open(blob, task_id="t")

    def test_key_file_readable_by_others_is_refused(self, tmp_path: Path) -> None:
        """A store key readable by group or others is a configuration error."""
        TokenSealer.generate_key_file(tmp_path / "k")
        os.chmod(tmp_path / "k", 0o644)
        with pytest.raises(ConfigError):
            TokenSealer.from_file(tmp_path / "k")

    def test_never_overwrites(self, tmp_path: Path) -> None:
        """Generating a key where one exists fails instead of orphaning every sealed token."""
        TokenSealer.generate_key_file(tmp_path / "k")
        with pytest.raises(FileExistsError):
            TokenSealer.generate_key_file(tmp_path / "k")


class TestRedaction:
    @pytest.mark.parametrize("secret", [
        "s.AAAAAAAAAAAAAAAAAAAAAAAA", "hvs.CAESIJ0123456789abcdefghijklmnop",
        "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
        "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIB\n-----END EC PRIVATE KEY-----",
    ])
    def test_secret_shapes_never_reach_a_record(self, secret: str) -> None:
        """Tokens, JWTs and private keys are replaced before a record is stored."""
        rec = AuditRecord(0.0, "access.denied", "denied", reason=f"got {secret} from caller", resource=secret)
        red = rec.redacted()
        assert secret not in repr(red) and "[redacted]" in (red.reason or "")

    def test_every_field_redacted_as_redact_does(self) -> None:
        """A record's redaction (its quick pre-checks included) is ``redact`` of each text field, on random text
        made of the secret shapes' pieces: nothing a shape matches survives, nothing else changes."""
        rng = random.Random(11)
        pieces = ["s.", "b.", "r.", "hvs.", "hvr", "eyJ", "-----BEGIN ", "RSA PRIVATE KEY-----", "-----END ", ".",
                  "A" * 12, "x_-", " ", "\n", "\x00", "é", "/", "tsk_1"]
        names = [f.name for f in dataclasses.fields(AuditRecord)][3:]
        for _ in range(3000):
            kw = {n: "".join(rng.choices(pieces, k=rng.randint(0, 9))) if rng.random() < 0.5 else None for n in names}
            rec = AuditRecord(0.0, "e", "success", **kw)  # type: ignore[arg-type]
            assert rec.redacted() == dataclasses.replace(rec, **{n: redact(v) for n, v in kw.items() if v is not None})
        long = AuditRecord(0.0, "e", "success", reason="a" * 2001)
        assert long.redacted().reason == "a" * 2000

    def test_ordinary_text_is_kept(self) -> None:
        """Paths, SPIFFE IDs and lease ids survive redaction unchanged."""
        text = "database/creds/tickets-ro spiffe://example.org/agent/support-1 lse_abc"
        assert redact(text) == text


class TestSurfaces:
    def test_sdk_surface_is_pinned(self) -> None:
        """broker.sdk.__all__ is a contract with agents: changing it is a decision, not an accident."""
        assert sorted(sdk.__all__) == ["AgentClient", "ApprovalPending", "TaskSession", "TokenSource", "UserClient"]

    def test_sdk_imports_only_client_models_and_errors(self) -> None:
        """The SDK can be vendored with five modules: the shared client, the wire models, the errors, and for
        the "use, don't hold" helpers the connectors and the endpoint parser."""
        source = Path(sdk.__file__).read_text()
        imports = {line.split()[1] for line in source.splitlines() if line.startswith(("from broker", "import broker"))}
        assert imports <= {"broker", "broker.client", "broker.models", "broker.endpoints"}
        assert "from broker import connectors, errors" in source

    def test_the_sdk_loads_no_driver_until_a_helper_is_used(self) -> None:
        """Importing broker.sdk loads no database or Redis driver and no MCP SDK: an agent installs only what it uses."""
        import subprocess
        import sys

        code = ("import sys, broker.sdk; print(sorted(m for m in ('psycopg', 'aiomysql', 'pymysql', 'redis', 'mcp', "
                "'spiffe', 'broker.vault', 'broker.store') if m in sys.modules))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=Path(sdk.__file__).parents[1])
        assert out.stdout.strip() == "[]"

    def test_client_imports_nothing_heavier_than_aiohttp_yarl_errors_and_models(self) -> None:
        """broker.client travels with the SDK: beyond the standard library, only aiohttp, yarl, errors, models."""
        import ast
        import sys

        from broker import client

        tree = ast.parse(Path(client.__file__).read_text())
        modules: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module == "broker":
                modules |= {f"broker.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module is not None:
                modules.add(node.module)
        outside = {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names}
        assert outside <= {"aiohttp", "yarl", "broker.errors", "broker.models"}
        assert "broker.errors" in outside

    def test_openapi_declares_security_on_every_protected_operation(self) -> None:
        """Every operation but health, metrics, the spec itself and the SSF transmitter's public metadata and
        keys declares bearer security."""
        for path, ops in spec()["paths"].items():
            for method, op in ops.items():
                if path in ("/v1/health", "/v1/openapi.json", "/metrics", "/.well-known/ssf-configuration",
                            "/v1/signals/jwks.json"):
                    assert "security" not in op
                else:
                    assert op["security"], (method, path)

    def test_openapi_covers_every_route(self) -> None:
        """Every API route the app serves is in the OpenAPI document, with its method."""
        from aiohttp import web

        from broker.api import add_routes

        app = web.Application()
        add_routes(app)
        doc = spec()
        served = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
                  if r.method != "HEAD" and r.resource is not None}
        assert {(m, p) for m, p in served if p not in doc["paths"] or m not in doc["paths"][p]} == set()
