"""``[vault].ca_cert``: the broker, and ``broker vault sync``, against an OpenBao that serves https only, with a
certificate from a CA of its own (``bao server -dev -dev-tls``), as a production Vault behind a private CA.

What a user sees: with the CA configured, tasks start and credentials are issued over TLS; without it, or
with another CA, nothing is sent to Vault (the handshake fails) and the error says TLS, not "retry later";
a CA file that is missing or is not PEM stops the broker at start-up, naming the file and not its contents.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from broker.app import make_app
from broker.config import Settings, VaultSettings, load_settings
from broker.delegation import Catalog
from broker.dev.stack import DevOpenBao, configure_child_token_role, start_dev_openbao
from broker.errors import ConfigError, VaultError, VaultTLSFailed
from broker.vault import VaultClient
from broker.vault.admin import VaultAdmin
from broker.vault.sync import audit_device_of, sync, write_broker_token
from broker.vault.tls import vault_tls_context
from tests.conftest import AGENT, BrokerSite, bearer

pytestmark = pytest.mark.timeout(120)

Client = TestClient[Any, Any]


@pytest.fixture(scope="module")
def tls_bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevOpenBao]:
    server = start_dev_openbao(tmp_path_factory.mktemp("tls-bao"), startup_timeout=30, tls=True)
    try:
        yield server
    finally:
        server.stop()


def other_ca(path: Path) -> Path:
    """A CA certificate that signed nothing OpenBao serves."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the Vault CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


class TestTheServingClient:
    async def test_with_the_ca_it_talks_to_vault(self, tls_bao: DevOpenBao) -> None:
        assert tls_bao.addr.startswith("https://") and tls_bao.ca_cert is not None
        async with aiohttp.ClientSession() as session:
            vault = VaultClient(session, tls_bao.addr, token=tls_bao.root_token,
                                ssl_context=vault_tls_context(tls_bao.ca_cert))
            info = await vault.lookup_self()
        assert "root" in info.policies

    @pytest.mark.parametrize("trust", ["system", "another CA"])
    async def test_without_it_the_certificate_is_refused_and_it_is_not_retry_later(
            self, tls_bao: DevOpenBao, tmp_path: Path, trust: str) -> None:
        """The system's store and an unrelated CA both refuse OpenBao's certificate: VaultTLSFailed (a
        configuration problem or an attack), not VaultUnavailable, and without the token in it."""
        ca = None if trust == "system" else other_ca(tmp_path / "other-ca.pem")
        async with aiohttp.ClientSession() as session:
            vault = VaultClient(session, tls_bao.addr, token=tls_bao.root_token, ssl_context=vault_tls_context(ca))
            with pytest.raises(VaultTLSFailed) as caught:
                await vault.lookup_self()
        text = f"{caught.value} {caught.value.reason}"
        assert str(caught.value) == "TLS with Vault failed (lookup self): unable to get local issuer certificate"
        assert caught.value.code == "vault_tls_failed" and caught.value.http_status == 502
        assert tls_bao.root_token.reveal() not in text

    async def test_a_certificate_for_another_name_is_refused(self, tls_bao: DevOpenBao) -> None:
        """The right CA, the wrong name: OpenBao's certificate names localhost and 127.0.0.1, and the address
        names the same loopback host as ``127.1``, a name the certificate does not hold (as a certificate
        from the same CA for another host would be presented). Refused as VaultTLSFailed, saying so."""
        port = tls_bao.addr.rsplit(":", 1)[1]
        assert tls_bao.ca_cert is not None
        async with aiohttp.ClientSession() as session:
            vault = VaultClient(session, f"https://127.1:{port}", token=tls_bao.root_token,
                                ssl_context=vault_tls_context(tls_bao.ca_cert))
            with pytest.raises(VaultTLSFailed) as caught:
                await vault.lookup_self()
            # The same CA and the name the certificate holds: accepted (so the refusal was the name's).
            named = VaultClient(session, f"https://localhost:{port}", token=tls_bao.root_token,
                                ssl_context=vault_tls_context(tls_bao.ca_cert))
            assert "root" in (await named.lookup_self()).policies
        assert str(caught.value) == ("TLS with Vault failed (lookup self): Hostname mismatch, certificate is not "
                                     "valid for '127.1'.")
        assert tls_bao.root_token.reveal() not in f"{caught.value} {caught.value.reason}"

    async def test_https_to_a_plain_http_vault_is_a_tls_failure(self, site: BrokerSite) -> None:
        """An https address where Vault serves plain HTTP (the session's OpenBao): a TLS failure, not an outage."""
        addr = site.engines.bao.addr.replace("http://", "https://", 1)
        async with aiohttp.ClientSession() as session:
            vault = VaultClient(session, addr, token=site.engines.bao.root_token, ssl_context=vault_tls_context(None))
            with pytest.raises(VaultTLSFailed) as caught:
                await vault.lookup_self()
        assert str(caught.value).startswith("TLS with Vault failed (lookup self): "), caught.value


