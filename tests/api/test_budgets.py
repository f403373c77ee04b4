"""One runaway agent cannot flood Vault: live-lease budgets and issuance rates answer 429 with Retry-After."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.api import STORE
from broker.app import make_app
from broker.config import LimitsSettings
from tests.api.test_issuance_journal import journal_ready, task_requests
from tests.api.test_task_flow import start_task
from tests.api.test_vault_merge import window
from tests.conftest import OTHER_AGENT, BrokerSite, bearer


async def _client(site: BrokerSite, aiohttp_client: Callable[..., Any], **limits: Any) -> Any:
    settings = site.settings.model_copy(update={"limits": LimitsSettings(**limits)})
    return await aiohttp_client(make_app(settings))


class TestBudgets:
    async def test_live_lease_budget_per_agent(self, site: BrokerSite, aiohttp_client: Callable[..., Any]) -> None:
        """With a budget of 2 live leases, the third request is 429 budget_exceeded and nothing is issued."""
        client = await _client(site, aiohttp_client, max_live_leases_per_agent=2)
        task = await start_task(client, site)
        statuses = []
        for _ in range(3):
            resp = await client.post(f"/v1/tasks/{task['id']}/credentials", json={"grant": "agent-cert"},
                                     headers=bearer(site.ids.agent()))
            statuses.append(resp.status)
        assert statuses == [200, 200, 429]
        assert (await resp.json())["code"] == "budget_exceeded" and int(resp.headers["Retry-After"]) > 0
        view = await (await client.get(f"/v1/tasks/{task['id']}", headers=bearer(site.ids.user()))).json()
        assert len(view["leases"]) == 2

    async def test_the_budget_counts_live_leases_only(self, site: BrokerSite,
                                                      aiohttp_client: Callable[..., Any]) -> None:
        """Each task counts its active leases (tasks.live_leases): an expired lease frees its place, a task
        that ended frees all of its own, and a user's budget sums their agents' active tasks."""
        client = await _client(site, aiohttp_client, max_live_leases_per_agent=2, max_live_leases_per_user=3)
        store = client.app[STORE]

        async def issue(task_id: str) -> int:
            resp = await client.post(f"/v1/tasks/{task_id}/credentials", json={"grant": "agent-cert"},
                                     headers=bearer(site.ids.agent()))
            return resp.status

        first = await start_task(client, site)
        assert [await issue(first["id"]) for _ in range(3)] == [200, 200, 429]
        row = await store.get_task(first["id"])
        assert row is not None and row.live_leases == 2
        leases = [lease for lease, _ in await store.find_leases(task=first["id"], states=("active",), limit=10)]
        await store.expire_leases([leases[0].id], now=time.time(), records=[])
        row = await store.get_task(first["id"])
        assert row is not None and row.live_leases == 1
        assert await issue(first["id"]) == 200  # the expired lease's place
        assert await issue(first["id"]) == 429
        second = await start_task(client, site)
        assert await issue(second["id"]) == 429  # the same agent: its budget spans its tasks
        ended = await client.post(f"/v1/tasks/{first['id']}/end", headers=bearer(site.ids.user()))
        assert ended.status in (200, 202), await ended.text()
        assert [await issue(second["id"]) for _ in range(3)] == [200, 200, 429]

    async def test_a_refused_agents_retries_cost_vault_nothing(self, site: BrokerSite,
                                                              aiohttp_client: Callable[..., Any]) -> None:
        """With the issuance journal on, the budget is checked in the transaction after Vault's read; an agent
        refused a moment ago is checked before the read too: of four refused tries, only the first reached
        Vault (and what it made was revoked). Once a lease ends, the next credential is issued at once."""
        client = await _client(site, aiohttp_client, max_live_leases_per_agent=1)
        await journal_ready(client)
        task = await start_task(client, site)
        log = Path(site.settings.vault.audit_log or "")

        async def issue() -> int:
            resp = await client.post(f"/v1/tasks/{task['id']}/credentials", json={"grant": "agent-cert"},
                                     headers=bearer(site.ids.agent()))
            return resp.status

        assert await issue() == 200
        start = log.stat().st_size
        assert [await issue() for _ in range(4)] == [429] * 4
        await asyncio.sleep(0.3)  # the device writes synchronously; the read is only the file's
        reads = [e for e in task_requests(window(log, start), task["id"]) if e["request"]["path"] == "pki/issue/agents"]
        assert len(reads) == 1, [e["request"]["path"] for e in reads]
        store = client.app[STORE]
        [(lease, _)] = await store.find_leases(task=task["id"], states=("active",), limit=10)
        await store.expire_leases([lease.id], now=time.time(), records=[])
        assert await issue() == 200

    async def test_rate_limit_per_agent_spares_others(self, site: BrokerSite,
                                                      aiohttp_client: Callable[..., Any]) -> None:
        """A flooding agent gets 429 rate_limited past its burst; another agent is served meanwhile."""
        client = await _client(site, aiohttp_client, issue_rate_per_agent=0.1, issue_burst_per_agent=2)
        mine = await start_task(client, site)
        theirs = await start_task(client, site, agent=OTHER_AGENT)
        codes = []
        for _ in range(4):
            resp = await client.post(f"/v1/tasks/{mine['id']}/credentials", json={"grant": "agent-cert"},
                                     headers=bearer(site.ids.agent()))
            codes.append(resp.status)
        assert codes == [200, 200, 429, 429]
        assert (await resp.json())["code"] == "rate_limited" and int(resp.headers["Retry-After"]) >= 1
        resp = await client.post(f"/v1/tasks/{theirs['id']}/credentials", json={"grant": "agent-cert"},
                                 headers=bearer(site.ids.agent(OTHER_AGENT)))
        assert resp.status == 200
