"""Grant types as data (broker.engines) and the one agent-chosen field (broker.sshkeys). No sockets."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.config import load_settings
from broker.delegation import Catalog, check_inputs
from broker.dev.config import AgentTrust, BrokerConfig, Grant, TaskRole
from broker.engines import ENGINES, engine_for_kind, infer_engine, revocation_of_kind
from broker.errors import BadRequest, ConfigError, Denied, VaultBadResponse
from broker.sshkeys import parse_public_key


def public(key: Any, comment: str = "") -> str:
    line: str = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    return f"{line} {comment}".strip()


def catalog_of(tmp_path: Path, *grants: Grant) -> Catalog:
    config = BrokerConfig(vault_addr="http://127.0.0.1:8200", audit_log=None,
                          agents=(AgentTrust(trust_domain="example.org", jwks_file="spiffe.jwks"),),
                          task_roles=(TaskRole(name="r", tenant="t", agents=("spiffe://example.org/agent/*",),
                                               delegators=("group:g",), max_ttl="30m", grants=grants),))
    return Catalog.from_settings(load_settings({}, config.write(tmp_path / "broker.toml")))


class TestInference:
    @pytest.mark.parametrize(("path", "engine", "revocation"), [
        ("database/creds/tickets-ro", "database", "revocable"),
        ("mysql/creds/app", "database", "revocable"),
        ("rabbitmq/creds/agent", "rabbitmq", "revocable"),
        ("pki/issue/agents", "pki", "revocable"),
        ("auth/token/create/agent-child", "token", "revocable"),
        ("ssh/sign/agents", "ssh", "expiry-only"),
        ("secret/data/team/api-key", "kv", "static"),
        ("pki/sign/agents", "dynamic", "revocable"),  # a CSR signing: no adapter, so a lease is required
    ])
    def test_path_shapes_name_their_engine(self, path: str, engine: str, revocation: str) -> None:
        """The first adapter whose shape (and mount, where it names one) matches; the catch-all last."""
        found = infer_engine(path)
        assert (found.name, found.revocation) == (engine, revocation)

    def test_a_named_engine_must_fit_the_path(self) -> None:
        """engine = "ssh" on another mount works; on a path of another shape it is a configuration error."""
        assert infer_engine("ssh-prod/sign/ops", "ssh").name == "ssh"
        with pytest.raises(ConfigError, match="not the shape"):
            infer_engine("database/creds/x", "ssh")
        with pytest.raises(ConfigError, match="unknown engine"):
            infer_engine("database/creds/x", "mongo")

    def test_every_adapter_declares_everything(self) -> None:
        """Each adapter has a class, a confirmation, a lease kind that fits the store's column, a summary."""
        for e in ENGINES:
            assert e.revocation in ("revocable", "expiry-only", "static") and e.summary
            assert len(e.kind) <= 8
            assert (e.revocation == "revocable") == (e.confirm in ("lease", "accessor"))
        assert [revocation_of_kind(k) for k in ("lease", "token", "cert", "static")] == [
            "revocable", "revocable", "expiry-only", "static"]
        assert engine_for_kind("unknown").confirm == "lease"  # an unknown kind is looked up, never assumed gone


class _Answer:
    def __init__(self, *, lease_id: str = "", data: dict[str, Any] | None = None) -> None:
        self.lease_id, self.lease_duration, self.renewable, self.data, self.auth = lease_id, 600, True, data, None


class TestReaders:
    def test_a_lease_engine_without_a_lease_is_refused(self) -> None:
        """A PKI role without generate_lease answers no lease: nothing revocable, so nothing handed out."""
        with pytest.raises(VaultBadResponse) as caught:
            infer_engine("pki/issue/x").read(_Answer(data={"certificate": "..."}), "pki/issue/x", 0.0)
        assert "generate_lease" in caught.value.reason

    def test_kv_reads_the_value_and_names_its_version(self) -> None:
        got = infer_engine("secret/data/a").read(
            _Answer(data={"data": {"k": "v"}, "metadata": {"version": 3}}), "secret/data/a", 0.0)
        assert (got.kind, got.vault_id, got.duration, dict(got.data)) == ("static", "secret/data/a@v3", None,
                                                                          {"k": "v"})
        assert "v" not in repr(got).replace("vault_id", "").replace("secret/data/a@v3", "")

    def test_kv_v1_answer_is_refused(self) -> None:
        with pytest.raises(VaultBadResponse, match="KV"):
            infer_engine("secret/data/a").read(_Answer(data={"k": "v"}), "secret/data/a", 0.0)