class TestTheCaFile:
    def test_a_missing_file_names_the_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"vault\.ca_cert .*absent\.pem: No such file"):
            vault_tls_context(tmp_path / "absent.pem")

    def test_a_file_that_is_not_pem_names_the_file_and_not_its_contents(self, tmp_path: Path) -> None:
        bad = tmp_path / "ca.pem"
        bad.write_text("s3cr3t-not-a-certificate\n")
        with pytest.raises(ConfigError) as caught:
            vault_tls_context(bad)
        assert str(bad) in str(caught.value) and "s3cr3t" not in str(caught.value)

    def test_it_is_only_for_https(self, tmp_path: Path) -> None:
        with pytest.raises(ValidationError, match="ca_cert is for https"):
            VaultSettings(addr="http://127.0.0.1:8200", token_file=tmp_path / "t", ca_cert=tmp_path / "ca.pem")
        VaultSettings(addr=("http://127.0.0.1:8200", "https://127.0.0.1:8201"), token_file=tmp_path / "t",
                      ca_cert=tmp_path / "ca.pem")

    def test_the_environment_can_set_it(self, site: BrokerSite, tmp_path: Path) -> None:
        settings = load_settings({"BROKER_VAULT_ADDR": "https://127.0.0.1:8200",
                                  "BROKER_VAULT_CA_CERT": str(tmp_path / "ca.pem")}, site.root / "broker.toml")
        assert settings.vault.ca_cert == tmp_path / "ca.pem"


def tls_settings(site: BrokerSite, bao: DevOpenBao, token_file: Path, *, ca_cert: Path | None) -> Settings:
    vault = site.settings.vault.model_copy(update={"addr": bao.addr, "ca_cert": ca_cert, "token_file": token_file,
                                                   "audit_log": None})
    return site.settings.model_copy(update={"vault": vault})


@pytest.fixture
def tls_token(site: BrokerSite, tls_bao: DevOpenBao, tmp_path: Path) -> Path:
    """The session's catalog synced into the TLS OpenBao (through hvac, with the CA) and a broker token."""
    with VaultAdmin(tls_bao.addr, token=tls_bao.root_token, ca_cert=tls_bao.ca_cert) as admin:
        configure_child_token_role(admin)
        sync(admin, Catalog.from_settings(site.settings), audit_device=audit_device_of(site.settings))
        write_broker_token(admin, tmp_path / "vault-token")
    return tmp_path / "vault-token"


@pytest_asyncio.fixture
async def tls_client(site: BrokerSite, tls_bao: DevOpenBao, tls_token: Path,
                     aiohttp_client: Callable[..., Any]) -> AsyncIterator[Client]:
    yield await aiohttp_client(make_app(tls_settings(site, tls_bao, tls_token, ca_cert=tls_bao.ca_cert)))


