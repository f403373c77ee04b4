"""Operators revoke by user, agent, task or tenant: exactly the selected leases die (PostgreSQL logins prove
it), everyone else's keep working, and a lock blocks new credentials until it is lifted."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient

from broker.api import STORE
from broker.vault import VaultClient
from tests.api.test_task_flow import pg_connect
from tests.conftest import TD, BrokerSite, bearer, person

Client = TestClient[Any, Any]
USERS = ("alice@example.com", "bob@example.com", "carol@example.com")
AGENTS = tuple(f"spiffe://{TD}/agent/support-{i}" for i in (1, 2, 3))
OPERATOR = ("olga@example.com", ("secops",))


@dataclass(frozen=True)
class Held:
    user: str
    agent: str
    tenant: str
    task: str
    lease: str
    data: dict[str, Any]


async def _start(client: Client, site: BrokerSite, user: str, agent: str, role: str, groups: tuple[str, ...]) -> str:
    resp = await client.post("/v1/tasks", json={"agent": agent, "role": role, "ttl": "10m", "reason": "work"},
                             headers=bearer(site.ids.user(user, groups)))
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


async def _cred(client: Client, site: BrokerSite, task: str, agent: str, grant: str) -> dict[str, Any]:
    resp = await client.post(f"/v1/tasks/{task}/credentials", json={"grant": grant},
                             headers=bearer(site.ids.agent(agent)))
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def population(client: Client, site: BrokerSite) -> list[Held]:
    """3 users x 3 agents on tenant acme (one task each, a read-only database login), plus one globex task."""
    held = []
    for user, agent in itertools.product(USERS, AGENTS):
        task = await _start(client, site, user, agent, "support-triage", ("support",))
        cred = await _cred(client, site, task, agent, "tickets-db-ro")
        held.append(Held(user, agent, "acme", task, cred["lease_id"], cred["data"]))
    billing_agent = f"spiffe://{TD}/agent/billing-1"
    task = await _start(client, site, "dave@example.com", billing_agent, "billing-report", ("billing",))
    cred = await _cred(client, site, task, billing_agent, "tickets-db-rw")
    held.append(Held("dave@example.com", billing_agent, "globex", task, cred["lease_id"], cred["data"]))
    return held


async def can_login(site: BrokerSite, data: dict[str, Any]) -> bool:
    try:
        async with await pg_connect(site, data):
            return True
    except psycopg.OperationalError:
        return False


async def revoke(client: Client, site: BrokerSite, **selector: str) -> dict[str, Any]:
    resp = await client.post("/v1/revocations", json={**selector, "reason": "incident 7", "wait": 30},
                             headers=bearer(site.ids.user(*OPERATOR)))
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


class TestRevokeBySelector:
    @pytest.mark.parametrize(("kind", "pick"), [
        ("user", lambda h: h.user == USERS[1]),
        ("agent", lambda h: h.agent == AGENTS[2]),
        ("tenant", lambda h: h.tenant == "acme"),
    ])
    async def test_exactly_the_selected_leases_die(self, client: Client, site: BrokerSite, admin: VaultClient,
                                                   kind: str, pick: Any) -> None:
        """The selected holders' logins fail and Vault has none of their leases; everyone else's still work."""
        held = await population(client, site)
        target = next(h for h in held if pick(h))
        value = {"user": target.user, "agent": target.agent, "tenant": target.tenant}[kind]
        hit = [h for h in held if pick(h)]
        spared = [h for h in held if not pick(h)]

        out = await revoke(client, site, **{kind: value})

        assert out["state"] == "done" and out["pending"] == 0
        assert out["tasks"] == len(hit) and out["leases"] == len(hit) and out["revoked"] == len(hit)
        assert out["lock"] is True
        store = client.app[STORE]
        for h in hit:
            assert not await can_login(site, h.data), h
            row = await store.get_lease(h.lease)
            assert row is not None and row.state == "revoked"
            assert await admin.lookup_lease(row.vault_lease_id) is None
        for h in spared:
            assert await can_login(site, h.data), h
            row = await store.get_lease(h.lease)
            assert row is not None and row.state == "active"

    async def test_revoke_one_task(self, client: Client, site: BrokerSite) -> None:
        """A task selector ends that task only, and locks nothing."""
        held = await population(client, site)
        out = await revoke(client, site, task=held[0].task)
        assert (out["tasks"], out["revoked"], out["lock"]) == (1, 1, False)
        assert not await can_login(site, held[0].data)
        assert await can_login(site, held[1].data)


class TestLocks:
    async def test_lock_blocks_new_tasks_and_credentials_until_lifted(self, client: Client, site: BrokerSite) -> None:
        """After a revocation by agent, that agent gets 403 locked on new credentials and new tasks; lifting restores it."""
        user, agent = USERS[0], AGENTS[0]
        other_task = await _start(client, site, USERS[1], AGENTS[1], "support-triage", ("support",))
        task = await _start(client, site, user, agent, "support-triage", ("support",))
        out = await revoke(client, site, agent=agent)
        assert out["tasks"] == 1

        resp = await client.post("/v1/tasks", json={"agent": agent, "role": "support-triage", "ttl": 60,
                                                    "reason": "again"}, headers=bearer(site.ids.user(user)))
        assert resp.status == 403 and (await resp.json())["code"] == "locked"
        resp = await client.post(f"/v1/tasks/{task}/credentials", json={"grant": "agent-cert"},
                                 headers=bearer(site.ids.agent(agent)))
        assert resp.status == 410  # its task was revoked with the lock
        await _cred(client, site, other_task, AGENTS[1], "agent-cert")  # others unaffected

        resp = await client.delete(f"/v1/revocations/{out['id']}", json={"reason": "cleared"},
                                   headers=bearer(site.ids.user(*OPERATOR)))
        assert resp.status == 200 and (await resp.json())["lock"] is False
        again = await _start(client, site, user, agent, "support-triage", ("support",))
        await _cred(client, site, again, agent, "agent-cert")

    async def test_tenant_lock_refuses_new_tasks(self, client: Client, site: BrokerSite) -> None:
        """After a revocation by tenant, no task of that tenant can start."""
        await revoke(client, site, tenant="acme")
        resp = await client.post("/v1/tasks", json={"agent": AGENTS[0], "role": "support-triage", "ttl": 60,
                                                    "reason": "x"}, headers=bearer(site.ids.user()))
        assert resp.status == 403 and (await resp.json())["code"] == "locked"

    async def test_only_operators_revoke(self, client: Client, site: BrokerSite) -> None:
        """A non-operator gets 403; an auditor may read revocations but not create them."""
        body = {"user": USERS[0], "reason": "x"}
        for who in (site.ids.user(), site.ids.user("audrey@example.com", ("audit",))):
            resp = await client.post("/v1/revocations", json=body, headers=bearer(who))
            assert resp.status == 403
        resp = await client.get("/v1/revocations", headers=bearer(site.ids.user("audrey@example.com", ("audit",))))
        assert resp.status == 200

    @pytest.mark.parametrize("body", [{"reason": "x"}, {"user": "a", "agent": "b", "reason": "x"},
                                      {"user": "a"}, {"user": "", "reason": "x"}])
    async def test_exactly_one_selector(self, client: Client, site: BrokerSite, body: dict[str, str]) -> None:
        """No selector, two selectors, no reason or an empty value: 400."""
        resp = await client.post("/v1/revocations", json=body, headers=bearer(site.ids.user(*OPERATOR)))
        assert resp.status == 400


class TestListings:
    async def test_leases_and_tasks_filter(self, client: Client, site: BrokerSite) -> None:
        """GET /v1/leases and /v1/tasks filter by user, agent, tenant and state, and page."""
        await population(client, site)
        op = bearer(site.ids.user(*OPERATOR))
        page = await (await client.get(f"/v1/leases?user={USERS[0]}", headers=op)).json()
        assert len(page["leases"]) == 3 and {x["user"] for x in page["leases"]} == {person(USERS[0])}
        page = await (await client.get("/v1/leases?tenant=globex&state=active", headers=op)).json()
        assert [x["grant"] for x in page["leases"]] == ["tickets-db-rw"]
        first = await (await client.get("/v1/tasks?limit=4", headers=op)).json()
        rest = await (await client.get(f"/v1/tasks?limit=100&after={first['next_after']}", headers=op)).json()
        ids = [t["id"] for t in first["tasks"] + rest["tasks"]]
        assert len(ids) == len(set(ids)) == 10 and rest["next_after"] is None
        resp = await client.get("/v1/leases", headers=bearer(site.ids.user()))
        assert resp.status == 403
