"""The task slice end to end: real OpenBao, a SCRAM PostgreSQL, the broker over HTTP on loopback.

Vault truth (lease and accessor lookups with the root token) and PostgreSQL logins are the oracles,
never the broker's own word.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient

from broker.api import STORE
from broker.states import TaskEvent
from broker.vault import VaultClient
from tests.conftest import AGENT, OTHER_AGENT, OUTSIDER_AGENT, USER, USER_ID, BrokerSite, bearer

Client = TestClient[Any, Any]


async def start_task(client: Client, site: BrokerSite, *, ttl: str = "10m", role: str = "support-triage",
                     agent: str = AGENT, user: str = USER, groups: tuple[str, ...] = ("support",)) -> dict[str, Any]:
    resp = await client.post("/v1/tasks", json={"agent": agent, "role": role, "ttl": ttl, "reason": "ticket 42"},
                             headers=bearer(site.ids.user(user, groups)))
    assert resp.status == 201, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def credential(client: Client, site: BrokerSite, task_id: str, grant: str, *, agent: str = AGENT,
                     ttl: int | None = None, status: int = 200) -> dict[str, Any]:
    body: dict[str, Any] = {"grant": grant}
    if ttl is not None:
        body["ttl"] = ttl
    resp = await client.post(f"/v1/tasks/{task_id}/credentials", json=body, headers=bearer(site.ids.agent(agent)))
    assert resp.status == status, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def end(client: Client, site: BrokerSite, task_id: str) -> dict[str, Any]:
    resp = await client.post(f"/v1/tasks/{task_id}/end", headers=bearer(site.ids.agent()))
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def pg_connect(site: BrokerSite, data: dict[str, Any]) -> psycopg.AsyncConnection[Any]:
    pg = site.engines.pg
    return await psycopg.AsyncConnection.connect(host=pg.host, port=pg.port, dbname="postgres",
                                                 user=data["username"], password=data["password"], connect_timeout=5)


async def vault_lease_id(client: Client, lease_id: str) -> str:
    row = await client.app[STORE].get_lease(lease_id)
    assert row is not None
    return row.vault_lease_id


class TestDatabaseGrant:
    async def test_read_only_credential_reads_and_cannot_write(self, client: Client, site: BrokerSite) -> None:
        """A tickets-db-ro credential logs in to PostgreSQL, may SELECT, and is refused INSERT."""
        task = await start_task(client, site)
        cred = await credential(client, site, task["id"], "tickets-db-ro")
        assert set(cred["data"]) >= {"username", "password"}
        async with await pg_connect(site, cred["data"]) as conn:
            rows = await (await conn.execute("SELECT count(*) FROM tickets")).fetchone()
            assert rows is not None and rows[0] >= 1
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await conn.execute("INSERT INTO tickets (title) VALUES ('written by a read-only agent')")

    async def test_ended_task_credential_stops_working(self, client: Client, site: BrokerSite,
                                                       admin: VaultClient) -> None:
        """After the task ends the password no longer logs in and Vault has no lease for it."""
        task = await start_task(client, site)
        cred = await credential(client, site, task["id"], "tickets-db-ro")
        async with await pg_connect(site, cred["data"]):
            pass
        vault_id = await vault_lease_id(client, cred["lease_id"])
        assert await admin.lookup_lease(vault_id) is not None

        ended = await end(client, site, task["id"])

        assert ended == {"id": task["id"], "state": "ended", "revocation": "revoked", "revoked": 1, "pending": 0}
        assert await admin.lookup_lease(vault_id) is None
        with pytest.raises(psycopg.OperationalError):
            await pg_connect(site, cred["data"])
        resp = await client.get(f"/v1/tasks/{task['id']}", headers=bearer(site.ids.user()))
        view = await resp.json()
        assert [x["state"] for x in view["leases"]] == ["revoked"]


class TestOtherGrants:
    async def test_pki_certificate_is_bound_to_the_task_and_revoked_with_it(
        self, client: Client, site: BrokerSite, admin: VaultClient
    ) -> None:
        """A certificate carries the task in its CN and the agent's SPIFFE ID; its lease dies with the task."""
        task = await start_task(client, site)
        cred = await credential(client, site, task["id"], "agent-cert")
        assert cred["data"]["certificate"].startswith("-----BEGIN CERTIFICATE-----")
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(cred["data"]["certificate"].encode())
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
        assert cn == f"{task['id'].lower()}.agents.example.org" or cn == f"{task['id']}.agents.example.org"
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert AGENT in sans.get_values_for_type(x509.UniformResourceIdentifier)
        vault_id = await vault_lease_id(client, cred["lease_id"])
        assert await admin.lookup_lease(vault_id) is not None
        await end(client, site, task["id"])
        assert await admin.lookup_lease(vault_id) is None

    async def test_child_token_works_until_the_task_ends(self, client: Client, site: BrokerSite,
                                                         admin: VaultClient) -> None:
        """A child-token grant is a real Vault token; ending the task revokes it."""
        task = await start_task(client, site)
        cred = await credential(client, site, task["id"], "child-token")
        token = cred["data"]["token"]
        info = await admin.lookup_self(token=token)
        assert info.ttl > 0
        accessor = await vault_lease_id(client, cred["lease_id"])
        await end(client, site, task["id"])
        assert await admin.lookup_accessor(accessor) is None
        assert cred["renewable"] is False


