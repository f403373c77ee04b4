"""broker.dev.config: the TOML writer round-trips through ``tomllib``; a built config loads as the broker reads it."""

from __future__ import annotations

import ast
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.config import load_settings
from broker.dev.config import (
    AgentTrust,
    BrokerConfig,
    Grant,
    People,
    TaskRole,
    UserIssuer,
    example_grants,
    render_toml,
)

BROKER = Path(__file__).resolve().parents[2] / "broker"

HOSTILE = 'a "quoted" \\ back\\slash\nnew line\ttab\r\x00\x1f\x7f \u00e9 \U0001f512 \'single\' """ \'\'\' # = [x]'

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
_scalar = (st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | _text
           | st.floats(allow_nan=False))
# Values that are not tables: scalars, arrays, inline tables (whatever the nesting).
_inline = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                       max_leaves=8)
_table: st.SearchStrategy[dict[str, Any]] = st.recursive(
    st.dictionaries(_text, _inline, max_size=4),
    lambda inner: st.dictionaries(_text, _inline | inner | st.lists(inner, min_size=1, max_size=3), max_size=4),
    max_leaves=10)


class TestRenderToml:
    def test_the_subset_round_trips(self) -> None:
        """Tables, arrays of tables in arrays of tables, inline tables, arrays, and every scalar read back equal."""
        doc = {
            "server": {"listen": "127.0.0.1:0", "n": 3, "f": 0.25, "big": 1e300, "neg": -7, "on": True, "off": False},
            "empty": {},
            "agents": {"trust": [{"trust_domain": "a"}, {"trust_domain": "b"}]},
            "task_roles": [
                {"name": "r1", "agents": ["x", "y"], "grants": [
                    {"name": "g1", "params": {"common_name": "{task}.x", "n": 1, "flag": True}},
                    {"name": "g2", "params": {}, "nested": {"list": [{"a": 1}], "empty": []}},
                ]},
                {"name": "r2", "grants": [{"name": "g3"}]},
            ],
            HOSTILE: {HOSTILE: HOSTILE, "": "empty key", "dotted.key": [HOSTILE]},
        }
        assert tomllib.loads(render_toml(doc)) == doc

    def test_strings_are_escaped(self) -> None:
        """Quotes, backslashes and control characters cannot end a string or open a new key."""
        text = render_toml({"t": {"k": HOSTILE}})
        assert tomllib.loads(text) == {"t": {"k": HOSTILE}}
        assert "\n" not in text.split("k = ", 1)[1].rstrip("\n")

    @given(_table)
    def test_any_document_of_the_subset_round_trips(self, doc: dict[str, Any]) -> None:
        """Whatever the keys, strings and nesting, what is written reads back equal."""
        assert tomllib.loads(render_toml(doc)) == doc

    def test_non_finite_floats(self) -> None:
        """inf, -inf and nan are TOML floats too."""
        back = tomllib.loads(render_toml({"t": {"a": math.inf, "b": -math.inf, "c": math.nan}}))["t"]
        assert back["a"] == math.inf and back["b"] == -math.inf and math.isnan(back["c"])

    def test_a_comment_heads_the_file(self) -> None:
        """Each line of the comment becomes a TOML comment, which reads as nothing."""
        text = render_toml({"t": {"k": 1}}, comment="first\nsecond [t]\n")
        assert text.startswith("# first\n# second [t]\n") and tomllib.loads(text) == {"t": {"k": 1}}

    @pytest.mark.parametrize("value", [None, b"bytes", object(), {1: "non-string key"}])
    def test_what_toml_cannot_hold_is_refused(self, value: object) -> None:
        """No value is written as something that would read back differently."""
        with pytest.raises(TypeError):
            render_toml({"t": {"k": value}})

    def test_a_lone_surrogate_is_refused(self) -> None:
        """A string that is not Unicode text cannot be written."""
        with pytest.raises(ValueError):
            render_toml({"t": {"k": "\ud800"}})


