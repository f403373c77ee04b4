"""Audit export sinks (broker.audit.export) on the real broker: a file, a webhook on loopback, the bounded backlog.

Oracles: the store's chain itself (every sequence number exactly once, in order, with its hash) and what
the local webhook server received; Vault truth for the revocation that must keep working.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient

from broker.api import STORE
from broker.app import make_app
from broker.audit import GENESIS, canonical_bytes, chain_hash
from broker.audit.export import EXPORTER, FileSink
from broker.config import Settings
from broker.store import Store
from broker.vault import VaultClient
from tests.api.test_task_flow import credential, end, start_task
from tests.conftest import BrokerSite, bearer

Client = TestClient[Any, Any]
OPERATOR = "olivia@example.com"
LEAD = ("lena@example.com", ("secops-leads",))
LIMIT = 3


def with_audit(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update={"audit": settings.audit.model_copy(update=changes)})


async def drain(client: Client, *, rounds: int = 50) -> int:
    """Run export rounds until the backlog is 0 (bounded); the backlog left."""
    exporter = client.app[EXPORTER]
    for _ in range(rounds):
        await exporter.step()
        if exporter.backlog == 0:
            break
    return exporter.backlog


async def whole_chain(store: Store) -> list[Any]:
    links: list[Any] = []
    after = 0
    for _ in range(1000):
        page = await store.iter_chain(after_seq=after, limit=1000)
        if not page:
            break
        links += page
        after = page[-1].seq
    return links


@dataclass
class Receiver:
    """A webhook on 127.0.0.1 that records each batch; ``stop``/``start`` keep its port."""

    batches: list[list[dict[str, Any]]] = field(default_factory=list)
    ranges: list[str] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    async def _ingest(self, request: web.Request) -> web.Response:
        body = await request.json()
        assert isinstance(body, list)
        self.batches.append(body)
        self.ranges.append(request.headers.get("X-Broker-Export-Range", ""))
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/ingest", self._ingest)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ingest"

    def seqs(self) -> list[int]:
        return [int(e["metadata"]["uid"]) for batch in self.batches for e in batch]


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


class TestFileSink:
    async def test_every_record_exactly_once_in_order(self, site: BrokerSite, tmp_path: Path,
                                                      aiohttp_client: Callable[..., Any]) -> None:
        """After a task flow (three credentials, a denial, a renewal, an end), the file holds every chain
        record once, in sequence order, each line the canonical record with its chain hashes."""
        out = tmp_path / "export" / "audit.jsonl"
        client: Client = await aiohttp_client(make_app(with_audit(site.settings, export_file=out)))
        task = await start_task(client, site)
        db = await credential(client, site, task["id"], "tickets-db-ro")
        await credential(client, site, task["id"], "agent-cert")
        await credential(client, site, task["id"], "child-token")
        await credential(client, site, task["id"], "tickets-db-rw", status=403)
        resp = await client.post(f"/v1/leases/{db['lease_id']}/renew", json={}, headers=bearer(site.ids.agent()))
        assert resp.status == 200
        await end(client, site, task["id"])
        assert await drain(client) == 0

        links = await whole_chain(client.app[STORE])
        lines = [json.loads(x) for x in out.read_bytes().splitlines()]
        assert [x["seq"] for x in lines] == [link.seq for link in links] == list(range(1, len(links) + 1))
        prev = GENESIS
        for line, link in zip(lines, links, strict=True):
            body = {k: v for k, v in line.items() if k not in ("hash", "prev_hash")}
            assert json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() == \
                canonical_bytes(link.record, link.seq)
            digest = chain_hash(prev, canonical_bytes(link.record, link.seq))
            assert (line["prev_hash"], line["hash"]) == (prev.hex(), digest.hex())
            prev = digest
        events = {x["event"] for x in lines}
        assert {"task.started", "lease.issued", "access.denied", "lease.renewed", "task.ended"} <= events
        print(f"exported_records={len(lines)} file_bytes={out.stat().st_size}")

    async def test_crash_after_write_repeats_nothing(self, site: BrokerSite, tmp_path: Path,
                                                     aiohttp_client: Callable[..., Any]) -> None:
        """A crash after the file took a batch but before the cursor moved (and with a torn last line) loses
        and repeats nothing: the exporter resumes from the file's own last record."""
        out = tmp_path / "audit.jsonl"
        client: Client = await aiohttp_client(make_app(with_audit(site.settings, export_file=out)))
        task = await start_task(client, site)
        await credential(client, site, task["id"], "agent-cert")
        assert await drain(client) == 0
        store = client.app[STORE]
        head = (await store.export_positions())["file"]
        # The cursor as if the last batch's move was lost, and half a line as if the crash hit a write.
        assert await store.advance_export("file", expected=head, seq=head - 2, now=0.0)
        with out.open("ab") as f:
            f.write(b'{"seq":')
        await end(client, site, task["id"])
        exporter = client.app[EXPORTER]
        fresh = type(exporter)(store=store, sinks=[FileSink(out, "jsonl")], backlog_limit=10, clock=lambda: 0.0)
        for _ in range(20):
            await fresh.step()
            if fresh.backlog == 0:
                break
        seqs = [json.loads(x)["seq"] for x in out.read_bytes().splitlines()]
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) == (await store.chain_head())[0]