class TestRefusedIdentity:
    """Each bad token is refused with the same 401, before any work."""

    @pytest.mark.parametrize("case", [
        "unknown_key", "wrong_audience", "expired", "alg_none", "hs256_with_public_key",
        "foreign_trust_domain", "malformed_spiffe_id", "missing", "user_token_as_agent",
    ])
    async def test_bad_agent_tokens_get_401(self, client: Client, site: BrokerSite, case: str) -> None:
        """An unverifiable SVID gets 401 invalid_token with no detail about why."""
        task = await start_task(client, site)
        token = bad_token(site, case)
        headers = bearer(token) if token else {}
        resp = await client.post(f"/v1/tasks/{task['id']}/credentials", json={"grant": "tickets-db-ro"},
                                 headers=headers)
        assert resp.status == 401
        assert resp.headers["Content-Type"].startswith("application/problem+json")
        body = await resp.json()
        assert body["code"] == "invalid_token"
        assert body["detail"] == "the bearer token was not accepted"
        # Nothing was issued.
        view = await (await client.get(f"/v1/tasks/{task['id']}", headers=bearer(site.ids.user()))).json()
        assert view["leases"] == []

    async def test_bad_user_token_cannot_start_a_task(self, client: Client, site: BrokerSite) -> None:
        """A user token signed by an unknown key gets 401 on task start."""
        token = site.ids.stranger.mint_id_token(issuer="https://idp.test.example", subject=USER,
                                                audience="agent-broker", groups=["support"])
        resp = await client.post("/v1/tasks", json={"agent": AGENT, "role": "support-triage", "ttl": 60,
                                                    "reason": "x"}, headers=bearer(token))
        assert resp.status == 401


