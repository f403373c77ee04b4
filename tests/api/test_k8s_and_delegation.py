"""Agents in Kubernetes, and tasks agents start with a delegation their user's IdP issued (issue 13).

Real OpenBao, SCRAM PostgreSQL, the broker over HTTP on loopback. Vault truth (lease lookups with the
root token) and PostgreSQL logins are the oracles. Service-account tokens carry the claims a
kube-apiserver issues (``pkg/serviceaccount/claims.go`` in kubernetes/kubernetes, see
``DevIssuer.mint_k8s_token``); delegation tokens are RFC 8693 token-exchange results (``act``, ``scope``)
in RFC 9068's JWT access-token shape.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient

from broker.api import STORE
from broker.vault import VaultClient
from tests.api.test_task_flow import credential, pg_connect, vault_lease_id
from tests.conftest import (
    AGENT,
    IDP,
    K8S_AGENT,
    K8S_B_ISSUER,
    K8S_ISSUER,
    OTHER_AGENT,
    OUTSIDER_AGENT,
    USER,
    USER_ID,
    BrokerSite,
    bearer,
)

Client = TestClient[Any, Any]


def both(agent_token: str, delegation: str) -> dict[str, str]:
    return {**bearer(agent_token), "X-Delegation-Token": delegation}


async def k8s_credential(client: Client, site: BrokerSite, task_id: str, grant: str, *, token: str | None = None,
                         status: int = 200) -> dict[str, Any]:
    resp = await client.post(f"/v1/tasks/{task_id}/credentials", json={"grant": grant},
                             headers=bearer(token or site.ids.k8s_agent()))
    assert resp.status == status, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def delegated_start(client: Client, agent_token: str, delegation: str, *, role: str = "support-triage",
                          ttl: str = "10m") -> Any:
    return await client.post("/v1/tasks", json={"role": role, "ttl": ttl, "reason": "ticket 42, delegated"},
                             headers=both(agent_token, delegation))


async def audit(client: Client, **q: Any) -> list[Any]:
    return [r.record for r in await client.app[STORE].query_audit(limit=1000, **q)]


class TestKubernetesAgent:
    async def test_full_task_flow_with_a_projected_token(self, client: Client, site: BrokerSite,
                                                         admin: VaultClient) -> None:
        """A pod's service-account token is the agent spiffe://k8s-a.example.org/ns/support/sa/support-bot: it
        takes a task, logs in to PostgreSQL with its credential, ends the task; the login and the lease are gone."""
        resp = await client.post("/v1/tasks", json={"agent": K8S_AGENT, "role": "support-triage", "ttl": "10m",
                                                    "reason": "ticket 42"}, headers=bearer(site.ids.user()))
        assert resp.status == 201, await resp.text()
        task = await resp.json()
        cred = await k8s_credential(client, site, task["id"], "tickets-db-ro")
        async with await pg_connect(site, cred["data"]) as conn:
            row = await (await conn.execute("SELECT count(*) FROM tickets")).fetchone()
            assert row is not None and row[0] >= 1
        vault_id = await vault_lease_id(client, cred["lease_id"])
        assert await admin.lookup_lease(vault_id) is not None
        # The pod's kubelet rotates the projected token: a fresh token of the same service account is the same agent.
        view = await client.get(f"/v1/tasks/{task['id']}", headers=bearer(site.ids.k8s_agent(pod="support-bot-2")))
        assert view.status == 200 and (await view.json())["agent"] == K8S_AGENT

        ended = await client.post(f"/v1/tasks/{task['id']}/end", headers=bearer(site.ids.k8s_agent()))
        assert ended.status == 200 and (await ended.json())["revoked"] == 1
        assert await admin.lookup_lease(vault_id) is None
        with pytest.raises(psycopg.OperationalError):
            await pg_connect(site, cred["data"])
        events = [(r.event, r.agent) for r in await audit(client, task=task["id"])]
        assert ("lease.issued", K8S_AGENT) in events and ("task.ended", K8S_AGENT) in events

    @pytest.mark.parametrize("case", [
        "legacy_secret_token", "other_cluster_key", "other_cluster_issuer", "sub_disagrees", "no_exp",
        "apiserver_audience", "unknown_cluster",
    ])
    async def test_bad_service_account_tokens_get_the_same_401(self, client: Client, site: BrokerSite,
                                                              case: str) -> None:
        """Every refused service-account token gets the same 401 invalid_token as any bad SVID, and nothing is issued."""
        resp = await client.post("/v1/tasks", json={"agent": K8S_AGENT, "role": "support-triage", "ttl": "10m",
                                                    "reason": "ticket 42"}, headers=bearer(site.ids.user()))
        task = await resp.json()
        resp = await client.post(f"/v1/tasks/{task['id']}/credentials", json={"grant": "tickets-db-ro"},
                                 headers=bearer(bad_k8s_token(site, case)))
        assert resp.status == 401
        body = await resp.json()
        assert (body["code"], body["detail"]) == ("invalid_token", "the bearer token was not accepted")
        assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert (await client.app[STORE].list_leases(task_id=task["id"])) == []

    async def test_same_service_account_in_another_cluster_is_another_agent(self, client: Client,
                                                                            site: BrokerSite) -> None:
        """support/support-bot of cluster B is spiffe://k8s-b.example.org/...: not the task's agent (403)."""
        resp = await client.post("/v1/tasks", json={"agent": K8S_AGENT, "role": "support-triage", "ttl": "10m",
                                                    "reason": "ticket 42"}, headers=bearer(site.ids.user()))
        task = await resp.json()
        token_b = site.ids.k8s_b.mint_k8s_token(issuer=K8S_B_ISSUER, namespace="support",
                                                service_account="support-bot", audience="agent-broker")
        body = await k8s_credential(client, site, task["id"], "tickets-db-ro", token=token_b, status=403)
        assert body["code"] == "not_task_agent"


