"""GET /v1/tasks/{id}/grants: a task's grants as its agent may see them, to the same people as the task itself."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from tests.api.test_task_flow import end, start_task
from tests.conftest import OTHER_AGENT, BrokerSite, bearer

Client = TestClient[Any, Any]


class TestTaskGrants:
    async def test_the_agent_sees_risk_and_how_each_grant_ends(self, client: Client, site: BrokerSite) -> None:
        """Every grant of the role, with risk, approvals, max TTL and revocation; no Vault path; state follows the task."""
        task = await start_task(client, site)
        resp = await client.get(f"/v1/tasks/{task['id']}/grants", headers=bearer(site.ids.agent()))
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert body["task"] == task["id"] and body["state"] == "active"
        grants = {g["name"]: g for g in body["grants"]}
        assert grants["tickets-db-ro"] == {"name": "tickets-db-ro", "risk": "low", "approvals_required": 1,
                                           "max_ttl": 600, "revocation": "revocable", "endpoint": None,
                                           "kind": None, "allowed_hosts": [], "http_auth": None}
        assert grants["prod-cert"]["risk"] == "high" and grants["prod-cert"]["approvals_required"] == 2
        assert "database/creds" not in await resp.text()  # how the broker reaches Vault is not the agent's business
        await end(client, site, task["id"])
        after = await (await client.get(f"/v1/tasks/{task['id']}/grants", headers=bearer(site.ids.agent()))).json()
        assert after["state"] == "ended"

    async def test_others_get_the_answer_for_a_missing_task(self, client: Client, site: BrokerSite) -> None:
        """Another agent, a user who is not the task's, and an unknown id: the same 404."""
        task = await start_task(client, site)
        other = await client.get(f"/v1/tasks/{task['id']}/grants", headers=bearer(site.ids.agent(OTHER_AGENT)))
        stranger = await client.get(f"/v1/tasks/{task['id']}/grants",
                                    headers=bearer(site.ids.user("mallory@example.com", ("support",))))
        missing = await client.get("/v1/tasks/tsk_nosuchtask/grants", headers=bearer(site.ids.agent()))
        assert other.status == stranger.status == missing.status == 404
        assert (await other.json())["code"] == (await missing.json())["code"] == "not_found"
