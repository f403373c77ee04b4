"""Every path that gives up on Vault mid-operation, driven through a partition (threat TH-15).

The broker talks to OpenBao through the loopback fault proxy (tests/support/faultproxy.py);
``drop_after(path)`` lets a request reach OpenBao, so Vault does the work, and then drops everything,
its answer included. The rule under test: what the broker gave up on is final only once Vault
confirms that what it may have created is gone; until then it stays retryable, and the maintenance
loop retries it with backoff. Vault truth comes from the root token on OpenBao's direct address.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient

from broker.api import STORE
from broker.app import JOURNAL, make_app
from broker.config import Settings
from broker.leases import new_lease_id
from broker.sealing import TokenSealer
from broker.vault import VaultClient
from tests.conftest import AGENT, BrokerSite, bearer
from tests.support.crash import RawVault, StoreSnapshot
from tests.support.faultproxy import FaultProxy
from tests.support.pg import pg_login_works

Client = TestClient[Any, Any]
BOOTSTRAP_TTL = 6
DB_PREFIX = "database/creds/tickets-ro/"


@pytest_asyncio.fixture
async def proxy(site: BrokerSite) -> AsyncIterator[FaultProxy]:
    u = urlsplit(site.engines.bao.addr)
    p = await FaultProxy(u.hostname or "127.0.0.1", u.port or 8200).start()
    try:
        yield p
    finally:
        await p.close()


@pytest_asyncio.fixture
async def pclient(site: BrokerSite, proxy: FaultProxy, aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    """The broker with Vault behind the proxy: short timeouts, a fast maintenance loop."""
    client = await aiohttp_client(make_app(_settings(site, proxy, journal=False)))
    # The broker renews its own token once at start-up: let that pass before a test arms renew-self.
    deadline = time.monotonic() + 5
    while proxy.requests["auth/token/renew-self"] == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return client


def _settings(site: BrokerSite, proxy: FaultProxy, *, journal: bool) -> Settings:
    """Vault behind the proxy, short timeouts, a fast maintenance loop; issuance tokens or the journal."""
    s = site.settings
    return s.model_copy(update={
        "vault": s.vault.model_copy(update={"addr": proxy.addr, "timeout": 1.5, "revoke_confirm_timeout": 1.0,
                                            "task_token_bootstrap_ttl": BOOTSTRAP_TTL, "journal": journal}),
        "maintenance": s.maintenance.model_copy(update={"interval": 0.3, "max_backoff": 1.0, "intent_grace": 1.0}),
    })


@pytest_asyncio.fixture
async def jclient(site: BrokerSite, proxy: FaultProxy, aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    """The broker behind the proxy with Vault's audit device as its issuance journal (broker.journal)."""
    client = await aiohttp_client(make_app(_settings(site, proxy, journal=True)))
    await wait_journal(client)
    return client


async def wait_journal(client: Client) -> None:
    deadline = time.monotonic() + 15
    while not client.app[JOURNAL].ready:
        assert time.monotonic() < deadline, "the issuance journal's probe never came back"
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def truth(site: BrokerSite) -> AsyncIterator[tuple[VaultClient, RawVault]]:
    async with aiohttp.ClientSession() as session:
        bao = site.engines.bao
        yield VaultClient(session, bao.addr, token=bao.root_token), RawVault(session, bao.addr,
                                                                             bao.root_token.reveal())


def snapshot(site: BrokerSite) -> StoreSnapshot:
    return StoreSnapshot.read(Path(site.settings.store.url.removeprefix("sqlite:///")))


async def start(client: Client, site: BrokerSite, status: int = 201) -> dict[str, Any]:
    resp = await client.post("/v1/tasks", json={"agent": AGENT, "role": "support-triage", "ttl": "10m",
                                                "reason": "partition drill"}, headers=bearer(site.ids.user()))
    assert resp.status == status, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.2)
    return False