class TestWebhookAndBacklog:
    async def test_backlog_bound_fails_issuance_closed_and_revocation_goes_on(
        self, site: BrokerSite, receiver: Receiver, aiohttp_client: Callable[..., Any], admin: VaultClient,
    ) -> None:
        """Batches reach the webhook; with the webhook down the backlog grows to its bound, then credential
        requests and approval votes answer 503 audit_backlog with Retry-After while an operator's revocation
        still revokes in Vault; with the webhook back the backlog drains and issuance resumes. Every record
        arrives once, in order."""
        settings = with_audit(site.settings, export_url=receiver.url, export_format="ocsf",
                              export_backlog_limit=LIMIT)
        client: Client = await aiohttp_client(make_app(settings))
        exporter = client.app[EXPORTER]
        task = await start_task(client, site)
        first = await credential(client, site, task["id"], "agent-cert")
        pending = await credential(client, site, task["id"], "prod-write", status=202)
        assert await drain(client) == 0
        assert receiver.batches and receiver.seqs() == list(range(1, len(receiver.seqs()) + 1))
        assert all(e["class_uid"] == 6003 for batch in receiver.batches for e in batch)

        await receiver.stop()
        refused: dict[str, Any] | None = None
        issued_while_down = 0
        for _ in range(20):
            resp = await client.post(f"/v1/tasks/{task['id']}/credentials", json={"grant": "agent-cert"},
                                     headers=bearer(site.ids.agent()))
            if resp.status == 503:
                refused = {"body": await resp.json(), "retry": resp.headers.get("Retry-After")}
                break
            assert resp.status == 200, await resp.text()
            issued_while_down += 1
            await exporter.step()
        assert refused is not None, "issuance never failed closed"
        assert refused["body"]["code"] == "audit_backlog" and refused["retry"] == "5"
        assert exporter.backlog > LIMIT and "webhook" in exporter.failing
        assert issued_while_down >= 1
        # Approval votes fail closed too.
        resp = await client.post(f"/v1/approvals/{pending['approval_id']}",
                                 json={"decision": "approve", "reason": "change 1"},
                                 headers=bearer(site.ids.user(*LEAD, auth_time=time.time() - 5)))
        assert resp.status == 503 and (await resp.json())["code"] == "audit_backlog"

        # Revocation is not gated: the operator revokes the task, and Vault confirms.
        vault_id = (await client.app[STORE].get_lease(first["lease_id"]))
        assert vault_id is not None
        resp = await client.post("/v1/revocations", json={"task": task["id"], "reason": "incident", "wait": 20},
                                 headers=bearer(site.ids.user(OPERATOR, ("secops",))))
        assert resp.status in (200, 201, 202), await resp.text()
        lease = await client.app[STORE].get_lease(first["lease_id"])
        assert lease is not None and lease.state in ("revoked", "expired", "revoke_pending")
        for _ in range(100):
            lease = await client.app[STORE].get_lease(first["lease_id"])
            if lease is not None and lease.state in ("revoked", "expired"):
                break
            await asyncio.sleep(0.1)
        assert lease is not None and lease.state == "revoked"
        assert await admin.lookup_lease(vault_id.vault_lease_id) is None
        # Still closed for a new task's credential while the sink is down.
        other = await start_task(client, site)
        resp = await client.post(f"/v1/tasks/{other['id']}/credentials", json={"grant": "agent-cert"},
                                 headers=bearer(site.ids.agent()))
        assert resp.status == 503

        await receiver.start()
        assert await drain(client) == 0
        assert exporter.failing == set()
        await credential(client, site, other["id"], "agent-cert")
        # The Vault audit tailer appends its records after the answer: follow the head until it stops moving.
        head = 0
        for _ in range(50):
            assert await drain(client) == 0
            head = (await client.app[STORE].chain_head())[0]
            if receiver.seqs()[-1:] == [head]:
                break
            await asyncio.sleep(0.1)
        assert receiver.seqs() == list(range(1, head + 1))
        first_seqs = [int(r.split("-")[0]) for r in receiver.ranges]
        assert first_seqs == sorted(first_seqs)
        print(f"batches={len(receiver.batches)} records={head} issued_while_down={issued_while_down} "
              f"backlog_at_refusal>{LIMIT}")
