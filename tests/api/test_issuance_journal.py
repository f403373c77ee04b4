"""Vault's audit device as the issuance journal (broker.journal), end to end against the session OpenBao.

The oracle is Vault's own audit file: every request the task's tokens made during an issuance is counted
there, so "one Vault request per credential" is measured where Vault records it, not where the broker
says it sent something.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from broker.api import STORE
from broker.app import JOURNAL, SETTLER, make_app
from broker.audit import AuditRecord
from broker.dev.stack import DevOpenBao
from broker.intents import IntentEvent, IntentState
from broker.journal import ISSUED
from broker.leases import new_lease_id
from broker.rows import Intent, JournalEntry, LeaseRow
from broker.vault import VaultClient
from tests.api.test_task_flow import Client, credential, start_task
from tests.api.test_vault_merge import window
from tests.conftest import BrokerSite


async def journal_ready(client: Client) -> None:
    deadline = time.monotonic() + 15
    while not client.app[JOURNAL].ready:
        assert time.monotonic() < deadline, "the issuance journal's probe never came back"
        await asyncio.sleep(0.05)


def task_requests(entries: list[dict[str, Any]], task_id: str) -> list[dict[str, Any]]:
    """The response entries of requests made by the task's own tokens (task token or issuance tokens)."""
    return [e for e in entries if e["type"] == "response"
            and ((e.get("auth") or {}).get("metadata") or {}).get("task") == task_id]


async def pki_lease(admin: VaultClient, site: BrokerSite, task_id: str) -> str:
    """A certificate's lease issued straight from Vault (root), named by nothing the broker wrote."""
    secret = await admin.read_credential("pki/issue/agents", token=site.engines.bao.root_token, method="POST",
                                         data={"common_name": f"{task_id}.agents.example.org", "ttl": "5m"})
    assert secret.lease_id and await admin.lookup_lease(secret.lease_id) is not None
    return secret.lease_id


async def _settle_failed_read(client: Client, task_id: str, grant: str, path: str, t0: float, t1: float) -> str:
    """What a read Vault's backend failed leaves in the journal (its request at ``t0``, an error answer at
    ``t1``: broker.journal rule 9), its intent given up, then settled until aborted (30 s at most)."""
    store = client.app[STORE]
    intent_id = new_lease_id()
    await store.merge_vault_audit(moves=[], records=[], tokens={}, now=t1, journal=[
        JournalEntry(intent_id=intent_id, kind="request", task_id=task_id, request_id="rq-" + intent_id, at=t0,
                     failed=False),
        JournalEntry(intent_id=intent_id, kind="response", task_id=task_id, request_id="rq-" + intent_id, at=t1,
                     failed=False, vault_error=True, path=path)])
    await client.app[SETTLER].give_up(Intent(id=intent_id, kind="lease", task_id=task_id, grant=grant,
                                             accessor=None, created_at=t0, journaled=True))
    deadline = time.monotonic() + 30
    while (got := await store.get_intent(intent_id)) is not None and got.state != IntentState.ABORTED:
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.3)
        await client.app[SETTLER].attempt(got)
    return intent_id