class TestTheBroker:
    async def test_a_task_and_its_credential_over_tls(self, tls_client: Client, site: BrokerSite,
                                                      tls_bao: DevOpenBao) -> None:
        """Ready, a task started, a child token issued and the task ended: every Vault call over TLS."""
        ready = await tls_client.get("/v1/health")
        assert ready.status == 200, await ready.text()
        resp = await tls_client.post("/v1/tasks", json={"agent": AGENT, "role": "support-triage", "ttl": "10m",
                                                        "reason": "ticket 42"}, headers=bearer(site.ids.user()))
        assert resp.status == 201, await resp.text()
        task = await resp.json()
        resp = await tls_client.post(f"/v1/tasks/{task['id']}/credentials", json={"grant": "child-token"},
                                     headers=bearer(site.ids.agent()))
        assert resp.status == 200, await resp.text()
        token = (await resp.json())["data"]["token"]
        async with aiohttp.ClientSession() as session:
            vault = VaultClient(session, tls_bao.addr, ssl_context=vault_tls_context(tls_bao.ca_cert))
            assert (await vault.lookup_self(token=token)).policies
            end = await tls_client.post(f"/v1/tasks/{task['id']}/end", headers=bearer(site.ids.agent()))
            assert end.status == 200, await end.text()
            with pytest.raises(VaultError):
                await vault.lookup_self(token=token)

    async def test_without_the_ca_it_is_not_ready_and_the_log_says_why(
            self, site: BrokerSite, tls_bao: DevOpenBao, tls_token: Path, aiohttp_client: Callable[..., Any],
            caplog: pytest.LogCaptureFixture) -> None:
        """Not ready, "unreachable" to whoever asks (the answer never says why); the log says TLS, once."""
        client = await aiohttp_client(make_app(tls_settings(site, tls_bao, tls_token, ca_cert=None)))
        for _ in range(2):
            ready = await client.get("/v1/health")
            assert ready.status == 503, await ready.text()
            assert (await ready.json())["vault"] == "unreachable"
            await asyncio.sleep(1.1)  # past the readiness cache
        told = [r.getMessage() for r in caplog.records if r.getMessage().startswith("readiness: Vault cannot")]
        assert len(told) == 1 and "TLS with Vault failed" in told[0], told


def run_sync(site: BrokerSite, bao: DevOpenBao, config: Path, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_", "SSL_"))}
    env.update(BAO_TOKEN=bao.root_token.reveal(), **env_extra)
    return subprocess.run([sys.executable, "-m", "broker", "vault", "sync", "--config", str(config)],
                          env=env, capture_output=True, text=True, timeout=60, check=False)


class TestVaultSync:
    def config(self, site: BrokerSite, bao: DevOpenBao, tmp_path: Path, ca_cert: Path | None) -> Path:
        text = (site.root / "broker.toml").read_text()
        text = text.replace(f'addr = "{site.engines.bao.addr}"', f'addr = "{bao.addr}"', 1)
        assert bao.addr in text
        if ca_cert is not None:
            text = text.replace("[vault]\n", f'[vault]\nca_cert = "{ca_cert}"\n', 1)
        path = site.root / f"tls-{tmp_path.name}.toml"  # beside the session's config: its relative files resolve
        path.write_text(text)
        return path

    def test_with_the_ca_from_the_config(self, site: BrokerSite, tls_bao: DevOpenBao, tmp_path: Path) -> None:
        out = run_sync(site, tls_bao, self.config(site, tls_bao, tmp_path, tls_bao.ca_cert))
        assert out.returncode == 0, out.stderr
        assert "broker-task-support-triage" in out.stdout

    def test_with_the_ca_from_the_environment(self, site: BrokerSite, tls_bao: DevOpenBao, tmp_path: Path) -> None:
        assert tls_bao.ca_cert is not None
        out = run_sync(site, tls_bao, self.config(site, tls_bao, tmp_path, None), VAULT_CACERT=str(tls_bao.ca_cert))
        assert out.returncode == 0, out.stderr

    def test_a_missing_ca_file_is_named_before_vault_is_called(self, site: BrokerSite, tls_bao: DevOpenBao,
                                                               tmp_path: Path) -> None:
        out = run_sync(site, tls_bao, self.config(site, tls_bao, tmp_path, tmp_path / "absent.pem"))
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert "vault.ca_cert" in out.stderr and "absent.pem: No such file" in out.stderr, out.stderr

    def test_without_it_a_one_line_tls_error(self, site: BrokerSite, tls_bao: DevOpenBao, tmp_path: Path) -> None:
        out = run_sync(site, tls_bao, self.config(site, tls_bao, tmp_path, None))
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert "TLS with Vault failed" in out.stderr and "unable to get local issuer certificate" in out.stderr
        assert "set [vault].ca_cert, or VAULT_CACERT" in out.stderr
        assert out.stderr.count("\n") == 1 and tls_bao.root_token.reveal() not in out.stderr + out.stdout
