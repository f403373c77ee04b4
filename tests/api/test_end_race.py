"""Task end racing credential requests (threat TH-26): once the end commits, nothing new lives or is handed out.

Each round starts a task, then fires one ``end`` and ``K`` credential requests at once, each after a small
random delay. Oracles: the store (lease states, and the audit sequence, which is the commit order) and
Vault itself (root lookups of every delivered credential's lease or token accessor).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp.test_utils import TestClient

from broker.api import STORE
from broker.store import LeaseRow, Store
from broker.vault import VaultClient
from tests.conftest import TD, BrokerSite, bearer

Client = TestClient[Any, Any]

ROUNDS = 30
REQUESTS = 20
MAX_DELAY = 0.04
GRANTS = ("agent-cert", "child-token", "tickets-db-ro")
# A different agent and user every few rounds keeps each under the rate limits (burst 100 per agent).
AGENTS = tuple(f"spiffe://{TD}/agent/support-{i}" for i in range(1, 11))
USERS = tuple(f"racer{i}@example.com" for i in range(1, 4))


@dataclass(frozen=True)
class Answer:
    status: int
    received: float
    lease_id: str | None


@dataclass
class Figures:
    rounds: int = 0
    requests: int = 0
    delivered: int = 0
    refused_after_end: int = 0
    delivered_after_end_answer: int = 0
    live_after_end: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)


async def _request(client: Client, task_id: str, grant: str, token: str, delay: float) -> Answer:
    await asyncio.sleep(delay)
    resp = await client.post(f"/v1/tasks/{task_id}/credentials", json={"grant": grant}, headers=bearer(token))
    body = await resp.json()
    received = time.time()
    return Answer(resp.status, received, str(body["lease_id"]) if resp.status == 200 else None)


async def _end(client: Client, task_id: str, token: str, delay: float) -> Answer:
    await asyncio.sleep(delay)
    resp = await client.post(f"/v1/tasks/{task_id}/end", headers=bearer(token))
    await resp.read()
    return Answer(resp.status, time.time(), None)


async def _alive(admin: VaultClient, lease: LeaseRow) -> bool:
    if lease.kind == "token":
        return await admin.lookup_accessor(lease.vault_lease_id) is not None
    return await admin.lookup_lease(lease.vault_lease_id) is not None


async def _seq_of(store: Store, task_id: str) -> dict[tuple[str, str | None], int]:
    """Audit sequence numbers of the task's records, by (event, lease): the store's commit order."""
    return {(r.record.event, r.record.lease): r.seq for r in await store.query_audit(task=task_id, limit=1000)}


class TestEndRace:
    async def test_no_live_lease_and_no_delivery_after_the_end_commits(
        self, client: Client, site: BrokerSite, admin: VaultClient
    ) -> None:
        """gather(end, issue x K) with random delays: after the end, 0 live leases in Vault, 0 leases committed after it."""
        rng = random.Random(int(time.time()))
        store = client.app[STORE]
        f = Figures()
        for n in range(ROUNDS):
            agent, user = AGENTS[n % len(AGENTS)], USERS[n % len(USERS)]
            agent_token = site.ids.agent(agent)
            resp = await client.post("/v1/tasks", json={"agent": agent, "role": "support-triage", "ttl": "10m",
                                                        "reason": "race"}, headers=bearer(site.ids.user(user)))
            assert resp.status == 201, await resp.text()
            task_id = str((await resp.json())["id"])
            asks = [_request(client, task_id, rng.choice(GRANTS), agent_token, rng.uniform(0, MAX_DELAY))
                    for _ in range(REQUESTS)]
            end_delay = rng.uniform(0, MAX_DELAY)
            ended, *answers = await asyncio.gather(_end(client, task_id, agent_token, end_delay), *asks)
            f.rounds += 1
            f.requests += len(answers)
            assert ended.status == 200, f"round {n}: end answered {ended.status}"

            task = await store.get_task(task_id)
            assert task is not None and task.state == "ended" and task.ended_at is not None
            leases = {x.id: x for x in await store.list_leases(task_id=task_id)}
            seqs = await _seq_of(store, task_id)
            end_seq = seqs[("task.ended", None)]
            for a in answers:
                f.statuses[a.status] += 1
                if a.status != 200:
                    f.refused_after_end += 1
                    continue
                f.delivered += 1
                if a.received > ended.received:
                    f.delivered_after_end_answer += 1
                assert a.lease_id is not None
                row = leases.get(a.lease_id)
                if row is None:
                    f.problems.append(f"round {n}: delivered {a.lease_id} has no lease in the store")
                    continue
                issued_seq = seqs.get(("lease.issued", a.lease_id))
                if issued_seq is None or issued_seq > end_seq:
                    f.problems.append(f"round {n}: {a.lease_id} committed after the end (seq {issued_seq} > {end_seq})")
            for row in leases.values():
                alive = await _alive(admin, row)
                if row.state != "revoked" or alive:
                    f.live_after_end += 1
                    f.problems.append(f"round {n}: lease {row.id} ({row.grant}) is {row.state}, "
                                      f"{'alive' if alive else 'gone'} in Vault after the end")

        print(f"\nrounds={f.rounds} requests={f.requests} delivered={f.delivered} "
              f"refused_after_end={f.refused_after_end} live_after_end={f.live_after_end}")
        print(f"  answers: {dict(sorted(f.statuses.items()))}; 200s received after the end's answer: "
              f"{f.delivered_after_end_answer}")
        for line in f.problems[:20]:
            print("  -", line)
        assert f.live_after_end == 0
        assert f.problems == []
        assert f.delivered > 0 and f.refused_after_end > 0, "the race never raced: tune the delays"
        # A refusal is a refusal: never a 5xx or anything but "the task is gone".
        assert set(f.statuses) <= {200, 410}, dict(f.statuses)