class TestOneRequestPerCredential:
    async def test_each_credential_is_one_vault_request_naming_its_lease(self, client: Client,
                                                                         site: BrokerSite) -> None:
        """PKI and database credentials: exactly one request each by the task's tokens, made with the task
        token, carrying the broker's lease id in plain text; no issuance token is created."""
        await journal_ready(client)
        assert client.app[JOURNAL].plain_accessors  # the session's device writes accessors in plain text
        log = Path(site.settings.vault.audit_log or "")
        # Longer than the grants' 10 minutes: no database lease needs shortening to the task's end.
        task = await start_task(client, site, ttl="30m")
        start = log.stat().st_size
        issued = [await credential(client, site, task["id"], g) for g in ("agent-cert", "tickets-db-ro",
                                                                          "agent-cert", "tickets-db-ro")]
        await asyncio.sleep(0.3)  # the device writes synchronously; the read is only the file's
        mine = task_requests(window(log, start), task["id"])
        assert len(mine) == len(issued), [e["request"]["path"] for e in mine]
        assert not [e for e in mine if e["request"]["path"].startswith("auth/token/create")]
        named = sorted(e["request"]["headers"]["x-broker-intent"][0] for e in mine)
        assert named == sorted(c["lease_id"] for c in issued)
        for c in issued:
            intent = await client.app[STORE].get_intent(c["lease_id"])
            assert intent is not None and intent.journaled and intent.state == IntentState.DONE
            lease = await client.app[STORE].get_lease(c["lease_id"])
            assert lease is not None and lease.issuance_accessor is None

    async def test_a_child_token_is_one_request_when_the_device_writes_plain_accessors(
            self, client: Client, site: BrokerSite) -> None:
        """The token's accessor is in the log in plain text: a lost answer can be revoked by it, so the
        task token creates the child itself, one request, with no issuance token."""
        await journal_ready(client)
        log = Path(site.settings.vault.audit_log or "")
        task = await start_task(client, site)
        start = log.stat().st_size
        c = await credential(client, site, task["id"], "child-token")
        await asyncio.sleep(0.3)
        mine = task_requests(window(log, start), task["id"])
        assert [e["request"]["path"] for e in mine] == ["auth/token/create/agent-child"]
        assert mine[0]["request"]["headers"]["x-broker-intent"] == [c["lease_id"]]
        lease = await client.app[STORE].get_lease(c["lease_id"])
        assert lease is not None and lease.issuance_accessor is None
        # What the journal would revoke were the answer lost: the created token's accessor, in plain text.
        assert mine[0]["response"]["auth"]["accessor"] == lease.vault_lease_id

    async def test_token_grants_keep_their_issuance_token_while_the_device_hmacs_accessors(
            self, aiohttp_client: Any, site: BrokerSite) -> None:
        """A lost token-create answer could not be revoked by an HMAC'd accessor: two requests, as before.

        The broker reads the session OpenBao's second device, which keeps Vault's default."""
        assert isinstance(site.engines.bao, DevOpenBao)
        hmac_log = site.engines.bao.hmac_audit_log
        assert hmac_log is not None
        settings = site.settings.model_copy(update={
            "vault": site.settings.vault.model_copy(update={"audit_log": hmac_log}),
            "audit": site.settings.audit.model_copy(update={"vault_device": "hmac"})})
        client = await aiohttp_client(make_app(settings))
        await journal_ready(client)
        assert not client.app[JOURNAL].plain_accessors
        task = await start_task(client, site)
        start = hmac_log.stat().st_size
        c = await credential(client, site, task["id"], "child-token")
        await asyncio.sleep(0.3)
        paths = [e["request"]["path"] for e in task_requests(window(hmac_log, start), task["id"])]
        assert paths == ["auth/token/create", "auth/token/create/agent-child"], paths
        lease = await client.app[STORE].get_lease(c["lease_id"])
        assert lease is not None and lease.issuance_accessor is not None