def bad_k8s_token(site: BrokerSite, case: str) -> str:
    ids = site.ids
    if case == "legacy_secret_token":
        return ids.k8s.encode({"iss": "kubernetes/serviceaccount", "sub": "system:serviceaccount:support:support-bot",
                               "kubernetes.io/serviceaccount/namespace": "support",
                               "kubernetes.io/serviceaccount/secret.name": "support-bot-token-x2x4q",
                               "kubernetes.io/serviceaccount/service-account.name": "support-bot",
                               "kubernetes.io/serviceaccount/service-account.uid":
                                   "1f0a5a3c-52c8-4b0e-8d1e-6f2b1c9d7e10"}, headers={"typ": None})
    if case == "other_cluster_key":  # cluster B's key (same kid) claiming cluster A's issuer
        return ids.k8s_b.mint_k8s_token(issuer=K8S_ISSUER, namespace="support", service_account="support-bot",
                                        audience="agent-broker")
    if case == "other_cluster_issuer":  # cluster A's key claiming cluster B's issuer
        return ids.k8s_agent(issuer=K8S_B_ISSUER)
    if case == "sub_disagrees":
        return ids.k8s_agent(extra_claims={"sub": "system:serviceaccount:kube-system:support-bot"})
    if case == "no_exp":
        token = ids.k8s_agent()
        claims = _claims(token)
        del claims["exp"]
        return ids.k8s.encode(claims, headers={"typ": None})
    if case == "apiserver_audience":
        return ids.k8s_agent(audience="https://kubernetes.default.svc.cluster.local")
    if case == "unknown_cluster":
        return ids.k8s_agent(issuer="https://k8s.elsewhere.example")
    raise AssertionError(case)


def _claims(token: str) -> dict[str, Any]:
    import base64
    import json

    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


