"""TH-21 / done-when 4 of issue 4: 0 planted canary secrets in any sink after a full broker session.

The canaries are the secrets Vault issues through the broker (a PostgreSQL password for a read-only and
for an approved read-write grant, a PKI private key, a child token), the task tokens (unsealed from the
store by the test), the broker's own Vault token, the bearer tokens of agent and people, and a KV v2
value planted with root and read through Vault by a token carrying the task's metadata, so that it passes
Vault's audit device (as an HMAC) and the broker's tailer.

The session: two tasks, four credentials, a renewal, a denial, an approval (request, vote, use), Vault
requests with the child token, the KV read, an operator's revocation, an end. The sinks: broker logs
(DEBUG), every HTTP response body except the credential responses themselves, the SQLite store files,
the audit rows, the OCSF mapping and the replay timeline of them, the export file and the webhook bodies,
and the window of Vault's audit file the tailer merged. Every canary is searched in every sink; the
broker's own sinks are also searched for anything token-shaped (``hvs.``/``s.`` tokens, JWTs, PEM keys).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from broker.api import STORE, VAULT_TAILER
from broker.app import make_app
from broker.audit.chain import _SECRET_SHAPES
from broker.audit.export import EXPORTER
from broker.audit.replay import ReplayRecord, render_ocsf, render_table
from broker.sealing import TokenSealer
from broker.vault import VaultClient
from broker.vault.admin import VaultAdmin
from tests.api.test_export import Receiver, drain, with_audit
from tests.conftest import AGENT, USER, BrokerSite, bearer

Client = TestClient[Any, Any]
LEAD = ("lena@example.com", ("secops-leads",))
OPERATOR = ("olivia@example.com", ("secops",))
AUDITOR = ("audrey@example.com", ("audit",))
WAIT = 15.0


class Session:
    """The broker over HTTP, remembering every response body but the credentials themselves."""

    def __init__(self, client: Client, site: BrokerSite) -> None:
        self.client = client
        self.site = site
        self.bodies: list[str] = []
        self.withheld: list[str] = []  # the credential responses: the positive control of the search
        self.bearers: set[str] = set()

    async def call(self, method: str, path: str, *, token: str, body: dict[str, Any] | None = None,
                   expect: int | tuple[int, ...] = 200, credential: bool = False) -> dict[str, Any]:
        self.bearers.add(token)
        resp = await self.client.request(method, path, json=body, headers=bearer(token))
        text = await resp.text()
        ok = (expect,) if isinstance(expect, int) else expect
        assert resp.status in ok, (path, resp.status, text)
        (self.withheld if credential and resp.status == 200 else self.bodies).append(text)
        data = await resp.json(content_type=None) if text else {}
        return data if isinstance(data, dict) else {"items": data}

    def agent(self) -> str:
        return self.site.ids.agent()

    def user(self, who: tuple[str, tuple[str, ...]] = (USER, ("support",))) -> str:
        return self.site.ids.user(who[0], who[1], auth_time=time.time() - 5)

    async def start(self) -> str:
        t = await self.call("POST", "/v1/tasks", token=self.user(), expect=201,
                            body={"agent": AGENT, "role": "support-triage", "ttl": "10m", "reason": "ticket 77"})
        return str(t["id"])

    async def credential(self, task: str, grant: str, **kw: Any) -> dict[str, Any]:
        expect = kw.pop("expect", 200)
        return await self.call("POST", f"/v1/tasks/{task}/credentials", token=self.agent(), expect=expect,
                               body={"grant": grant, **kw}, credential=True)


async def plant_kv(admin: VaultAdmin, bao_addr: str, task: str) -> tuple[str, str]:
    """A KV v2 secret holding a canary, read through Vault by a token with the task's metadata.

    Returns (canary, Vault's request id of the read).
    """
    mount = "canary-" + secrets.token_hex(4)
    canary = "kvcanary-" + secrets.token_urlsafe(24)
    await asyncio.to_thread(admin.enable_secrets_engine, mount, "kv", options={"version": "2"})
    await asyncio.to_thread(admin.write, f"{mount}/data/app", {"data": {"api_key": canary}})
    await asyncio.to_thread(admin.put_policy, f"{mount}-read", f'path "{mount}/data/app" {{ capabilities = ["read"] }}')
    reader = await asyncio.to_thread(admin.create_token, policies=[f"{mount}-read"], ttl="5m",
                                     display_name="canary-reader",
                                     meta={"task": task, "user": USER, "agent": AGENT, "tenant": "acme"})
    async with aiohttp.ClientSession() as http, http.get(
            f"{bao_addr}/v1/{mount}/data/app", headers={"X-Vault-Token": reader.client_token.reveal()}) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["data"]["data"]["api_key"] == canary
    await asyncio.to_thread(admin.write, "auth/token/revoke-accessor", {"accessor": reader.accessor})
    return canary, str(body["request_id"])


def store_text(site_url: str) -> str:
    path = Path(site_url.removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*"))).decode("latin-1")


class TestCanaries:
    async def test_no_canary_in_any_sink(self, site: BrokerSite, tmp_path: Path, hvac_admin: VaultAdmin,
                                         caplog: pytest.LogCaptureFixture,
                                         aiohttp_client: Callable[..., Any]) -> None:
        """Zero hits for every canary in every sink, and nothing token-shaped in the broker's own sinks."""
        caplog.set_level(logging.DEBUG)
        bao = site.engines.bao
        receiver = Receiver()
        await receiver.start()
        export_file = tmp_path / "audit-export.jsonl"
        settings = with_audit(site.settings, export_file=export_file, export_url=receiver.url)
        client: Client = await aiohttp_client(make_app(settings))
        s = Session(client, site)
        tailer = client.app[VAULT_TAILER]
        for _ in range(int(WAIT / 0.05)):
            if tailer.position is not None:
                break
            await asyncio.sleep(0.05)
        assert tailer.position is not None
        vault_start = tailer.position.offset

        try:
            task = await s.start()
            db = await s.credential(task, "tickets-db-ro")
            cert = await s.credential(task, "agent-cert")
            child = await s.credential(task, "child-token")
            await s.credential(task, "tickets-db-rw", expect=403)
            await s.call("POST", f"/v1/leases/{db['lease_id']}/renew", token=s.agent(), body={})
            pending = await s.credential(task, "prod-write", expect=202)
            await s.call("POST", f"/v1/approvals/{pending['approval_id']}", token=s.user(LEAD),
                         body={"decision": "approve", "reason": "change 77"})
            rw = await s.credential(task, "prod-write", approval_id=pending["approval_id"])
            async with aiohttp.ClientSession() as http:
                agent_vault = VaultClient(http, bao.addr, token=child["data"]["token"])
                await agent_vault.lookup_self()
                await agent_vault.lookup_self()
            kv_canary, kv_request = await plant_kv(hvac_admin, bao.addr, task)
            row = await client.app[STORE].get_task(task)
            assert row is not None
            sealer = TokenSealer.from_file(site.root / "store.key")
            task_token = sealer.open(row.sealed_token, task_id=row.id).reveal()

            second = await s.start()
            second_cert = await s.credential(second, "agent-cert")
            row2 = await client.app[STORE].get_task(second)
            assert row2 is not None
            task_token2 = sealer.open(row2.sealed_token, task_id=row2.id).reveal()
            await s.call("POST", "/v1/revocations", token=s.user(OPERATOR), expect=(200, 201, 202),
                         body={"task": second, "reason": "incident 77", "wait": 20})
            await s.call("POST", f"/v1/tasks/{task}/end", token=s.agent(), body={})

            # Wait for the tailer to merge the KV read, then let the exporter catch up.
            store = client.app[STORE]
            for _ in range(int(WAIT / 0.1)):
                if any(r.record.vault_request_id == kv_request for r in await store.query_audit(limit=10_000)):
                    break
                await asyncio.sleep(0.1)
            assert await drain(client) == 0

            auditor = s.user(AUDITOR)
            after = 0
            for _ in range(100):
                page = await s.call("GET", f"/v1/audit?after={after}&limit=1000", token=auditor)
                if page["next_after"] is None:
                    break
                after = page["next_after"]
            await s.call("GET", "/v1/audit/verify", token=auditor)
            await s.call("GET", f"/v1/tasks/{task}", token=auditor)
            await s.call("GET", "/v1/leases", token=s.user(OPERATOR))
            await s.call("GET", "/v1/revocations", token=s.user(OPERATOR))
            await s.call("GET", "/v1/approvals", token=auditor)
            s.bodies.append(await (await client.get("/metrics")).text())
            s.bodies.append(await (await client.get("/v1/health")).text())
        finally:
            await receiver.stop()

        rows = await client.app[STORE].query_audit(limit=100_000)
        assert any(r.record.vault_request_id == kv_request for r in rows), "the KV read was not merged"
        replayed = [ReplayRecord(r.seq, r.record) for r in rows]
        canaries = {
            "database password (ro)": db["data"]["password"],
            "database password (rw, approved)": rw["data"]["password"],
            "certificate private key": cert["data"]["private_key"].splitlines()[1],
            "second certificate private key": second_cert["data"]["private_key"].splitlines()[1],
            "child token": child["data"]["token"],
            "task token": task_token,
            "revoked task's token": task_token2,
            "KV v2 value": kv_canary,
            "broker Vault token": (site.root / "vault-token").read_text().strip(),
            "root token": bao.root_token.reveal(),
        }
        canaries.update({f"bearer token {i}": t for i, t in enumerate(sorted(s.bearers))})
        with bao.audit_log.open("rb") as f:
            f.seek(vault_start)
            vault_window = f.read().decode("utf-8", "replace")
        broker_sinks = {
            "logs": caplog.text,
            "http bodies": "\n".join(s.bodies),
            "audit rows": "\n".join(repr(r.record) for r in rows),
            "ocsf": render_ocsf(replayed),
            "replay table": render_table(replayed),
            "export file": export_file.read_text(),
            "webhook bodies": "\n".join(repr(b) for b in receiver.batches),
        }
        sinks = {**broker_sinks, "store files": store_text(settings.store.url), "vault audit window": vault_window}
        assert all(len(v) > 0 for v in sinks.values()), [k for k, v in sinks.items() if not v]
        assert kv_request in vault_window
        hits = [(what, where) for what, value in canaries.items() for where, text in sinks.items() if value in text]
        shaped = [(where, m.group(0)[:12]) for where, text in broker_sinks.items()
                  for m in _SECRET_SHAPES.finditer(text)]
        print(f"canaries={len(canaries)} sinks={len(sinks)} hits={len(hits)} token_shaped={len(shaped)} "
              f"records={len(rows)} http_bodies={len(s.bodies)} vault_window_bytes={len(vault_window)}")
        assert hits == []
        assert shaped == []
        # The probes are real: each canary is a real secret of its kind, and the search finds the issued ones
        # where they legitimately are (the credential responses, withheld from the sinks above).
        issued = [k for k in canaries if k.startswith(("database", "certificate", "second", "child"))]
        assert all(canaries[k] in "\n".join(s.withheld) for k in issued)
        assert task_token.startswith("s.") and child["data"]["token"].startswith("s.")
        assert len(receiver.batches) >= 1 and EXPORTER in client.app
