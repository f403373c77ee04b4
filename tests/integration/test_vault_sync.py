"""`broker vault sync` against a real OpenBao: exact policies, idempotence, and a broker token that can't read secrets."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from broker.config import load_settings
from broker.delegation import Catalog
from broker.errors import VaultBadResponse, VaultDenied
from broker.vault import VaultClient
from broker.vault.admin import VaultAdmin
from broker.vault.sync import BROKER_POLICY, task_policy_hcl
from tests.conftest import BrokerSite


def run_sync(site: BrokerSite, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(BAO_ADDR=site.engines.bao.addr, BAO_TOKEN=site.engines.bao.root_token.reveal())
    return subprocess.run([sys.executable, "-m", "broker", "vault", "sync", "--config", str(site.root / "broker.toml"),
                           *extra], env=env, capture_output=True, text=True, timeout=60, check=False)


class TestVaultSync:
    def test_second_run_changes_nothing(self, site: BrokerSite) -> None:
        """The session already synced: running again reports every object unchanged."""
        out = run_sync(site)
        assert out.returncode == 0, out.stderr
        lines = [line.split() for line in out.stdout.splitlines() if line.strip()]
        assert lines and all(parts[-1] == "unchanged" for parts in lines)
        assert {parts[-2] for parts in lines} >= {"broker-task-support-triage", "broker-task-billing-report",
                                                   BROKER_POLICY}

    def test_without_admin_token_it_refuses(self, site: BrokerSite) -> None:
        """No VAULT_TOKEN/BAO_TOKEN: a one-line error, exit code 1."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        out = subprocess.run([sys.executable, "-m", "broker", "vault", "sync", "--config",
                              str(site.root / "broker.toml")], env=env, capture_output=True, text=True, timeout=60,
                             check=False)
        assert out.returncode == 1 and "VAULT_TOKEN" in out.stderr and "Traceback" not in out.stderr

    def test_a_token_grants_orphan_role_is_refused_before_anything_is_written(
            self, site: BrokerSite, hvac_admin: VaultAdmin) -> None:
        """A child-token grant's role that makes orphans would let its tokens outlive their task (and rule 9
        of broker.journal counts on them dying with it): the sync names the role, exits 1, writes nothing."""
        grant_roles = {g.path.rsplit("/", 1)[1] for r in Catalog.from_settings(site.settings).roles.values()
                       for g in r.grants.values() if g.path.startswith("auth/token/create/")}
        assert "agent-child" in grant_roles
        original = hvac_admin.read_token_role("agent-child")
        assert original is not None and not original.orphan
        policy = hvac_admin.read_policy(BROKER_POLICY)
        hvac_admin.put_token_role("agent-child", dataclasses.replace(original, orphan=True))
        try:
            hvac_admin.put_policy(BROKER_POLICY, (policy or "") + "\n# marker\n")
            out = run_sync(site)
            assert out.returncode == 1, out.stdout
            assert "agent-child" in out.stderr and "orphan" in out.stderr and "Traceback" not in out.stderr
            assert (hvac_admin.read_policy(BROKER_POLICY) or "").endswith("# marker\n")  # not rewritten
        finally:
            hvac_admin.put_token_role("agent-child", original)
            hvac_admin.put_policy(BROKER_POLICY, policy or "")
        assert run_sync(site).returncode == 0

    def test_task_policy_holds_exactly_the_grants(self, site: BrokerSite, hvac_admin: VaultAdmin) -> None:
        """The Vault policy of a task role is exactly what the catalog says."""
        role = Catalog.from_settings(site.settings).roles["support-triage"]
        stored = hvac_admin.read_policy("broker-task-support-triage")
        assert stored is not None and stored.strip() == task_policy_hcl(role).strip()
        paths = sorted(line.split('"')[1] for line in stored.splitlines() if line.startswith("path"))
        assert paths == sorted([*(g.path for g in role.grants.values()), "sys/leases/renew", "auth/token/create",
                                "auth/token/renew-self"])

    async def test_broker_token_cannot_read_secrets(self, site: BrokerSite) -> None:
        """The broker's own token (policy agent-broker) is refused every secret path and every foreign token role."""
        token = (site.root / "vault-token").read_text().strip()
        async with aiohttp.ClientSession() as session:
            broker = VaultClient(session, site.engines.bao.addr, token=token)
            info = await broker.lookup_self()
            assert set(info.policies) == {"default", BROKER_POLICY}
            for path, method in (("database/creds/tickets-ro", "GET"), ("pki/issue/agents", "POST"),
                                 ("auth/token/create/agent-child", "POST")):
                with pytest.raises(VaultDenied):
                    await broker.read_credential(path, token=token, method=method,  # type: ignore[arg-type]
                                                 data={"common_name": "x.example.org"} if method == "POST" else None)
            with VaultAdmin(site.engines.bao.addr, token=token) as broker_admin, pytest.raises(VaultDenied):
                await asyncio.to_thread(broker_admin.create_token, policies=["root"])
            # Through its own token role it cannot smuggle in another policy.
            with pytest.raises((VaultDenied, VaultBadResponse)):
                await broker.create_token_from_role("broker-task-support-triage", policies=["root"], ttl=60,
                                                    explicit_max_ttl=60, meta={}, display_name="x")

    def test_write_token_file_is_private(self, site: BrokerSite, tmp_path: Path) -> None:
        """--write-token writes a working token readable by the owner only."""
        out = run_sync(site, "--write-token", str(tmp_path / "tok"))
        assert out.returncode == 0, out.stderr
        assert (tmp_path / "tok").stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "tok").read_text().startswith("s.")
        assert (tmp_path / "tok").read_text().strip() not in out.stdout + out.stderr

    def test_catalog_loads(self, site: BrokerSite) -> None:
        """The test configuration itself is a valid catalog (sanity for the other tests)."""
        assert set(Catalog.from_settings(load_settings({}, site.root / "broker.toml")).roles) == {
            "support-triage", "billing-report", "engines"}
