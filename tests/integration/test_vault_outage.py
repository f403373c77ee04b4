"""OpenBao stops in the middle of a revocation (raft storage, so it comes back with its data).

The broker must say `revoke_pending` (never "revoked") while Vault is away, issue nothing, answer 503
with Retry-After, and finish the revocation by itself when Vault is back: Vault lookups and a refused
PostgreSQL login are the proof.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest

from broker.api import STORE
from broker.app import make_app
from broker.audit.signing import generate_signing_key_file
from broker.config import load_settings
from broker.delegation import Catalog
from broker.dev.stack import PersistentOpenBao
from broker.sealing import TokenSealer
from broker.vault import VaultClient
from broker.vault.admin import VaultAdmin
from broker.vault.sync import audit_device_of, sync, write_broker_token
from tests.conftest import AGENT, Identities, bearer, site_config
from tests.support.fixtures import BaoEngines

FAST_MAINTENANCE = {"interval": 0.3, "max_backoff": 1}


async def _broker(tmp: Path, bao: PersistentOpenBao, ids: Identities, aiohttp_client: Callable[..., Any]) -> Any:
    ids.spiffe.write_jwks(tmp / "spiffe.jwks")
    ids.partner.write_jwks(tmp / "partner.jwks")
    ids.idp.write_jwks(tmp / "idp.jwks")
    ids.k8s.write_jwks(tmp / "k8s-a.jwks")
    ids.k8s_b.write_jwks(tmp / "k8s-b.jwks")
    TokenSealer.generate_key_file(tmp / "store.key")
    generate_signing_key_file(tmp / "audit-signing.key")
    replace(site_config(addr=bao.addr, audit_log=bao.audit_log), revoke_confirm_timeout=2, vault_timeout=2,
            maintenance=FAST_MAINTENANCE).write(tmp / "broker.toml")
    settings = load_settings({}, tmp / "broker.toml")
    with VaultAdmin(bao.addr, token=bao.root_token) as admin:
        await asyncio.to_thread(sync, admin, Catalog.from_settings(settings), audit_device=audit_device_of(settings))
        await asyncio.to_thread(write_broker_token, admin, tmp / "vault-token")
    return await aiohttp_client(make_app(settings))


async def _wait_for(check: Callable[[], Any], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.2)
    return False


@pytest.mark.slow
class TestVaultOutage:
    @pytest.mark.timeout(180)
    async def test_revocation_survives_an_outage(self, tmp_path: Path, persistent_openbao: PersistentOpenBao,
                                                 persistent_bao_with_engines: BaoEngines, identities: Identities,
                                                 aiohttp_client: Callable[..., Any]) -> None:
        """Ending a task while OpenBao is down: 503 + revoke_pending, nothing issued; after restart, revoked by itself."""
        bao, pg = persistent_openbao, persistent_bao_with_engines.pg
        client = await _broker(tmp_path, bao, identities, aiohttp_client)
        user, agent = bearer(identities.user()), bearer(identities.agent())

        async def start() -> str:
            resp = await client.post("/v1/tasks", json={"agent": AGENT, "role": "support-triage", "ttl": "10m",
                                                        "reason": "outage drill"}, headers=user)
            assert resp.status == 201, await resp.text()
            return str((await resp.json())["id"])

        task, spare = await start(), await start()
        resp = await client.post(f"/v1/tasks/{task}/credentials", json={"grant": "tickets-db-ro"}, headers=agent)
        assert resp.status == 200
        cred = await resp.json()
        lease = await client.app[STORE].get_lease(cred["lease_id"])
        assert lease is not None

        bao.stop()
        try:
            resp = await client.post(f"/v1/tasks/{task}/end", headers=agent)
            assert resp.status == 503 and int(resp.headers["Retry-After"]) > 0
            view = await (await client.get(f"/v1/tasks/{task}", headers=user)).json()
            assert view["state"] == "ended" and [x["state"] for x in view["leases"]] == ["revoke_pending"]

            resp = await client.post(f"/v1/tasks/{spare}/credentials", json={"grant": "agent-cert"}, headers=agent)
            assert resp.status == 503 and "Retry-After" in resp.headers
            assert (await client.get("/v1/health")).status == 503
            await asyncio.sleep(1.5)  # a few maintenance ticks fail against the dead Vault
            assert (await client.app[STORE].get_lease(cred["lease_id"])).state == "revoke_pending"  # type: ignore[union-attr]
            assert len(await client.app[STORE].list_leases(task_id=spare)) == 0
        finally:
            bao.start()

        async def revoked() -> bool:
            row = await client.app[STORE].get_lease(cred["lease_id"])
            return row is not None and row.state == "revoked"

        assert await _wait_for(revoked, timeout=60), "the broker did not finish the revocation by itself"
        async with aiohttp.ClientSession() as session:
            admin = VaultClient(session, bao.addr, token=bao.root_token)
            assert await admin.lookup_lease(lease.vault_lease_id) is None
        with pytest.raises(psycopg.OperationalError):
            await psycopg.AsyncConnection.connect(host=pg.host, port=pg.port, dbname="postgres",
                                                  user=cred["data"]["username"], password=cred["data"]["password"],
                                                  connect_timeout=5)
        records = await client.app[STORE].query_audit(task=task)
        assert [r.record.event for r in records][-1] == "lease.revoked"
        resp = await client.post(f"/v1/tasks/{spare}/credentials", json={"grant": "agent-cert"}, headers=agent)
        assert resp.status == 200  # and the service is back