class TestLateAnswers:
    async def test_an_answer_that_lands_after_its_intent_was_aborted_is_revoked(
            self, client: Client, site: BrokerSite, admin: VaultClient) -> None:
        """The journal shows a lease for an intent already aborted (a read the network delivered late):
        the maintenance loop's sweep revokes it and marks it swept; a second sweep does nothing."""
        task = await start_task(client, site)
        store = client.app[STORE]
        lease_id = await pki_lease(admin, site, task["id"])
        now = time.time()
        intent_id = "lse_latelatelatelatelate0"
        await store.begin_issuance(
            Intent(id=intent_id, kind="lease", task_id=task["id"], grant="agent-cert", accessor=None,
                   created_at=now, journaled=True),
            user=task["user"], user_email=None, agent=task["agent"], tenant=task["tenant"], limits=None)
        assert await store.move_intent(intent_id, from_state=IntentState.OPEN, event=IntentEvent.ABANDONED, now=now)
        assert await store.move_intent(intent_id, from_state=IntentState.ABORTING, event=IntentEvent.VAULT_CONFIRMED,
                                       now=now)
        await store.merge_vault_audit(moves=[], records=[], tokens={}, now=now, journal=[JournalEntry(
            intent_id=intent_id, kind="response", task_id=task["id"], request_id="late-1", at=now, failed=False,
            lease_id=lease_id)])
        settler = client.app[SETTLER]
        assert await settler.sweep_late_answers() == 1
        assert await admin.lookup_lease(lease_id) is None
        assert await settler.sweep_late_answers() == 0
        assert [e.swept for e in await store.journal_for(intent_id)] == [True]

    async def test_a_claimed_intent_is_never_recorded_and_a_recorded_one_is_never_claimed(
            self, client: Client, site: BrokerSite) -> None:
        """The orphan sweep and an issuance recording its answer race for the intent's id (broker.journal
        rule 8): the first writer wins. A recorded answer is only marked checked; an unrecorded one is
        claimed ``aborting`` in its task, and its issuance then records nothing; a refusal is not claimed,
        nor an answer for a task this store does not hold; each answer is looked at once."""
        task = await start_task(client, site)
        store = client.app[STORE]
        row = await store.get_task(task["id"])
        assert row is not None
        now = time.time()  # after the app's start: its own maintenance loop (grace 30 s) leaves these alone
        recorded, claimed, refused = "lse_recordedrecordedrecor0", "lse_claimedclaimedclaimed0", "lse_refusedrefusedrefused0"
        foreign = "lse_foreignforeignforeign0"  # a task this store does not hold: another deployment's
        await store.merge_vault_audit(moves=[], records=[], tokens={}, now=now, journal=[JournalEntry(
            intent_id=i, kind="response", task_id=task["id"], request_id="r-" + i, at=now, failed=i == refused,
            lease_id=None if i == refused else f"database/creds/tickets-ro/{i}") for i in (recorded, claimed, refused)]
            + [JournalEntry(intent_id=foreign, kind="response", task_id="tsk_another_deployments", request_id="r-f",
                            at=now, failed=False, lease_id="database/creds/tickets-ro/theirs")])

        async def record(lease_id: str) -> bool:
            lease = LeaseRow(id=lease_id, task_id=row.id, grant="tickets-db-ro", path="database/creds/tickets-ro",
                             kind="database", vault_lease_id=f"database/creds/tickets-ro/{lease_id}", issued_at=now,
                             expires_at=now + 60, renewable=True, state="active", revoked_at=None)
            return await store.record_issuance(
                Intent(id=lease_id, kind="lease", task_id=row.id, grant="tickets-db-ro", accessor=None,
                       created_at=now, journaled=True), lease,
                AuditRecord.for_task(row, now, "lease.issued", "success", resource=lease.path, action="issue",
                                     lease=lease_id),
                user=row.user, user_email=row.user_email, agent=row.agent, tenant=row.tenant)

        assert await record(recorded)
        assert [e.intent_id for e in await store.claim_orphan_answers(before=now + 1, now=now)] == [claimed]
        intent = await store.get_intent(claimed)
        assert intent is not None and intent.journaled and intent.task_id == row.id
        assert intent.state in ("aborting", "aborted")  # the live settler may have finished it already
        assert not await record(claimed)
        assert await store.get_lease(claimed) is None and await store.get_intent(refused) is None
        assert await store.get_intent(foreign) is None
        done = await store.get_intent(recorded)
        assert done is not None and done.state == "done"
        assert await store.claim_orphan_answers(before=now + 100, now=now) == []

    async def test_a_claimed_orphan_is_revoked_and_its_record_says_where_it_was_read(
            self, client: Client, site: BrokerSite, admin: VaultClient) -> None:
        """Rule 8 to the end: an answer no broker recorded (its broker died after Vault answered) is claimed,
        its lease revoked and confirmed gone in Vault, and the ``lease.aborted`` record names the path the
        lease was read from (the journal's lease id says it), as its ``lease.issued`` would have: the grant
        itself is not in Vault's log."""
        task = await start_task(client, site)
        store = client.app[STORE]
        lease_id = await pki_lease(admin, site, task["id"])
        now = time.time()
        orphan = "lse_orphanorphanorphanorph0"
        await store.merge_vault_audit(moves=[], records=[], tokens={}, now=now, journal=[JournalEntry(
            intent_id=orphan, kind="response", task_id=task["id"], request_id="r-" + orphan, at=now, failed=False,
            lease_id=lease_id)])
        assert [e.intent_id for e in await store.claim_orphan_answers(before=now + 1, now=now)] == [orphan]
        deadline = time.monotonic() + 30
        while (got := await store.get_intent(orphan)) is not None and got.state != IntentState.ABORTED:
            assert time.monotonic() < deadline, got
            await client.app[SETTLER].attempt(got)
            await asyncio.sleep(0.1)
        assert await admin.lookup_lease(lease_id) is None
        [record] = [r.record for r in await store.query_audit(task=task["id"], limit=100)
                    if r.record.event == "lease.aborted" and r.record.lease == orphan]
        assert record.resource == "pki/issue/agents", record.resource
        assert record.user == task["user"] and record.agent == task["agent"]
        assert "names its lease" in (record.reason or "") and "confirmed it is gone" in (record.reason or "")

    async def test_a_lease_a_failed_read_left_behind_is_found_and_revoked(
            self, client: Client, site: BrokerSite, admin: VaultClient) -> None:
        """Rule 9: Vault's backend failed a read (OpenBao can persist a lease whose registration a client's
        disconnect cut short, and answer an error that names nothing). The settler lists the path's leases
        and revokes the one issued between that read's request and answer that nothing names; a lease the
        store names, and one issued before the read, stay."""
        task = await start_task(client, site)
        store = client.app[STORE]

        async def pki() -> str:
            return await pki_lease(admin, site, task["id"])

        before = await pki()
        await asyncio.sleep(2.5)  # more than the search's second of slack
        recorded = await credential(client, site, task["id"], "agent-cert")
        named = await store.get_lease(recorded["lease_id"])
        assert named is not None
        t0 = time.time()
        left = await pki()  # what the failed read left: issued inside its window, named by nothing
        t1 = time.time()
        intent_id = await _settle_failed_read(client, task["id"], "agent-cert", "pki/issue/agents", t0, t1)
        assert await admin.lookup_lease(left) is None
        assert await admin.lookup_lease(before) is not None
        assert await admin.lookup_lease(named.vault_lease_id) is not None
        [record] = [r.record for r in await store.query_audit(task=task["id"], limit=100)
                    if r.record.event == "lease.aborted" and r.record.lease == intent_id]
        assert "found 1 under pki/issue/agents" in (record.reason or ""), record.reason

    async def test_leases_left_behind_reads_with_an_issuance_token_are_found_and_revoked(
            self, client: Client, site: BrokerSite, admin: VaultClient) -> None:
        """Rule 9 for reads made with an issuance token (before the journal was ready, say): revoking that
        token aborted each intent, and cannot reach a lease whose index under it Vault failed to write. The
        maintenance loop lists the path once for both failed reads and revokes the leases issued between
        an intent and its error answer that nothing names; the one the store names, and one issued after
        the answers, stay."""
        task = await start_task(client, site)
        store = client.app[STORE]
        log = Path(site.settings.vault.audit_log or "")
        recorded = await credential(client, site, task["id"], "agent-cert")
        named = await store.get_lease(recorded["lease_id"])
        assert named is not None
        intents = [Intent(id=new_lease_id(), kind="lease", task_id=task["id"], grant="agent-cert", accessor="gone",
                          created_at=time.time()) for _ in range(2)]
        for intent in intents:
            await store.give_up_issuance(intent, retry_at=intent.created_at + 60)
            assert await store.move_intent(intent.id, from_state=IntentState.ABORTING,
                                           event=IntentEvent.VAULT_CONFIRMED, now=time.time())
        left = [await pki_lease(admin, site, task["id"]) for _ in intents]  # what the failed reads left
        t1 = time.time()
        start = log.stat().st_size
        await store.merge_vault_audit(moves=[], records=[], tokens={}, now=t1, journal=[JournalEntry(
            intent_id=intent.id, kind=ISSUED, task_id=task["id"], request_id="rq-" + intent.id, at=t1,
            failed=False, vault_error=True, path="pki/issue/agents") for intent in intents])
        await asyncio.sleep(1.5)  # past the search's second of slack
        after = await pki_lease(admin, site, task["id"])
        deadline = time.monotonic() + 30  # the maintenance loop's (every 2 s), once the journal is read past
        while await store.journal_unsearched():
            assert time.monotonic() < deadline, "the failed reads were never searched"
            await asyncio.sleep(0.2)
        assert [await admin.lookup_lease(x) for x in left] == [None, None]
        assert await admin.lookup_lease(after) is not None
        assert await admin.lookup_lease(named.vault_lease_id) is not None
        lists = [e for e in window(log, start) if e["type"] == "request"
                 and e["request"]["path"] == "sys/leases/lookup/pki/issue/agents/"]
        assert len(lists) == 1, len(lists)

    async def test_a_left_database_lease_whose_role_was_never_made_is_dropped(
            self, client: Client, site: BrokerSite, admin: VaultClient) -> None:
        """Rule 9 with a database lease whose PostgreSQL role does not exist (the failed read never made
        it, or rolled it back): revoking it fails forever ("role does not exist"), so the settler
        force-revokes that one lease, and the intent is aborted instead of retrying for good."""
        import psycopg

        task = await start_task(client, site)
        t0 = time.time()
        secret = await admin.read_credential("database/creds/tickets-ro", token=site.engines.bao.root_token)
        t1 = time.time()
        assert secret.lease_id and secret.data
        async with await psycopg.AsyncConnection.connect(site.engines.pg.dsn(), autocommit=True) as conn:
            name = secret.data["username"]
            await conn.execute(f'REVOKE ALL PRIVILEGES ON ALL TABLES IN SCHEMA public FROM "{name}"')
            await conn.execute(f'DROP ROLE "{name}"')
        await _settle_failed_read(client, task["id"], "tickets-db-ro", "database/creds/tickets-ro", t0, t1)
        assert await admin.lookup_lease(secret.lease_id) is None