class TestGivingUpOnVault:
    async def test_issuance_whose_answer_is_lost_stays_aborting_until_vault_confirms(
            self, pclient: Client, site: BrokerSite, proxy: FaultProxy,
            truth: tuple[VaultClient, RawVault]) -> None:
        """The read reaches Vault, the partition eats the answer and the first revoke: the intent stays
        aborting and is retried with backoff; it is aborted only after heal, with the token and lease gone."""
        admin, raw = truth
        task = await start(pclient, site)
        before = set(await raw.leases_under(DB_PREFIX))
        proxy.drop_after("database/creds/")
        resp = await pclient.post(f"/v1/tasks/{task['id']}/credentials", json={"grant": "tickets-db-ro"},
                                  headers=bearer(site.ids.agent()))
        assert resp.status == 503, await resp.text()
        assert proxy.dropping
        created = set(await raw.leases_under(DB_PREFIX)) - before
        assert created, "the read reached Vault: it holds a database lease nobody received"
        [(lease_id, intent)] = [(i, x) for i, x in snapshot(site).intents.items() if x["kind"] == "lease"]
        assert intent["state"] == "aborting" and intent["attempts"] >= 1 and intent["next_attempt_at"] is not None
        assert await admin.lookup_accessor(intent["accessor"]) is not None  # the issuance token is alive
        health = await pclient.get("/v1/health")
        assert health.status == 503 and (await health.json())["vault"] == "unreachable"

        await asyncio.sleep(2.5)  # maintenance ticks retry against the partition
        intent = snapshot(site).intents[lease_id]
        assert intent["state"] == "aborting" and intent["attempts"] >= 2, intent
        assert all([await raw.lease_alive(x) for x in created])

        proxy.heal()

        async def aborted() -> bool:
            return bool(snapshot(site).intents[lease_id]["state"] == "aborted")

        assert await wait_for(aborted, timeout=15), snapshot(site).intents[lease_id]
        assert await admin.lookup_accessor(intent["accessor"]) is None
        assert not any([await raw.lease_alive(x) for x in created])
        assert await pclient.app[STORE].get_lease(lease_id) is None
        events = [r.record.event for r in await pclient.app[STORE].query_audit(task=task["id"], limit=100)]
        assert "lease.aborted" in events and "lease.issued" not in events

    async def test_a_read_inside_vault_when_its_task_ends_leaves_no_lease(
            self, pclient: Client, site: BrokerSite, truth: tuple[VaultClient, RawVault]) -> None:
        """Vault checks a token when a request arrives, not when it registers the lease: a read still inside
        Vault while the task's end revokes the token tree creates a lease that no token holds, and OpenBao
        keeps it for its whole TTL. PostgreSQL holds the read here (``pg_authid`` locked, so the login's
        CREATE ROLE waits) while the task ends; then the read lands. The agent gets 410 and nothing: the
        lease its answer named is revoked by that name, since revoking the token no longer reaches it."""
        import psycopg

        _, raw = truth
        task = await start(pclient, site)
        before = set(await raw.leases_under(DB_PREFIX))
        async with await psycopg.AsyncConnection.connect(site.engines.pg.dsn()) as holder:
            await holder.execute("LOCK TABLE pg_authid IN EXCLUSIVE MODE")
            issue = asyncio.create_task(pclient.post(f"/v1/tasks/{task['id']}/credentials",
                                                     json={"grant": "tickets-db-ro"}, headers=bearer(site.ids.agent())))
            await asyncio.sleep(0.3)
            assert not issue.done()
            end = await pclient.post(f"/v1/tasks/{task['id']}/end", headers=bearer(site.ids.agent()))
            assert end.status in (200, 202), await end.text()
            await holder.rollback()  # the read lands: Vault creates the login and registers its lease
        resp = await issue
        assert resp.status == 410, await resp.text()
        [(lease_id, intent)] = [(i, x) for i, x in snapshot(site).intents.items() if x["kind"] == "lease"]
        named = intent["vault_ref"]
        assert named and named.startswith(DB_PREFIX), "the read landed after the task token was revoked"

        async def settled() -> bool:
            return bool(snapshot(site).intents[lease_id]["state"] == "aborted") and not await raw.lease_alive(named)

        assert await wait_for(settled, timeout=15), f"Vault still holds {named}, which no token holds"
        assert set(await raw.leases_under(DB_PREFIX)) <= before
        assert await pclient.app[STORE].get_lease(lease_id) is None

    async def test_a_lost_answer_whose_token_was_revoked_inside_vault_is_found_in_the_audit_log(
            self, pclient: Client, site: BrokerSite, proxy: FaultProxy,
            truth: tuple[VaultClient, RawVault]) -> None:
        """The same race with the answer lost: the read is inside Vault (held in PostgreSQL), the partition
        eats its answer, and the task token's tree is revoked meanwhile (as another replica ending the task
        does). The lease Vault registers then is held by no token and named only by Vault's audit log,
        under the issuance token's metadata: the late-answer sweep revokes it (broker.journal rule 7)."""
        import psycopg

        admin, raw = truth
        task = await start(pclient, site)
        before = set(await raw.leases_under(DB_PREFIX))
        async with await psycopg.AsyncConnection.connect(site.engines.pg.dsn()) as holder:
            await holder.execute("LOCK TABLE pg_authid IN EXCLUSIVE MODE")
            proxy.drop_after("database/creds/")
            resp = await pclient.post(f"/v1/tasks/{task['id']}/credentials", json={"grant": "tickets-db-ro"},
                                      headers=bearer(site.ids.agent()))
            assert resp.status == 503, await resp.text()
            [(lease_id, intent)] = [(i, x) for i, x in snapshot(site).intents.items() if x["kind"] == "lease"]
            assert not intent["journaled"] and intent["state"] == "aborting", intent
            await admin.revoke_accessor(snapshot(site).tasks[task["id"]]["token_accessor"])

            async def issuance_token_gone() -> bool:
                return await raw.lookup_accessor(intent["accessor"]) is None

            assert await wait_for(issuance_token_gone, timeout=10)
            await holder.rollback()  # the read lands: Vault creates the login and registers its lease

        async def landed() -> bool:
            return bool(set(await raw.leases_under(DB_PREFIX)) - before)

        assert await wait_for(landed, timeout=10), "the read registered its lease after its token was revoked"
        created = set(await raw.leases_under(DB_PREFIX)) - before
        proxy.heal()

        async def revoked() -> bool:
            return snapshot(site).intents[lease_id]["state"] == "aborted" and not [
                x for x in created if await raw.lease_alive(x)]

        assert await wait_for(revoked, timeout=20), f"Vault still holds {created}, which no token holds"

    async def test_a_lease_vault_cannot_revoke_keeps_its_task_pending_and_the_rest_is_revoked(
            self, pclient: Client, site: BrokerSite, truth: tuple[VaultClient, RawVault],
            caplog: pytest.LogCaptureFixture) -> None:
        """Vault answers, and refuses: one database login cannot be dropped (it owns a table), so Vault's
        revocation of its lease fails. The end is pending (202), not "Vault did not answer" (503); the
        task's other credential is revoked and its login refused; the refusal is one log line for the
        attempt, with Vault's reason and no credential in it; once the table is gone, the maintenance
        loop's retry revokes the last lease and Vault confirms it."""
        import psycopg

        caplog.set_level(logging.INFO)
        _, raw = truth
        pg = site.engines.pg
        task = await start(pclient, site)
        creds = []
        for _ in range(2):
            resp = await pclient.post(f"/v1/tasks/{task['id']}/credentials", json={"grant": "tickets-db-ro"},
                                      headers=bearer(site.ids.agent()))
            assert resp.status == 200, await resp.text()
            creds.append(await resp.json())
        stuck, other = creds
        table = f"zz_owned_{task['id'][-8:].lower().replace('-', '_')}"
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as conn:
            await conn.execute(f'CREATE TABLE "{table}" (x int)')
            await conn.execute(f'ALTER TABLE "{table}" OWNER TO "{stuck["data"]["username"]}"')
            try:
                end = await pclient.post(f"/v1/tasks/{task['id']}/end", headers=bearer(site.ids.agent()))
                assert end.status == 202, await end.text()
                rows = {c["lease_id"]: await pclient.app[STORE].get_lease(c["lease_id"]) for c in creds}
                assert all(r is not None and r.state == "revoke_pending" for r in rows.values()), rows
                stuck_row, other_row = rows[stuck["lease_id"]], rows[other["lease_id"]]
                assert stuck_row is not None and other_row is not None
                assert await raw.lease_alive(stuck_row.vault_lease_id)
                assert not await raw.lease_alive(other_row.vault_lease_id)
                assert not await pg_login_works(pg, other["data"]["username"], other["data"]["password"])
                refusals = [r.getMessage() for r in caplog.records if "Vault refused" in r.getMessage()]
                assert refusals and f"revoking task {task['id']}: Vault refused 1 of 2 lease revocations (" in (
                    refusals[0]), refusals
                logged = "\n".join(r.getMessage() for r in caplog.records)
                assert all(c["data"]["password"] not in logged for c in creds)
            finally:
                await conn.execute(f'DROP TABLE IF EXISTS "{table}"')

        async def revoked() -> bool:
            got = [await pclient.app[STORE].get_lease(c["lease_id"]) for c in creds]
            return all(x is not None and x.state == "revoked" for x in got)

        assert await wait_for(revoked, timeout=30), [await pclient.app[STORE].get_lease(c["lease_id"]) for c in creds]
        assert not await raw.lease_alive(stuck_row.vault_lease_id)
        assert not await pg_login_works(pg, stuck["data"]["username"], stuck["data"]["password"])

    async def test_task_start_whose_token_create_is_lost_waits_for_the_bootstrap_ttl(
            self, pclient: Client, site: BrokerSite, proxy: FaultProxy,
            truth: tuple[VaultClient, RawVault]) -> None:
        """The task token is created but its accessor never reaches the broker: the intent is aborted only
        once Vault no longer has that token (its bootstrap TTL), never while it is alive."""
        _, raw = truth
        proxy.drop_after("auth/token/create/broker-task-")
        await start(pclient, site, status=503)
        [(task_id, intent)] = [(i, x) for i, x in snapshot(site).intents.items() if x["kind"] == "task"]
        assert intent["state"] == "aborting" and intent["accessor"] is None
        proxy.heal()
        tokens = {a: d for a, d in (await raw.tokens()).items() if (d.get("meta") or {}).get("task") == task_id}
        assert len(tokens) == 1, "the token create reached Vault"
        [accessor] = tokens
        deadline = time.monotonic() + BOOTSTRAP_TTL + 15
        while time.monotonic() < deadline:
            state = snapshot(site).intents[task_id]["state"]
            alive = await raw.lookup_accessor(accessor) is not None
            assert not (state == "aborted" and alive), "aborted while Vault still holds the task token"
            if state == "aborted":
                break
            await asyncio.sleep(0.25)
        assert snapshot(site).intents[task_id]["state"] == "aborted"
        assert await pclient.app[STORE].get_task(task_id) is None

    async def test_task_start_whose_extension_is_lost_is_revoked_once_vault_is_back(
            self, pclient: Client, site: BrokerSite, proxy: FaultProxy,
            truth: tuple[VaultClient, RawVault]) -> None:
        """Vault extends the task token but the answer is lost: the task is revoked, pending until Vault
        confirms, retried by the maintenance loop after heal; the token is gone in Vault at the end."""
        admin, _ = truth
        proxy.drop_after("auth/token/renew-self")
        resp = await pclient.post("/v1/tasks", json={"agent": AGENT, "role": "support-triage", "ttl": "10m",
                                                     "reason": "partition drill"}, headers=bearer(site.ids.user()))
        assert resp.status == 503, await resp.text()
        [task] = [t for t in snapshot(site).tasks.values()]
        assert task["state"] == "revoked" and task["token_state"] == "revoke_pending" and task["revoke_attempts"] >= 1
        info = await admin.lookup_accessor(task["token_accessor"])
        assert info is not None and info.ttl > BOOTSTRAP_TTL  # Vault did extend it
        proxy.heal()

        async def confirmed() -> bool:
            return bool(snapshot(site).tasks[task["id"]]["token_state"] == "revoked")

        assert await wait_for(confirmed, timeout=15)
        assert await admin.lookup_accessor(task["token_accessor"]) is None

    async def test_renewal_whose_answer_is_lost_changes_nothing_the_broker_does_not_list(
            self, pclient: Client, site: BrokerSite, proxy: FaultProxy,
            truth: tuple[VaultClient, RawVault]) -> None:
        """A lost renewal answer: 503, the lease stays active (Vault still has it, so no ghost), no intent is
        left behind, and renewing after heal works."""
        admin, _ = truth
        task = await start(pclient, site)
        resp = await pclient.post(f"/v1/tasks/{task['id']}/credentials", json={"grant": "tickets-db-ro"},
                                  headers=bearer(site.ids.agent()))
        assert resp.status == 200
        lease_id = (await resp.json())["lease_id"]
        row = await pclient.app[STORE].get_lease(lease_id)
        assert row is not None
        proxy.drop_after("sys/leases/renew")
        resp = await pclient.post(f"/v1/leases/{lease_id}/renew", json={"increment": 120},
                                  headers=bearer(site.ids.agent()))
        assert resp.status == 503
        after = await pclient.app[STORE].get_lease(lease_id)
        assert after is not None and after.state == "active" and after.expires_at == row.expires_at
        assert {x["state"] for x in snapshot(site).intents.values()} == {"done"}
        proxy.heal()
        assert await admin.lookup_lease(row.vault_lease_id) is not None
        resp = await pclient.post(f"/v1/leases/{lease_id}/renew", json={"increment": 120},
                                  headers=bearer(site.ids.agent()))
        assert resp.status == 200, await resp.text()

    async def test_end_during_a_partition_is_pending_until_vault_confirms(
            self, pclient: Client, site: BrokerSite, proxy: FaultProxy,
            truth: tuple[VaultClient, RawVault]) -> None:
        """Ending a task while Vault is partitioned away: 503, revoke_pending, still alive in Vault; after heal
        the maintenance loop revokes it, Vault confirms, and the PostgreSQL login is refused."""
        admin, _ = truth
        task = await start(pclient, site)
        resp = await pclient.post(f"/v1/tasks/{task['id']}/credentials", json={"grant": "tickets-db-ro"},
                                  headers=bearer(site.ids.agent()))
        assert resp.status == 200
        cred = await resp.json()
        row = await pclient.app[STORE].get_lease(cred["lease_id"])
        assert row is not None
        proxy.drop()
        resp = await pclient.post(f"/v1/tasks/{task['id']}/end", headers=bearer(site.ids.agent()))
        assert resp.status == 503 and "Retry-After" in resp.headers
        await asyncio.sleep(1.5)
        pending = await pclient.app[STORE].get_lease(cred["lease_id"])
        assert pending is not None and pending.state == "revoke_pending"
        assert await admin.lookup_lease(row.vault_lease_id) is not None
        proxy.heal()

        async def revoked() -> bool:
            x = await pclient.app[STORE].get_lease(cred["lease_id"])
            return x is not None and x.state == "revoked"

        assert await wait_for(revoked, timeout=20)
        assert await admin.lookup_lease(row.vault_lease_id) is None
        assert not await pg_login_works(site.engines.pg, cred["data"]["username"], cred["data"]["password"])


