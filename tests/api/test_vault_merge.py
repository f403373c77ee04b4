"""Vault's own audit record merged into the broker's chain, end to end, against the session OpenBao.

The session OpenBao's file audit device is shared with every other test; the broker's tailer starts at
the file's end when the app starts, so a test only sees the entries of its own window.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from broker.api import METRICS, STORE, VAULT_TAILER
from broker.store import AuditRow
from broker.vault import VaultClient
from broker.vault.admin import VaultAdmin
from tests.api.test_task_flow import Client, credential, end, start_task
from tests.conftest import AGENT, USER, USER_ID, BrokerSite

WAIT = 15.0


async def tailer_started(client: Client) -> int:
    """The offset the tailer started at (it persists its first position in the background at start-up)."""
    tailer = client.app[VAULT_TAILER]
    for _ in range(int(WAIT / 0.05)):
        if tailer.position is not None:
            return tailer.position.offset
        await asyncio.sleep(0.05)
    raise AssertionError("the tailer did not start")


def window(path: Path, start: int) -> list[dict[str, Any]]:
    """Vault's entries from ``start`` to the last complete line (the oracle: the file itself)."""
    with path.open("rb") as f:
        f.seek(start)
        data = f.read()
    return [json.loads(x) for x in data[:data.rfind(b"\n") + 1].splitlines() if x.strip()]


async def merged_until(client: Client, request_ids: set[str]) -> list[AuditRow]:
    """Poll the chain until every one of ``request_ids`` is in it (bounded), then return the whole chain."""
    store = client.app[STORE]
    for _ in range(int(WAIT / 0.1)):
        rows = await store.query_audit(limit=10_000)
        if request_ids <= {r.record.vault_request_id for r in rows}:
            return rows
        await asyncio.sleep(0.1)
    return await store.query_audit(limit=10_000)


class TestVaultMerge:
    async def test_scripted_session_and_a_stranger(self, client: Client, site: BrokerSite,
                                                   admin: VaultClient, hvac_admin: VaultAdmin) -> None:
        """Task start, three credentials, requests with the agent's Vault token, end: every Vault request by
        the task's tokens is one vault.request with user, agent, task, tenant, resource, action, outcome;
        a request by the root token and one by a token the test forged are vault.unexplained."""
        bao = site.engines.bao
        start = await tailer_started(client)
        task = await start_task(client, site)
        creds = {g: await credential(client, site, task["id"], g) for g in ("tickets-db-ro", "agent-cert", "child-token")}
        child_token = creds["child-token"]["data"]["token"]
        async with aiohttp.ClientSession() as session:
            agent_vault = VaultClient(session, bao.addr, token=child_token)
            for _ in range(3):
                await agent_vault.lookup_self()
            await end(client, site, task["id"])
            # Outside the broker: root on a grant path, and a token that claims a task the broker never started.
            await admin.read_credential("database/creds/tickets-ro", token=bao.root_token, method="GET")
            forged = await asyncio.to_thread(hvac_admin.create_token, policies=["default"], ttl="2m",
                                             display_name="forged",
                                             meta={"task": "tsk_forged", "user": USER, "agent": AGENT})
            await VaultClient(session, bao.addr, token=forged.client_token).lookup_self()

        # The oracle: Vault's own file. The child token has no metadata: find its entries by its accessor (the
        # lease's Vault id), as the device writes it: in plain text here (hmac_accessor = false), else HMAC'd.
        lease = await client.app[STORE].get_lease(creds["child-token"]["lease_id"])
        assert lease is not None and lease.kind == "token"
        child = {lease.vault_lease_id, await admin.audit_hash(bao.audit_device, lease.vault_lease_id)}
        entries = [e for e in window(bao.audit_log, start) if e["type"] == "response"]
        by_task = [e for e in entries if (e.get("auth") or {}).get("metadata", {}).get("task") == task["id"]
                   or (e.get("auth") or {}).get("accessor") in child]
        by_child = [e for e in by_task if e["auth"]["accessor"] in child]
        stranger = [e for e in entries if e["request"]["path"] == "database/creds/tickets-ro"
                    and not (e.get("auth") or {}).get("metadata")]
        forged_entries = [e for e in entries if (e.get("auth") or {}).get("metadata", {}).get("task") == "tsk_forged"]
        assert len(by_child) == 3 and len(stranger) == 1 and len(forged_entries) == 1
        # Issuance of three credentials: 3 issuance tokens created + 3 reads by them, at least.
        assert len(by_task) >= 9

        expected = {e["request"]["id"] for e in by_task + stranger + forged_entries}
        rows = await merged_until(client, expected)
        counts = Counter(r.record.vault_request_id for r in rows if r.record.vault_request_id
                         and r.record.event.startswith("vault."))
        assert all(n == 1 for n in counts.values()), [k for k, n in counts.items() if n > 1]
        records = {r.record.vault_request_id: r.record for r in rows if r.record.event.startswith("vault.")}
        for e in by_task:
            rec = records[e["request"]["id"]]
            assert rec.event == "vault.request", (e["request"]["path"], rec.reason)
            assert (rec.user, rec.agent, rec.task, rec.tenant) == (USER_ID, AGENT, task["id"], "acme")
            assert (rec.resource, rec.action) == (e["request"]["path"], e["request"]["operation"])
            assert rec.outcome == ("failure" if e.get("error") else "success")
            # Where Vault saw the request come from: OCSF's src_endpoint (broker.audit.ocsf).
            assert rec.caller_address == e["request"]["remote_address"] and rec.caller_address
        for e in by_child:
            assert records[e["request"]["id"]].lease == creds["child-token"]["lease_id"]
        paths = {records[e["request"]["id"]].resource for e in by_task}
        assert {"database/creds/tickets-ro", "pki/issue/agents", "auth/token/create/agent-child",
                "auth/token/lookup-self"} <= paths
        for e in stranger + forged_entries:
            rec = records[e["request"]["id"]]
            assert rec.event == "vault.unexplained" and rec.user is None
        assert records[forged_entries[0]["request"]["id"]].task == "tsk_forged"

        print(f"window_responses={len(entries)} task_requests={len(by_task)} child_requests={len(by_child)} "
              f"unexplained={sum(r.event == 'vault.unexplained' for r in records.values())}")
        metrics = await (await client.get("/metrics")).text()
        assert "# TYPE broker_vault_audit_unexplained_total counter" in metrics
        assert client.app[METRICS].get("broker_vault_audit_unexplained_total") >= 2
        assert client.app[METRICS].get("broker_vault_audit_requests_total") >= len(by_task)
