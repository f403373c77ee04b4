"""The OCSF feed a real broker exports conforms to the released OCSF schema it names, record for record.

A broker with an OCSF file sink lives through a session that writes every kind of record it has (a
task started, credentials issued and renewed, a denial, an approval requested, approved and denied, a
Vault request by the task's token and one by a stranger, the task's end, an operator's revocation by
agent and its lift); the exported file is then checked, line by line, against the vendored JSON Schema
of OCSF 1.8.0 API Activity (tests/unit/test_ocsf.py says where it comes from). The caller's address is
the test client's socket peer, 127.0.0.1: the oracle for ``src_endpoint``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from broker.api import STORE
from broker.app import make_app
from broker.audit.ocsf import OCSF_VERSION
from broker.vault import VaultClient
from tests.api.test_export import drain, with_audit
from tests.api.test_task_flow import Client, credential, start_task
from tests.api.test_vault_merge import tailer_started
from tests.conftest import TD, USER_ID, BrokerSite, bearer
from tests.unit.test_ocsf import ocsf_errors

LEAD = ("lena@example.com", ("secops-leads",))
OPERATOR = ("olga@example.com", ("secops",))
OTHER = f"spiffe://{TD}/agent/support-2"
# Every kind of record this session makes the broker write.
KINDS = {"task.started", "lease.issued", "lease.renewed", "access.denied", "approval.requested",
         "approval.approved", "approval.denied", "vault.request", "vault.unexplained", "task.ended",
         "lease.revoked", "revocation.created", "task.revoked", "lock.lifted"}


async def vote(client: Client, site: BrokerSite, approval: str, decision: str) -> None:
    resp = await client.post(f"/v1/approvals/{approval}", json={"decision": decision, "reason": "change 42"},
                             headers=bearer(site.ids.user(*LEAD, auth_time=time.time() - 5)))
    assert resp.status == 200, await resp.text()


async def session(client: Client, site: BrokerSite, admin: VaultClient) -> None:
    task = (await start_task(client, site))["id"]
    db = await credential(client, site, task, "tickets-db-ro")
    resp = await client.post(f"/v1/leases/{db['lease_id']}/renew", json={}, headers=bearer(site.ids.agent()))
    assert resp.status == 200, await resp.text()
    await credential(client, site, task, "tickets-db-rw", status=403)
    approved = (await credential(client, site, task, "prod-write", status=202))["approval_id"]
    await vote(client, site, approved, "approve")
    resp = await client.post(f"/v1/tasks/{task}/credentials", json={"grant": "prod-write", "approval_id": approved},
                             headers=bearer(site.ids.agent()))
    assert resp.status == 200, await resp.text()
    refused = (await credential(client, site, task, "prod-write", status=202))["approval_id"]
    await vote(client, site, refused, "deny")
    child = await credential(client, site, task, "child-token")
    async with aiohttp.ClientSession() as http:
        await VaultClient(http, site.engines.bao.addr, token=child["data"]["token"]).lookup_self()
    await admin.read_credential("database/creds/tickets-ro", token=site.engines.bao.root_token, method="GET")
    resp = await client.post(f"/v1/tasks/{task}/end", headers=bearer(site.ids.agent()))
    assert resp.status in (200, 202), await resp.text()

    other = (await start_task(client, site, agent=OTHER, user="bob@example.com"))["id"]
    await credential(client, site, other, "agent-cert", agent=OTHER)
    resp = await client.post("/v1/revocations", json={"agent": OTHER, "reason": "incident 7", "wait": 30},
                             headers=bearer(site.ids.user(*OPERATOR)))
    assert resp.status == 200, await resp.text()
    resp = await client.delete(f"/v1/revocations/{(await resp.json())['id']}", json={"reason": "cleared"},
                               headers=bearer(site.ids.user(*OPERATOR)))
    assert resp.status == 200, await resp.text()


async def until_merged(client: Client) -> None:
    """Wait (bounded) until the tailer merged a vault.request and a vault.unexplained record."""
    store = client.app[STORE]
    for _ in range(150):
        events = {r.record.event for r in await store.query_audit(limit=10_000)}
        if {"vault.request", "vault.unexplained"} <= events:
            return
        await asyncio.sleep(0.1)


class TestExportedFeed:
    async def test_every_exported_event_validates_against_the_release(
        self, site: BrokerSite, tmp_path: Path, aiohttp_client: Callable[..., Any], admin: VaultClient,
    ) -> None:
        """Every line of the OCSF export validates against OCSF 1.8.0 API Activity (no error at all), names
        1.8.0 in metadata.version, and every kind of record is among them; records a request caused name the
        caller (127.0.0.1) in src_endpoint, Vault's records the address Vault logged."""
        out = tmp_path / "audit.ocsf.jsonl"
        client: Client = await aiohttp_client(make_app(with_audit(site.settings, export_file=out,
                                                                  export_format="ocsf")))
        await tailer_started(client)
        await session(client, site, admin)
        await until_merged(client)
        assert await drain(client) == 0

        events = [json.loads(line) for line in out.read_bytes().splitlines()]
        kinds = Counter(e["metadata"]["event_code"] for e in events)
        assert set(kinds) >= KINDS, sorted(KINDS - set(kinds))
        failures = {(e["metadata"]["event_code"], err) for e in events for err in ocsf_errors(e)}
        assert failures == set()
        assert {e["metadata"]["version"] for e in events} == {OCSF_VERSION} == {"1.8.0"}
        started = next(e for e in events if e["metadata"]["event_code"] == "task.started")
        assert started["src_endpoint"] == {"ip": "127.0.0.1"}
        assert started["actor"]["user"]["uid"] == USER_ID
        assert all(e["src_endpoint"].get("ip") == "127.0.0.1" for e in events
                   if e["metadata"]["event_code"] in KINDS - {"vault.request", "vault.unexplained"})
        vault = [e for e in events if e["metadata"]["event_code"].startswith("vault.")]
        assert vault and all("ip" in e["src_endpoint"] for e in vault)
        print(f"ocsf_events={len(events)} kinds={len(kinds)} "
              + " ".join(f"{k}={n}" for k, n in sorted(kinds.items())))