class TestJournaledIssuance:
    """The same faults with one Vault request per credential: the read is made with the task token, and what
    Vault issued for a lost answer is found in Vault's own audit log (broker.journal)."""

    async def _issue_lost(self, jclient: Client, site: BrokerSite, status: int = 503) -> tuple[str, dict[str, Any]]:
        task = await start(jclient, site)
        resp = await jclient.post(f"/v1/tasks/{task['id']}/credentials", json={"grant": "tickets-db-ro"},
                                  headers=bearer(site.ids.agent()))
        assert resp.status == status, await resp.text()
        [(lease_id, intent)] = [(i, x) for i, x in snapshot(site).intents.items() if x["kind"] == "lease"]
        assert intent["journaled"] and intent["accessor"] is None and intent["state"] == "aborting", intent
        return lease_id, task

    async def _issue_held_back(self, jclient: Client, site: BrokerSite, proxy: FaultProxy, raw: RawVault
                               ) -> tuple[dict[str, Any], set[str], str, dict[str, Any]]:
        """A credential request whose read the partition holds back: 503, its intent given up on."""
        task = await start(jclient, site)
        before = set(await raw.leases_under(DB_PREFIX))
        proxy.drop()
        resp = await jclient.post(f"/v1/tasks/{task['id']}/credentials", json={"grant": "tickets-db-ro"},
                                  headers=bearer(site.ids.agent()))
        assert resp.status == 503, await resp.text()
        [(lease_id, intent)] = [(i, x) for i, x in snapshot(site).intents.items() if x["kind"] == "lease"]
        return task, before, lease_id, intent

    async def test_a_lost_answer_is_found_in_vaults_audit_log_and_revoked(
            self, jclient: Client, site: BrokerSite, proxy: FaultProxy,
            truth: tuple[VaultClient, RawVault]) -> None:
        _, raw = truth
        before = set(await raw.leases_under(DB_PREFIX))
        proxy.drop_after("database/creds/")
        lease_id, task = await self._issue_lost(jclient, site)
        created = set(await raw.leases_under(DB_PREFIX)) - before
        assert len(created) == 1, "the read reached Vault: it holds a database lease nobody received"
        proxy.heal()

        async def aborted() -> bool:
            return bool(snapshot(site).intents[lease_id]["state"] == "aborted")

        assert await wait_for(aborted, timeout=20), snapshot(site).intents[lease_id]
        records = [r.record for r in await jclient.app[STORE].query_audit(task=task["id"], limit=100)]
        assert not any([await raw.lease_alive(x) for x in created]), [r.reason for r in records]
        [aborted_record] = [r for r in records if r.event == "lease.aborted"]
        assert "audit log names its lease" in (aborted_record.reason or "")
        assert aborted_record.resource == "database/creds/tickets-ro"  # where Vault was asked, as lease.issued says
        assert "lease.issued" not in [r.event for r in records]

    async def test_an_answer_no_broker_recorded_is_claimed_from_the_journal_and_revoked(
            self, jclient: Client, site: BrokerSite, truth: tuple[VaultClient, RawVault]) -> None:
        """The broker dies between Vault's answer and its one commit: no intent names the read at all. The
        answer, in Vault's audit log under the task token, is claimed by the maintenance loop, and the
        PostgreSQL login it created stops working (broker.journal rule 8); the record names the task."""
        admin, raw = truth
        task = await start(jclient, site)
        store = jclient.app[STORE]
        row = await store.get_task(task["id"])
        assert row is not None
        token = TokenSealer.from_file(site.root / "store.key").open(row.sealed_token, task_id=row.id)
        lease_id = new_lease_id()
        # Exactly what a journaled issuance sends, with no broker left to record the answer.
        secret = await admin.read_credential("database/creds/tickets-ro", token=token, intent=lease_id)
        assert secret.lease_id and await raw.lease_alive(secret.lease_id)
        assert await pg_login_works(site.engines.pg, secret.data["username"], secret.data["password"])

        async def aborted() -> bool:
            intent = await store.get_intent(lease_id)
            return intent is not None and intent.state == "aborted"

        assert await wait_for(aborted, timeout=20), await store.get_intent(lease_id)
        assert not await raw.lease_alive(secret.lease_id)
        assert not await pg_login_works(site.engines.pg, secret.data["username"], secret.data["password"])
        assert await store.get_lease(lease_id) is None
        records = [r.record for r in await store.query_audit(task=task["id"], limit=100)]
        [record] = [r for r in records if r.event == "lease.aborted"]
        assert record.lease == lease_id and record.user == task["user"] and record.agent == task["agent"]
        assert "audit log names its lease" in (record.reason or ""), record.reason

    async def test_a_lost_child_token_is_found_by_its_plain_accessor_and_revoked(
            self, jclient: Client, site: BrokerSite, proxy: FaultProxy,
            truth: tuple[VaultClient, RawVault]) -> None:
        """A child-token grant is one request too (the device writes accessors in plain text): when its
        answer is lost, the token Vault created is found by the accessor the log names, and revoked."""
        _, raw = truth
        assert jclient.app[JOURNAL].plain_accessors
        task = await start(jclient, site)
        before = set(await raw.tokens())
        proxy.drop_after("auth/token/create/")  # the task's own token is made: the grant's is next
        resp = await jclient.post(f"/v1/tasks/{task['id']}/credentials", json={"grant": "child-token"},
                                  headers=bearer(site.ids.agent()))
        assert resp.status == 503, await resp.text()
        [(lease_id, intent)] = [(i, x) for i, x in snapshot(site).intents.items() if x["kind"] == "lease"]
        assert intent["journaled"] and intent["accessor"] is None, intent
        created = {a for a, t in (await raw.tokens()).items() if a not in before and t.get("role") == "agent-child"}
        assert len(created) == 1, "the create reached Vault: it holds a token nobody received"
        proxy.heal()

        async def aborted() -> bool:
            return bool(snapshot(site).intents[lease_id]["state"] == "aborted")

        assert await wait_for(aborted, timeout=20), snapshot(site).intents[lease_id]
        assert [await raw.lookup_accessor(a) for a in created] == [None]
        records = [r.record for r in await jclient.app[STORE].query_audit(task=task["id"], limit=100)]
        [aborted_record] = [r for r in records if r.event == "lease.aborted"]
        assert "audit log names its token" in (aborted_record.reason or "")

    async def test_a_read_the_network_held_back_is_revoked_when_it_lands(
            self, jclient: Client, site: BrokerSite, proxy: FaultProxy,
            truth: tuple[VaultClient, RawVault]) -> None:
        """The broker gives up while the read is still in the network; it reaches Vault after heal. What it
        creates then is revoked: the intent waits for the journal instead of concluding from silence."""
        _, raw = truth
        _, before, lease_id, intent = await self._issue_held_back(jclient, site, proxy, raw)
        assert intent["state"] == "aborting"
        await asyncio.sleep(1.0)
        assert set(await raw.leases_under(DB_PREFIX)) <= before  # still held back (others may expire meanwhile)
        proxy.heal()

        async def settled() -> bool:
            live = [x for x in set(await raw.leases_under(DB_PREFIX)) - before if await raw.lease_alive(x)]
            return not live and snapshot(site).intents[lease_id]["state"] == "aborted"

        assert await wait_for(settled, timeout=25), snapshot(site).intents[lease_id]

    async def test_a_read_that_never_reached_vault_is_aborted_once_the_journal_passes_it(
            self, jclient: Client, site: BrokerSite, proxy: FaultProxy,
            truth: tuple[VaultClient, RawVault]) -> None:
        """Held back, then its connection reset: Vault never saw it. The intent is aborted only after the
        journal was read past the last moment the read could have arrived (a probe moves it)."""
        _, raw = truth
        task, before, lease_id, intent = await self._issue_held_back(jclient, site, proxy, raw)
        proxy.cut()
        proxy.heal()
        created_at = float(intent["created_at"])

        async def aborted() -> bool:
            state = snapshot(site).intents[lease_id]["state"]
            assert not (state == "aborted" and time.time() < created_at + 1.5 + 5.0), "concluded before the deadline"
            return bool(state == "aborted")

        assert await wait_for(aborted, timeout=25), snapshot(site).intents[lease_id]
        assert set(await raw.leases_under(DB_PREFIX)) <= before  # nothing new (others may expire meanwhile)
        records = [r.record for r in await jclient.app[STORE].query_audit(task=task["id"], limit=100)]
        assert any(r.event == "lease.aborted" and "never shows it" in (r.reason or "") for r in records)