class TestDelegatedStart:
    async def test_agent_starts_the_task_for_the_user(self, client: Client, site: BrokerSite,
                                                      admin: VaultClient) -> None:
        """SVID + delegation token: the task is the token's user's, for this agent; the audit record notes the jti;
        the user sees it with their own ID token; the credential works and dies with the task."""
        delegation = site.ids.delegation(AGENT)
        resp = await delegated_start(client, site.ids.agent(), delegation)
        assert resp.status == 201, await resp.text()
        task = await resp.json()
        assert (task["user"], task["agent"], task["role"], task["tenant"]) == (USER_ID, AGENT, "support-triage", "acme")
        started = [r for r in await audit(client, task=task["id"]) if r.event == "task.started"]
        assert len(started) == 1
        assert started[0].delegation_jti == _claims(delegation)["jti"] and started[0].user == USER_ID
        api_audit = await client.get(f"/v1/audit?task={task['id']}",
                                     headers=bearer(site.ids.user("audrey@example.com", ("audit",))))
        assert (await api_audit.json())["records"][0]["delegation_jti"] == _claims(delegation)["jti"]
        mine = await client.get(f"/v1/tasks/{task['id']}", headers=bearer(site.ids.user()))
        assert mine.status == 200

        cred = await credential(client, site, task["id"], "tickets-db-ro")
        async with await pg_connect(site, cred["data"]):
            pass
        vault_id = await vault_lease_id(client, cred["lease_id"])
        ended = await client.post(f"/v1/tasks/{task['id']}/end", headers=bearer(site.ids.agent()))
        assert (await ended.json())["revoked"] == 1
        assert await admin.lookup_lease(vault_id) is None

    async def test_kubernetes_agent_with_a_delegation(self, client: Client, site: BrokerSite) -> None:
        """A pod's service-account token with a delegation naming its SPIFFE ID starts the task too."""
        resp = await delegated_start(client, site.ids.k8s_agent(), site.ids.delegation(K8S_AGENT))
        assert resp.status == 201, await resp.text()
        task = await resp.json()
        assert (task["user"], task["agent"]) == (USER_ID, K8S_AGENT)
        cred = await k8s_credential(client, site, task["id"], "agent-cert")
        assert cred["data"]["certificate"].startswith("-----BEGIN CERTIFICATE-----")

    @pytest.mark.parametrize("case", [
        "act_is_another_agent", "replayed", "not_a_delegator", "role_not_in_scope", "no_scope", "no_jti",
        "another_issuer", "aud_without_broker", "expired", "no_act",
    ])
    async def test_refused_with_401(self, client: Client, site: BrokerSite, case: str) -> None:
        """act mismatch, a replayed jti, a role the user may not delegate, a scope without the role, and every
        malformed delegation: the same 401 invalid_token, and no task."""
        ids = site.ids
        delegation = {
            "act_is_another_agent": lambda: ids.delegation(OTHER_AGENT),
            "not_a_delegator": lambda: ids.delegation(name="mallory@example.com", groups=("billing",)),
            "role_not_in_scope": lambda: ids.delegation(scope="task:billing-report"),
            "no_scope": lambda: ids.delegation(scope=" "),
            "no_jti": lambda: ids.delegation(extra_claims={"jti": ""}),
            "another_issuer": lambda: ids.stranger.mint_delegation_token(
                issuer="https://idp.elsewhere.example", subject=USER, actor=AGENT, audience="agent-broker",
                scope="task:support-triage"),
            "aud_without_broker": lambda: ids.delegation(audience="https://api.example.com"),
            "expired": lambda: ids.delegation(now=time.time() - 3600),
            "no_act": lambda: ids.delegation(extra_claims={"act": None}),
            "replayed": ids.delegation,
        }[case]()
        if case == "replayed":
            first = await delegated_start(client, ids.agent(), delegation)
            assert first.status == 201
        before = await client.app[STORE].find_tasks(limit=100)
        resp = await delegated_start(client, ids.agent(), delegation)
        assert resp.status == 401, await resp.text()
        body = await resp.json()
        assert (body["code"], body["detail"]) == ("invalid_token", "the bearer token was not accepted")
        assert len(await client.app[STORE].find_tasks(limit=100)) == len(before)
        if case in ("act_is_another_agent", "replayed", "not_a_delegator", "role_not_in_scope"):
            # A verified token misused is on the record, with its jti.
            denied = [r for r in await audit(client) if r.event == "access.denied"]
            assert denied and denied[-1].delegation_jti == _claims(delegation)["jti"]
            assert denied[-1].action == "task.start" and delegation not in str(denied[-1])

    async def test_the_agents_own_token_is_checked_first(self, client: Client, site: BrokerSite) -> None:
        """A valid delegation with a bad or missing agent token: 401, and the delegation is not spent."""
        delegation = site.ids.delegation()
        for headers in ({"X-Delegation-Token": delegation},
                        both(site.ids.stranger.mint_svid(AGENT, audience="agent-broker"), delegation),
                        both(site.ids.user(), delegation)):
            resp = await client.post("/v1/tasks", json={"role": "support-triage", "ttl": 60, "reason": "x"},
                                     headers=headers)
            assert resp.status == 401
        assert (await delegated_start(client, site.ids.agent(), delegation)).status == 201

    async def test_a_delegation_token_is_not_the_users_sign_in(self, client: Client, site: BrokerSite) -> None:
        """The agent holding a delegation cannot use it as the user's bearer token anywhere (act is refused),
        whether the IdP marks it ``typ: at+jwt`` (RFC 9068) or plain ``JWT``, with auditor groups or not."""
        at_jwt = site.ids.delegation(groups=("support", "audit"))
        plain = site.ids.idp.encode(_claims(at_jwt), headers={"typ": "JWT"})
        assert (await delegated_start(client, site.ids.agent(), plain)).status == 201  # a valid delegation
        for delegation in (at_jwt, plain):
            resp = await client.post("/v1/tasks", json={"agent": AGENT, "role": "support-triage", "ttl": 60,
                                                        "reason": "x"}, headers=bearer(delegation))
            assert resp.status == 401
            assert (await client.get("/v1/audit", headers=bearer(delegation))).status == 401

    async def test_agent_outside_the_roles_patterns_is_403_and_the_token_unspent(self, client: Client,
                                                                                 site: BrokerSite) -> None:
        """A delegation to an agent the role does not admit: 403 agent_not_allowed as for a user's start; the jti
        is not spent (the catalog refused before it)."""
        delegation = site.ids.delegation(OUTSIDER_AGENT)
        resp = await delegated_start(client, site.ids.agent(OUTSIDER_AGENT), delegation)
        assert resp.status == 403 and (await resp.json())["code"] == "agent_not_allowed"
        jti = _claims(delegation)["jti"]
        assert await client.app[STORE].accept_delegation(issuer=IDP, jti=jti, expires_at=time.time() + 600,
                                                         agent=OUTSIDER_AGENT, now=time.time())

    async def test_body_names_no_agent(self, client: Client, site: BrokerSite) -> None:
        """The agent is the caller: a delegated start that names an agent in its body is a 400."""
        resp = await client.post("/v1/tasks", json={"agent": OTHER_AGENT, "role": "support-triage", "ttl": 60,
                                                    "reason": "x"}, headers=both(site.ids.agent(),
                                                                                 site.ids.delegation()))
        assert resp.status == 400 and "unknown field" in (await resp.json())["detail"]

    async def test_concurrent_replays_start_one_task(self, client: Client, site: BrokerSite) -> None:
        """The same delegation sent 10 times at once: exactly one 201, nine 401."""
        delegation = site.ids.delegation()
        agent = site.ids.agent()
        statuses = sorted([r.status for r in await asyncio.gather(
            *(delegated_start(client, agent, delegation) for _ in range(10)))])
        assert statuses == [201] + [401] * 9