class TestPublicKeys:
    @pytest.mark.parametrize(("key", "type_", "bits"), [
        (ed25519.Ed25519PrivateKey.generate(), "ssh-ed25519", 256),
        (ec.generate_private_key(ec.SECP256R1()), "ecdsa-sha2-nistp256", 256),
        (ec.generate_private_key(ec.SECP384R1()), "ecdsa-sha2-nistp384", 384),
        (ec.generate_private_key(ec.SECP521R1()), "ecdsa-sha2-nistp521", 521),
        (rsa.generate_private_key(public_exponent=65537, key_size=3072), "ssh-rsa", 3072),
    ])
    def test_accepted_keys_parse_to_type_size_and_fingerprint(self, key: Any, type_: str, bits: int) -> None:
        """The fingerprint is ssh-keygen's SHA256 form; the comment never goes on to Vault."""
        text = public(key, "agent@laptop; rm -rf /")
        parsed = parse_public_key(text)
        blob = base64.b64decode(text.split()[1])
        assert (parsed.key_type, parsed.bits) == (type_, bits)
        assert parsed.fingerprint == "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
        assert parsed.openssh == " ".join(text.split()[:2])

    @pytest.mark.parametrize("text", [
        "", "ssh-ed25519", "ssh-dss AAAAB3NzaC1kc3MAAACBAP", "ssh-ed25519 !!!!",
        "ssh-ed25519-cert-v01@openssh.com AAAA", "sk-ssh-ed25519@openssh.com AAAA",
    ])
    def test_refused_shapes(self, text: str) -> None:
        with pytest.raises(BadRequest):
            parse_public_key(text)

    def test_short_rsa_and_mislabelled_blobs_are_refused(self) -> None:
        """An RSA key under 3072 bits, an ECDSA blob declared as Ed25519, a P-256 blob declared as P-384,
        two keys on two lines, trailing bytes in a blob."""
        p256 = public(ec.generate_private_key(ec.SECP256R1()))
        ed = public(ed25519.Ed25519PrivateKey.generate())
        padded = base64.b64encode(base64.b64decode(ed.split()[1]) + b"\x00\x00\x00\x00").decode()
        for text in (public(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
                     "ssh-ed25519 " + p256.split()[1], "ecdsa-sha2-nistp384 " + p256.split()[1],
                     f"{ed}\n{p256}", f"ssh-ed25519 {padded}", 42):
            with pytest.raises(BadRequest):
                parse_public_key(text)


class TestCatalogRules:
    def test_static_grant_needs_allow_static(self, tmp_path: Path) -> None:
        """A KV read is refused at config load unless the grant says allow_static = true."""
        with pytest.raises(ConfigError, match="allow_static"):
            catalog_of(tmp_path, Grant(name="k", path="secret/data/x", max_ttl="5m"))
        grant = catalog_of(tmp_path, Grant(name="k", path="secret/data/x", max_ttl="5m",
                                           allow_static=True)).roles["r"].grants["k"]
        assert (grant.revocation, grant.method) == ("static", "GET")

    def test_static_grant_is_refused_at_issue_too(self, tmp_path: Path) -> None:
        grant = catalog_of(tmp_path, Grant(name="k", path="secret/data/x", max_ttl="5m",
                                           allow_static=True)).roles["r"].grants["k"]
        from dataclasses import replace
        with pytest.raises(Denied):
            check_inputs(replace(grant, allow_static=False), public_key=None)

    def test_an_engine_fixes_its_method(self, tmp_path: Path) -> None:
        """ssh/sign is a write whatever the params; saying method = "read" is an error, not a silent GET."""
        grants = catalog_of(tmp_path, Grant(name="s", path="ssh/sign/a", max_ttl="5m")).roles["r"].grants
        assert grants["s"].method == "POST"
        with pytest.raises(ConfigError, match="is a write"):
            catalog_of(tmp_path, Grant(name="s", path="ssh/sign/a", max_ttl="5m", method="read"))

    def test_fixed_public_key_is_checked_at_load_and_closes_the_field(self, tmp_path: Path) -> None:
        """A grant that fixes public_key: the key must parse at load, and the agent may send none."""
        with pytest.raises(ConfigError, match="public_key"):
            catalog_of(tmp_path, Grant(name="s", path="ssh/sign/a", max_ttl="5m", params={"public_key": "nope"}))
        with pytest.raises(ConfigError, match="SSH signing grants only"):
            catalog_of(tmp_path, Grant(name="d", path="database/creds/a", max_ttl="5m",
                                       params={"public_key": public(ed25519.Ed25519PrivateKey.generate())}))
        fixed = public(ed25519.Ed25519PrivateKey.generate())
        grant = catalog_of(tmp_path, Grant(name="s", path="ssh/sign/a", max_ttl="5m",
                                           params={"public_key": fixed})).roles["r"].grants["s"]
        assert check_inputs(grant, public_key=None).key_fingerprint == parse_public_key(fixed).fingerprint
        with pytest.raises(BadRequest, match="takes no public_key"):
            check_inputs(grant, public_key=public(ed25519.Ed25519PrivateKey.generate()))

    def test_agent_key_goes_to_vault_canonical_and_ttl_only_where_taken(self, tmp_path: Path) -> None:
        """The agent's key is re-encoded (comment dropped); the TTL is sent where the engine takes one."""
        grants = catalog_of(tmp_path, Grant(name="s", path="ssh/sign/a", max_ttl="5m",
                                            params={"valid_principals": "deploy", "key_id": "{task}"}),
                            Grant(name="k", path="secret/data/x", max_ttl="5m", allow_static=True)).roles["r"].grants
        text = public(ed25519.Ed25519PrivateKey.generate(), "laptop")
        inputs = check_inputs(grants["s"], public_key=text)
        body = grants["s"].request_params(task="tsk_1", agent="a", user="u", tenant="t", role="r", ttl=60,
                                          inputs=inputs.params)
        assert body == {"valid_principals": "deploy", "key_id": "tsk_1", "public_key": " ".join(text.split()[:2]),
                        "ttl": "60s"}
        assert "ttl" not in grants["k"].request_params(task="t", agent="a", user="u", tenant="t", role="r", ttl=60)


class TestCatalogView:
    def test_broker_catalog_shows_how_each_grant_ends(self, tmp_path: Path) -> None:
        """`broker catalog` lists every grant with its engine and revocation class, and names the unrevocable."""
        from click.testing import CliRunner

        from broker.cli import main

        config = BrokerConfig(
            vault_addr="http://127.0.0.1:8200", audit_log=None,
            agents=(AgentTrust(trust_domain="example.org", jwks_file="spiffe.jwks"),),
            task_roles=(TaskRole(name="r", tenant="t", agents=("spiffe://example.org/agent/*",),
                                 delegators=("group:g",), max_ttl="30m", grants=(
                                     Grant(name="db", path="database/creds/a", max_ttl="5m"),
                                     Grant(name="ssh", path="ssh/sign/a", max_ttl="5m"),
                                     Grant(name="kv", path="secret/data/x", max_ttl="5m", allow_static=True))),))
        path = config.write(tmp_path / "broker.toml")
        out = CliRunner().invoke(main, ["catalog", "--config", str(path), "--json"])
        assert out.exit_code == 0, out.output
        rows = {r["grant"]: (r["engine"], r["revocation"], r["agent_inputs"])
                for r in map(__import__("json").loads, out.stdout.splitlines())}
        assert rows == {"db": ("database", "revocable", "-"), "ssh": ("ssh", "expiry-only", "public_key"),
                        "kv": ("kv", "static", "-")}
        table = CliRunner().invoke(main, ["catalog", "--config", str(path)])
        assert table.exit_code == 0 and "ENDS" in table.stdout
        assert "not revocable (the task's end cannot pull these back): kv, ssh" in table.stderr