class TestBrokerConfig:
    def test_a_full_config_loads(self, tmp_path: Path) -> None:
        """Every piece the builder takes arrives in Settings; relative paths resolve beside the file."""
        config = BrokerConfig(
            vault_addr="http://127.0.0.1:8200", listen="127.0.0.1:8401", audit_log="bao-audit.log", vault_timeout=2,
            revoke_confirm_timeout=3, task_token_bootstrap_ttl=7, store_url="sqlite:///data/b.db",
            signing_key_file="sign.key", witness_file="witness.txt",
            agents=(AgentTrust(trust_domain="example.org", jwks_file="spiffe.jwks"),),
            users=(UserIssuer(issuer="https://idp.example", jwks_file=tmp_path / "idp.jwks", groups_claim="roles"),),
            people=People(operators=("group:ops",), approvers=("bob@example.com",)),
            limits={"issue_rate_per_agent": 1.5, "max_live_leases_per_user": 9},
            maintenance={"interval": 0.5},
            task_roles=(TaskRole(name="r", tenant="t", agents=("spiffe://example.org/agent/*",),
                                 delegators=("group:support",), max_ttl="30m",
                                 grants=(*example_grants("example.org"),
                                         Grant(name="hi", path="kv/data/x", max_ttl=60, risk="high",
                                               approvals_required=2, method="read"))),),
            comment="a test config",
        )
        s = load_settings({}, config.write(tmp_path / "broker.toml"))
        assert s.server.listen == "127.0.0.1:8401" and s.server.audience == "agent-broker"
        assert (s.vault.addr, s.vault.audit_log, s.vault.timeout, s.vault.revoke_confirm_timeout,
                s.vault.task_token_bootstrap_ttl) == ("http://127.0.0.1:8200", tmp_path / "bao-audit.log", 2, 3, 7)
        assert s.vault.token_file == tmp_path / "vault-token" and s.store.key_file == tmp_path / "store.key"
        assert s.store.url == f"sqlite:///{tmp_path}/data/b.db"
        assert (s.audit.signing_key_file, s.audit.witness_file) == (tmp_path / "sign.key", tmp_path / "witness.txt")
        assert s.agents.trust[0].jwks_file == tmp_path / "spiffe.jwks"
        assert s.users.issuers[0].groups_claim == "roles"
        assert s.people.operators == ("group:ops",) and s.people.approvers == ("bob@example.com",)
        assert s.people.auditors == ()
        assert s.limits.issue_rate_per_agent == 1.5 and s.limits.max_live_leases_per_user == 9
        assert s.maintenance.interval == 0.5
        (role,) = s.task_roles
        assert role.max_ttl == 1800
        assert [(g.name, g.path, g.method, g.risk, g.approvals_required) for g in role.grants] == [
            ("tickets-db-ro", "database/creds/tickets-ro", None, "low", 1),
            ("agent-cert", "pki/issue/agents", None, "low", 1),
            ("child-token", "auth/token/create/agent-child", "write", "low", 1),
            ("hi", "kv/data/x", "read", "high", 2),
        ]
        assert role.grants[1].params == {"common_name": "{task}.agents.example.org", "uri_sans": "{agent}"}

    def test_defaults_load_as_the_broker_defaults(self, tmp_path: Path) -> None:
        """What the builder leaves out is what the broker defaults to."""
        s = load_settings({}, BrokerConfig(vault_addr="http://127.0.0.1:8200").write(tmp_path / "b.toml"))
        assert s.vault.audit_log is None and s.vault.timeout == 5.0 and s.task_roles == ()
        assert s.limits == type(s.limits)() and s.maintenance == type(s.maintenance)()
        assert s.people == type(s.people)() and s.audit == type(s.audit)()

    @pytest.mark.parametrize("field", ["limits", "maintenance"])
    def test_an_unknown_override_is_refused_where_it_is_written(self, field: str) -> None:
        """A misspelt limit or maintenance key fails at construction, naming the key."""
        with pytest.raises(ValueError, match="issue_rate_per_agnet"):
            BrokerConfig(vault_addr="http://x:1", **{field: {"issue_rate_per_agnet": 1}})


def test_only_dev_and_cli_import_broker_dev() -> None:
    """Production modules never depend on the dev tooling (throwaway keys, a dev OpenBao)."""
    offenders = []
    for path in BROKER.rglob("*.py"):
        rel = path.relative_to(BROKER)
        if rel.parts[0] in ("dev", "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:  # `from broker import dev` too
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            offenders += [f"{rel}: {n}" for n in names if n == "broker.dev" or n.startswith("broker.dev.")]
    assert offenders == []