class TestReplayStore:
    async def test_maintenance_forgets_expired_jtis_only(self, client: Client, site: BrokerSite) -> None:
        """The maintenance loop's tick purges jtis whose tokens have expired, and keeps the live ones."""
        from broker.app import MAINTENANCE

        store, now = client.app[STORE], time.time()
        assert await store.accept_delegation(issuer=IDP, jti="old", expires_at=now - 1, agent=AGENT, now=now)
        assert await store.accept_delegation(issuer=IDP, jti="live", expires_at=now + 600, agent=AGENT, now=now)
        await client.app[MAINTENANCE].tick()
        assert await store.accept_delegation(issuer=IDP, jti="old", expires_at=now + 600, agent=AGENT, now=now)
        assert not await store.accept_delegation(issuer=IDP, jti="live", expires_at=now + 600, agent=AGENT, now=now)

    async def test_two_replicas_accept_each_jti_once(self, site: BrokerSite) -> None:
        """Two stores on one PostgreSQL database (two replicas) race 200 jtis, each sent 4 times at once across
        both: every jti is accepted exactly once; purging forgets only the expired ones."""
        import secrets

        from broker.store import open_store

        pg = site.engines.pg
        name = "broker_jti_" + secrets.token_hex(4)
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as conn:
            await conn.execute(f'CREATE DATABASE "{name}"')
        a = await open_store(pg.dsn(name))
        b = await open_store(pg.dsn(name), migrate=False)
        try:
            now = time.time()
            jtis = [f"jti-{i}" for i in range(200)]
            results = await asyncio.gather(*(
                store.accept_delegation(issuer=IDP, jti=j, expires_at=now + (60 if i % 2 else -1), agent=AGENT,
                                        now=now)
                for i, j in enumerate(jtis) for store in (a, b, a, b)))
            accepted = [sum(results[4 * i:4 * i + 4]) for i in range(len(jtis))]
            print(f"\n200 jtis x 4 concurrent attempts over 2 replicas: {sum(accepted)} accepted")
            assert accepted == [1] * 200
            assert await b.purge_delegations(now=now) == 100
            # An unexpired jti is still refused after the purge; the other issuer's same jti is its own token.
            assert not await a.accept_delegation(issuer=IDP, jti="jti-1", expires_at=now + 60, agent=AGENT, now=now)
            assert await a.accept_delegation(issuer="https://other.example", jti="jti-1", expires_at=now + 60,
                                             agent=AGENT, now=now)
        finally:
            await a.close()
            await b.close()
            async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as conn:
                await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