def bad_token(site: BrokerSite, case: str) -> str:
    ids = site.ids
    if case == "unknown_key":
        return ids.stranger.mint_svid(AGENT, audience="agent-broker")
    if case == "wrong_audience":
        return ids.agent(audience="someone-else")
    if case == "expired":
        return ids.agent(now=time.time() - 3600, ttl=300)
    if case == "alg_none":
        return forge(ids.agent(), alg="none", signature=b"")
    if case == "hs256_with_public_key":
        import hashlib
        import hmac

        import jwt
        from cryptography.hazmat.primitives import serialization

        pub = jwt.PyJWK(ids.spiffe.public_jwk()).key.public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        header, payload, _ = forge(ids.agent(), alg="HS256", signature=b"").split(".")
        sig = hmac.new(pub, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{b64(sig)}"
    if case == "foreign_trust_domain":
        # A partner key is trusted for partner.example only: it must not vouch for example.org.
        return ids.partner.mint_svid(AGENT, audience="agent-broker")
    if case == "malformed_spiffe_id":
        return ids.spiffe.mint_svid("spiffe://example.org/agent/../support-1", audience="agent-broker")
    if case == "missing":
        return ""
    if case == "user_token_as_agent":
        return ids.user()
    raise AssertionError(case)


def b64(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(token: str, *, alg: str, signature: bytes) -> str:
    import base64
    import json

    header_b64, payload, _ = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    header["alg"] = alg
    return f"{b64(json.dumps(header).encode())}.{payload}.{b64(signature)}"


class TestDenied:
    """Decisions that deny answer 403 and leave an access.denied record."""

    async def test_another_agent_cannot_use_the_task(self, client: Client, site: BrokerSite) -> None:
        """support-2 matches the role but is not this task's agent."""
        task = await start_task(client, site)
        body = await credential(client, site, task["id"], "tickets-db-ro", agent=OTHER_AGENT, status=403)
        assert body["code"] == "not_task_agent"

    async def test_user_who_is_not_a_delegator(self, client: Client, site: BrokerSite) -> None:
        """A user outside the role's delegators cannot start the task."""
        resp = await client.post("/v1/tasks", json={"agent": AGENT, "role": "support-triage", "ttl": 60,
                                                    "reason": "x"},
                                 headers=bearer(site.ids.user("mallory@example.com", ("billing",))))
        assert resp.status == 403
        assert (await resp.json())["code"] == "not_delegator"

    async def test_unknown_role_answers_like_a_forbidden_one(self, client: Client, site: BrokerSite) -> None:
        """No oracle for role names: an unknown role gets the same 403 as a role the user may not delegate."""
        resp = await client.post("/v1/tasks", json={"agent": AGENT, "role": "no-such-role", "ttl": 60,
                                                    "reason": "x"}, headers=bearer(site.ids.user()))
        assert resp.status == 403
        assert (await resp.json())["code"] == "not_delegator"

    async def test_agent_outside_the_role_pattern(self, client: Client, site: BrokerSite) -> None:
        """billing-1 does not match spiffe://example.org/agent/support-*."""
        resp = await client.post("/v1/tasks", json={"agent": OUTSIDER_AGENT, "role": "support-triage", "ttl": 60,
                                                    "reason": "x"}, headers=bearer(site.ids.user()))
        assert resp.status == 403
        assert (await resp.json())["code"] == "agent_not_allowed"

    async def test_pattern_does_not_cross_segments(self, client: Client, site: BrokerSite) -> None:
        """support-* must not match support-1/evil."""
        resp = await client.post("/v1/tasks", json={"agent": AGENT + "/evil", "role": "support-triage", "ttl": 60,
                                                    "reason": "x"}, headers=bearer(site.ids.user()))
        assert resp.status == 403

    async def test_grant_outside_the_role(self, client: Client, site: BrokerSite) -> None:
        """tickets-db-rw belongs to billing-report, not to the task's role."""
        task = await start_task(client, site)
        body = await credential(client, site, task["id"], "tickets-db-rw", status=403)
        assert body["code"] == "grant_not_in_role"

    async def test_denials_are_audited(self, client: Client, site: BrokerSite) -> None:
        """A refused grant leaves an access.denied record naming the task's user and the reason."""
        task = await start_task(client, site)
        await credential(client, site, task["id"], "tickets-db-rw", status=403)
        records = await client.app[STORE].query_audit(task=task["id"])
        denied = [r.record for r in records if r.record.event == "access.denied"]
        assert len(denied) == 1
        assert (denied[0].user, denied[0].user_name) == (USER_ID, USER) and denied[0].agent == AGENT and denied[0].outcome == "denied"
        assert "tickets-db-rw" in (denied[0].reason or "")

    async def test_high_risk_grant_waits_for_approval(self, client: Client, site: BrokerSite) -> None:
        """A risk=high grant answers 202 with a pending approval and hands out nothing."""
        task = await start_task(client, site)
        body = await credential(client, site, task["id"], "prod-write", status=202)
        assert body["state"] == "pending" and body["approval_id"].startswith("apr_")
        assert await client.app[STORE].list_leases(task_id=task["id"]) == []


class TestLifetimes:
    async def test_ttl_beyond_the_task_is_capped(self, client: Client, site: BrokerSite,
                                                 admin: VaultClient) -> None:
        """Asking for more than the task has left yields a lease that ends with the task, in Vault too."""
        task = await start_task(client, site, ttl="90s")
        cred = await credential(client, site, task["id"], "agent-cert", ttl=3600)
        assert cred["expires_at"] <= task["expires_at"]
        info = await admin.lookup_lease(await vault_lease_id(client, cred["lease_id"]))
        assert info is not None and info.ttl <= 90

    async def test_database_lease_is_shortened_to_the_cap(self, client: Client, site: BrokerSite,
                                                          admin: VaultClient) -> None:
        """database/creds takes no TTL: the broker shortens the lease to the requested cap."""
        task = await start_task(client, site)
        cred = await credential(client, site, task["id"], "tickets-db-ro", ttl=60)
        info = await admin.lookup_lease(await vault_lease_id(client, cred["lease_id"]))
        assert info is not None and info.ttl <= 60
        assert cred["expires_at"] <= time.time() + 61

    async def test_task_ttl_is_capped_at_the_role_max(self, client: Client, site: BrokerSite) -> None:
        """A 5-hour request on a 30-minute role gives a 30-minute task."""
        task = await start_task(client, site, ttl="5h")
        assert task["expires_at"] - task["created_at"] <= 30 * 60

    async def test_ending_twice_is_harmless(self, client: Client, site: BrokerSite) -> None:
        """The second end answers 200 with nothing more revoked."""
        task = await start_task(client, site)
        await credential(client, site, task["id"], "agent-cert")
        assert (await end(client, site, task["id"]))["revoked"] == 1
        assert await end(client, site, task["id"]) == {"id": task["id"], "state": "ended", "revocation": "revoked",
                                                       "revoked": 0, "pending": 0}

    async def test_no_credential_for_an_ended_task(self, client: Client, site: BrokerSite) -> None:
        """After the end, the agent gets 410 and nothing is issued."""
        task = await start_task(client, site)
        await end(client, site, task["id"])
        body = await credential(client, site, task["id"], "tickets-db-ro", status=410)
        assert body["code"] == "gone"

    async def test_no_credential_right_after_the_end_of_a_task_just_used(self, client: Client,
                                                                          site: BrokerSite) -> None:
        """A task read for one credential a moment ago is still checked for the next: 410 after the end, also
        for a high-risk grant (never an approval asked for an ended task)."""
        task = await start_task(client, site)
        await credential(client, site, task["id"], "agent-cert")
        await end(client, site, task["id"])
        assert (await credential(client, site, task["id"], "agent-cert", status=410))["code"] == "gone"
        assert (await credential(client, site, task["id"], "prod-write", status=410))["code"] == "gone"

    async def test_no_credential_once_another_replica_ended_the_task(self, client: Client,
                                                                     site: BrokerSite) -> None:
        """The end written to the shared store by someone else (another replica) refuses the next credential
        here at once, and the refusal is recorded."""
        task = await start_task(client, site)
        await credential(client, site, task["id"], "agent-cert")
        store = client.app[STORE]
        fenced = await store.fence_tasks([task["id"]], event=TaskEvent.END, now=time.time(), records=[])
        assert [t.id for t in fenced] == [task["id"]]
        assert (await credential(client, site, task["id"], "agent-cert", status=410))["code"] == "gone"
        denied = [link.record for link in await store.iter_chain(limit=10_000)
                  if link.record.event == "access.denied" and link.record.task == task["id"]]
        # Refused before Vault was asked: a refusal after the read would name Vault's path instead.
        assert denied and denied[-1].resource == "grant:agent-cert"

    async def test_renew_never_passes_the_task_end(self, client: Client, site: BrokerSite) -> None:
        """Renewing a database lease is capped at the task's end."""
        task = await start_task(client, site, ttl="2m")
        cred = await credential(client, site, task["id"], "tickets-db-ro", ttl=30)
        resp = await client.post(f"/v1/leases/{cred['lease_id']}/renew", json={"increment": 3600},
                                 headers=bearer(site.ids.agent()))
        assert resp.status == 200, await resp.text()
        renewed = await resp.json()
        assert cred["expires_at"] < renewed["expires_at"] <= task["expires_at"]


class TestVisibility:
    async def test_task_is_visible_to_its_people_only(self, client: Client, site: BrokerSite) -> None:
        """Its user, its agent and an auditor see the task; another user gets the same 404 as a missing one."""
        task = await start_task(client, site)
        url = f"/v1/tasks/{task['id']}"
        assert (await client.get(url, headers=bearer(site.ids.user()))).status == 200
        assert (await client.get(url, headers=bearer(site.ids.agent()))).status == 200
        assert (await client.get(url, headers=bearer(site.ids.user("audrey@example.com", ("audit",))))).status == 200
        other = await client.get(url, headers=bearer(site.ids.user("bob@example.com", ("support",))))
        missing = await client.get("/v1/tasks/tsk_nope", headers=bearer(site.ids.user("bob@example.com")))
        assert other.status == missing.status == 404
        assert (await other.json())["detail"] == (await missing.json())["detail"]

    async def test_audit_is_for_auditors(self, client: Client, site: BrokerSite) -> None:
        """GET /v1/audit answers auditors with the task's records in order, and 403 to anyone else."""
        task = await start_task(client, site)
        await credential(client, site, task["id"], "agent-cert")
        await end(client, site, task["id"])
        assert (await client.get("/v1/audit", headers=bearer(site.ids.user()))).status == 403
        resp = await client.get(f"/v1/audit?task={task['id']}",
                                headers=bearer(site.ids.user("audrey@example.com", ("audit",))))
        assert resp.status == 200
        # The broker's own records; Vault's (vault.request, merged by the tailer) are tests/api/test_vault_merge.py's.
        events = [(r["event"], r["outcome"], r["user"], r["agent"]) for r in (await resp.json())["records"]
                  if not r["event"].startswith("vault.")]
        assert events == [
            ("task.started", "success", USER_ID, AGENT),
            ("lease.issued", "success", USER_ID, AGENT),
            ("task.ended", "success", USER_ID, AGENT),
            ("lease.revoked", "success", USER_ID, AGENT),
        ]


class TestProblems:
    async def test_malformed_body_is_a_400_problem(self, client: Client, site: BrokerSite) -> None:
        """Unknown fields, bad JSON and bad TTLs give 400 problem+json without echoing the input."""
        for body in (b"{not json", b'{"agent": "x", "role": "support-triage", "ttl": 60, "reason": "r", "x": 1}',
                     b'{"agent": "spiffe://example.org/agent/support-1", "role": "support-triage", '
                     b'"ttl": "forever", "reason": "s.AAAAAAAAAAAAAAAAAAAAAAAAsecret"}'):
            resp = await client.post("/v1/tasks", data=body,
                                     headers={**bearer(site.ids.user()), "Content-Type": "application/json"})
            assert resp.status == 400
            assert resp.headers["Content-Type"].startswith("application/problem+json")
            assert "secret" not in await resp.text()

    async def test_health_and_spec(self, client: Client) -> None:
        """Health reports Vault and store; the OpenAPI document lists every route."""
        health = await (await client.get("/v1/health")).json()
        assert health["status"] == "ok" and health["vault"] == "ok" and health["store"] == "ok"
        spec = await (await client.get("/v1/openapi.json")).json()
        assert set(spec["paths"]) >= {"/v1/tasks", "/v1/tasks/{task_id}", "/v1/tasks/{task_id}/credentials",
                                      "/v1/tasks/{task_id}/end", "/v1/leases/{lease_id}/renew", "/v1/audit",
                                      "/v1/health"}
