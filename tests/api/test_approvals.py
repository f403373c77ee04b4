"""High-risk grants wait for a freshly re-authenticated human; the approval covers one exact request, once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp.test_utils import TestClient

from broker.api import STORE
from broker.app import make_app
from tests.api.test_revocation import can_login
from tests.api.test_task_flow import credential, start_task
from tests.conftest import USER, USER_ID, BrokerSite, bearer, person

Client = TestClient[Any, Any]
LEAD = ("lena@example.com", ("secops-leads",))
LEAD2 = ("leo@example.com", ("secops-leads",))


def approver(site: BrokerSite, who: tuple[str, tuple[str, ...]] = LEAD, *, auth_age: float = 10) -> dict[str, str]:
    return bearer(site.ids.user(who[0], who[1], auth_time=time.time() - auth_age))


async def decide(client: Client, site: BrokerSite, approval_id: str, decision: str = "approve", *,
                 who: tuple[str, tuple[str, ...]] = LEAD, auth_age: float = 10, status: int = 200) -> dict[str, Any]:
    resp = await client.post(f"/v1/approvals/{approval_id}", json={"decision": decision, "reason": "change 42"},
                             headers=approver(site, who, auth_age=auth_age))
    assert resp.status == status, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def requested(client: Client, site: BrokerSite, grant: str = "prod-write", ttl: int | None = None
                    ) -> tuple[dict[str, Any], str]:
    task = await start_task(client, site)
    body = await credential(client, site, task["id"], grant, ttl=ttl, status=202)
    return task, body["approval_id"]


async def use(client: Client, site: BrokerSite, task: str, approval_id: str, grant: str = "prod-write",
              ttl: int | None = None, status: int = 200) -> dict[str, Any]:
    body: dict[str, Any] = {"grant": grant, "approval_id": approval_id}
    if ttl is not None:
        body["ttl"] = ttl
    resp = await client.post(f"/v1/tasks/{task}/credentials", json=body, headers=bearer(site.ids.agent()))
    assert resp.status == status, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


class TestApprovalFlow:
    async def test_nothing_exists_before_approval_and_it_delivers_once(self, client: Client,
                                                                       site: BrokerSite) -> None:
        """202 and no lease; an approver sees the request in full; approval delivers one working credential, once."""
        task, apr = await requested(client, site)
        assert await client.app[STORE].list_leases(task_id=task["id"]) == []
        await use(client, site, task["id"], apr, status=409)  # not approved yet
        queue = await (await client.get("/v1/approvals?state=pending", headers=approver(site))).json()
        mine = next(a for a in queue["approvals"] if a["id"] == apr)
        assert (mine["user"], mine["user_name"], mine["grant"], mine["path"], mine["task_reason"]) == (
            USER_ID, USER, "prod-write", "database/creds/tickets-rw", "ticket 42")

        decided = await decide(client, site, apr)
        assert decided["state"] == "approved" and decided["votes"][0]["approver"] == person(LEAD[0])
        assert decided["votes"][0]["approver_name"] == LEAD[0]
        polled = await (await client.get(f"/v1/approvals/{apr}?wait=5", headers=bearer(site.ids.agent()))).json()
        assert polled["state"] == "approved"

        cred = await use(client, site, task["id"], apr)
        assert await can_login(site, cred["data"])
        again = await use(client, site, task["id"], apr, status=409)
        assert again["code"] == "conflict"
        events = [r.record for r in await client.app[STORE].query_audit(task=task["id"], limit=100)]
        names = [e.event for e in events]
        assert names.index("approval.requested") < names.index("approval.approved") < names.index("lease.issued")
        approved = next(e for e in events if e.event == "approval.approved")
        assert LEAD[0] in (approved.reason or "") and "authenticated" in (approved.reason or "")
        issued = next(e for e in events if e.event == "lease.issued")
        assert apr in (issued.reason or "")

    async def test_long_poll_wakes_on_the_decision(self, client: Client, site: BrokerSite) -> None:
        """An agent waiting on ?wait=30 gets the answer as soon as the approver decides."""
        _task, apr = await requested(client, site)

        async def poll() -> tuple[float, dict[str, Any]]:
            started = time.monotonic()
            resp = await client.get(f"/v1/approvals/{apr}?wait=30", headers=bearer(site.ids.agent()))
            return time.monotonic() - started, await resp.json()

        waiter = asyncio.create_task(poll())
        await asyncio.sleep(0.3)
        await decide(client, site, apr)
        took, body = await waiter
        assert body["state"] == "approved" and took < 10


class TestApproverRules:
    async def test_stale_authentication_is_refused(self, client: Client, site: BrokerSite) -> None:
        """An approver whose auth_time is older than 5 minutes gets 401 insufficient_user_authentication."""
        _, apr = await requested(client, site)
        resp = await client.post(f"/v1/approvals/{apr}", json={"decision": "approve", "reason": "x"},
                                 headers=approver(site, auth_age=301))
        assert resp.status == 401
        assert (await resp.json())["code"] == "insufficient_user_authentication"
        assert 'error="insufficient_user_authentication"' in resp.headers["WWW-Authenticate"]
        assert "max_age=300" in resp.headers["WWW-Authenticate"]

    async def test_the_tasks_own_user_cannot_approve(self, client: Client, site: BrokerSite) -> None:
        """Even when the task's user is an approver, they cannot approve their own task's grant."""
        task = await start_task(client, site, groups=("support", "secops-leads"))
        body = await credential(client, site, task["id"], "prod-write", status=202)
        out = await decide(client, site, body["approval_id"], who=(USER, ("support", "secops-leads")), status=403)
        assert out["code"] == "not_approver"

    async def test_non_approver_cannot_decide(self, client: Client, site: BrokerSite) -> None:
        """A fresh operator who is not an approver is refused."""
        _, apr = await requested(client, site)
        out = await decide(client, site, apr, who=("olga@example.com", ("secops",)), status=403)
        assert out["code"] == "not_approver"

    async def test_two_person_rule(self, client: Client, site: BrokerSite) -> None:
        """prod-cert needs two approvers: one approval keeps it pending, the same approver cannot vote twice."""
        task, apr = await requested(client, site, grant="prod-cert")
        assert (await decide(client, site, apr))["state"] == "pending"
        await decide(client, site, apr, status=409)
        await use(client, site, task["id"], apr, grant="prod-cert", status=409)
        assert (await decide(client, site, apr, who=LEAD2))["state"] == "approved"
        cred = await use(client, site, task["id"], apr, grant="prod-cert")
        assert cred["data"]["certificate"].startswith("-----BEGIN CERTIFICATE-----")


class TestReuse:
    async def test_approval_covers_only_its_exact_request(self, client: Client, site: BrokerSite) -> None:
        """The approval is refused for another task, another grant or another TTL, and still works for its own."""
        task, apr = await requested(client, site, ttl=120)
        await decide(client, site, apr)
        other_task = await start_task(client, site)
        for t, grant, ttl in ((other_task["id"], "prod-write", 120), (task["id"], "prod-cert", 120),
                              (task["id"], "prod-write", 60), (task["id"], "prod-write", None)):
            out = await use(client, site, t, apr, grant=grant, ttl=ttl, status=403)
            assert out["code"] == "approval_mismatch", (t, grant, ttl)
        await use(client, site, task["id"], apr, ttl=120)


class TestDenialAndExpiry:
    async def test_denial_is_recorded_and_delivers_nothing(self, client: Client, site: BrokerSite) -> None:
        """A denied approval cannot be used; the denial names the approver in the audit trail."""
        task, apr = await requested(client, site)
        assert (await decide(client, site, apr, "deny"))["state"] == "denied"
        await use(client, site, task["id"], apr, status=409)
        assert await client.app[STORE].list_leases(task_id=task["id"]) == []
        events = [r.record for r in await client.app[STORE].query_audit(task=task["id"], limit=100)]
        denied = next(e for e in events if e.event == "approval.denied")
        assert LEAD[0] in (denied.reason or "") and denied.outcome == "denied"

    async def test_expired_approval_delivers_nothing(self, site: BrokerSite,
                                                     aiohttp_client: Callable[..., Any]) -> None:
        """An approval left pending past its expiry is marked expired, recorded, and cannot be approved or used."""
        people = site.settings.people.model_copy(update={"approval_ttl": 1})
        client = await aiohttp_client(make_app(site.settings.model_copy(update={"people": people})))
        task, apr = await requested(client, site)
        deadline = time.monotonic() + 15
        state = "pending"
        while state == "pending" and time.monotonic() < deadline:
            row = await client.app[STORE].get_approval(apr)
            assert row is not None
            state = row.state
            if state == "pending":
                await asyncio.sleep(0.3)
        assert state == "expired"
        await decide(client, site, apr, status=409)
        await use(client, site, task["id"], apr, status=409)
        events = [r.record.event for r in await client.app[STORE].query_audit(task=task["id"], limit=100)]
        assert "approval.expired" in events
        assert await client.app[STORE].list_leases(task_id=task["id"]) == []


class TestAgentClient:
    async def test_sdk_waits_for_the_approval_then_gets_the_credential(self, client: Client, site: BrokerSite) -> None:
        """AgentClient.credential(wait_for_approval=...) long-polls, then repeats the request with the approval."""
        from broker.sdk import AgentClient, ApprovalPending

        task = await start_task(client, site)
        url = str(client.make_url("")).rstrip("/")
        async with AgentClient(url, site.ids.agent()) as agent:
            try:
                await agent.credential(task["id"], "prod-write")
            except ApprovalPending as pending:
                apr = pending.approval_id
            else:
                raise AssertionError("a high-risk grant was issued without approval")

            async def approve_soon() -> None:
                await asyncio.sleep(0.5)
                await decide(client, site, apr)

            approver_task = asyncio.create_task(approve_soon())
            # A second request opens its own approval; wait on the first one explicitly instead.
            approval = await agent.wait_for_approval(apr, timeout=20)
            await approver_task
            assert approval.state == "approved"
            cred = await agent.credential(task["id"], "prod-write", approval_id=apr)
            assert await can_login(site, cred.data)