class TestSdk:
    async def test_agent_client_starts_a_delegated_task(self, client: Client, site: BrokerSite) -> None:
        """AgentClient.start_delegated_task sends the header; a second use of the same token is InvalidIdentity."""
        from broker.errors import InvalidIdentity
        from broker.sdk import AgentClient

        url = str(client.make_url("")).rstrip("/")
        delegation = site.ids.delegation(K8S_AGENT)
        async with AgentClient(url, site.ids.k8s_agent) as agent:
            task = await agent.start_delegated_task(delegation, role="support-triage", ttl="5m", reason="sdk")
            assert (task.user, task.agent, task.state) == (USER_ID, K8S_AGENT, "active")
            with pytest.raises(InvalidIdentity):
                await agent.start_delegated_task(delegation, role="support-triage", ttl="5m", reason="again")
            assert (await agent.end_task(task.id)).state == "ended"


class TestNoTokenLeaks:
    async def test_k8s_and_delegation_tokens_appear_in_no_log_store_or_audit_row(
            self, client: Client, site: BrokerSite, caplog: pytest.LogCaptureFixture) -> None:
        """After an accepted, a replayed and a mismatched delegated start and a k8s agent's credential, neither
        the service-account token nor any delegation token is in the log, the audit rows or the store file."""
        import logging

        from tests.api.test_no_secret_leaks import _store_bytes

        caplog.set_level(logging.DEBUG)
        k8s, good, wrong = site.ids.k8s_agent(), site.ids.delegation(K8S_AGENT), site.ids.delegation(OTHER_AGENT)
        resp = await delegated_start(client, k8s, good)
        assert resp.status == 201
        task = await resp.json()
        assert (await delegated_start(client, k8s, good)).status == 401
        assert (await delegated_start(client, k8s, wrong)).status == 401
        await k8s_credential(client, site, task["id"], "agent-cert", token=k8s)
        records = await client.app[STORE].query_audit(limit=1000)
        sinks = {"logs": caplog.text, "audit rows": "\n".join(repr(r.record) for r in records),
                 "store file": _store_bytes(site)}
        tokens = {"service-account token": k8s, "delegation": good, "mismatched delegation": wrong}
        leaks = [(what, where) for what, value in tokens.items() for where, text in sinks.items() if value in text]
        assert leaks == []
        assert _claims(good)["jti"] in sinks["audit rows"]  # the probe finds what is there
