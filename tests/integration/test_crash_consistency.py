"""Crash consistency (threat TH-15, test plan 4.6): SIGKILL the broker at random and at named crash points
during issuance, restart it each time, then check the store against Vault itself.

Set-up, kept apart from the rest of the session's OpenBao so that the accounting sees only this test's
objects: a task role ``crash-test`` (tenant ``crashco``) whose grants live on mounts of its own
(``pki-crash/``, ``database-crash/``, token role ``agent-child-crash``), its task policy and token role
written like ``broker vault sync`` does, and a broker token of a policy of its own
(``agent-broker-crash``), so the session's shared ``agent-broker`` policy is left untouched.

After the kills, one clean start reconciles; then, with the root token:

Orphans (a Vault object that no ACTIVE task in the store owns), by kind:
- task token (token role ``broker-task-crash-test``): owned iff the store has its ``meta.task`` as an
  active task whose ``token_accessor`` is this accessor. (An unrecorded start's token must have died at
  its bootstrap TTL; an ended task's token must be revoked.)
- issuance token (``meta.lease`` set, ``meta.task`` one of this test's tasks): owned iff its task is
  active and the store holds the lease ``meta.lease`` as ``active`` with this ``issuance_accessor`` (or an
  intent still open with this accessor: none is left after reconciliation). A token that no intent and
  no lease names (the broker died between its create and the intent) is *idle*, not an orphan, while its
  task is active, it is not renewable and it expires no later than its task: it holds nothing (every
  lease and child token below must be a recorded one) and dies with its task (``tests.support.crash.judge``).
- agent child token (created through ``auth/token/create/agent-child-crash``): owned iff it is the
  ``vault_lease_id`` of an active ``token`` lease of an active task.
- Vault lease under ``pki-crash/issue/agents/`` or ``database-crash/creds/tickets-ro/``: owned iff it is the
  ``vault_lease_id`` of an active lease of an active task.

The audit trail: every recorded lease has exactly one ``lease.issued`` record (and every such record a lease),
every credential the client received is a recorded lease, and the hash chain verifies.

Ghosts: an active (or revoke_pending) lease in the store whose Vault lease or token is gone. Also reported,
not asserted: "ghost tasks", tasks active in the store whose task token Vault no longer has.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from broker.config import load_settings
from broker.delegation import Catalog
from broker.dev.config import AgentTrust, BrokerConfig, TaskRole, UserIssuer, example_grants
from broker.dev.stack import (
    DEFAULT_DB_ROLES,
    configure_child_token_role,
    configure_database,
    configure_pki,
)
from broker.faults import POINTS
from broker.sealing import TokenSealer
from broker.vault.admin import VaultAdmin
from tests.conftest import IDP, TD, Identities, bearer
from tests.support.crash import BrokerProcess, RawVault, StoreSnapshot, Verdict, judge, write_broker_token
from tests.support.fixtures import BaoEngines

ROLE = "crash-test"
TOKEN_ROLE = f"broker-task-{ROLE}"
BROKER_POLICY = "agent-broker-crash"
CHILD_ROLE = "agent-child-crash"
LEASE_PREFIXES = ("pki-crash/issue/agents/", "database-crash/creds/tickets-ro/")
GRANTS = ("tickets-db-ro", "agent-cert", "child-token")
USERS = ("carl@crash.example", "cora@crash.example")
AGENTS = tuple(f"spiffe://{TD}/agent/crash-{i}" for i in range(1, 7))
BOOTSTRAP_TTL = 5

MIN_KILLS = 20
MIN_ISSUANCES = 200
MAX_ROUNDS = 40
MAX_SECONDS = 150.0

# Task starts are rare next to issuances: their points fire more often to be hit at all.
POINT_CHANCE = {p: (0.05 if p.startswith("issue.") else 0.3) for p in POINTS}


def _config(root: Path, broker_root: Path, *, addr: str, audit_log: Path | None,
            store_url: str = "sqlite:///broker.db") -> BrokerConfig:
    """This test's broker: the session's identities, its own role over its own mounts, fast maintenance, and
    Vault's audit device as its issuance journal (broker.journal: database and PKI credentials are one
    request each, read with the task token; child tokens keep issuance tokens, the device HMACs accessors)."""
    role = TaskRole(name=ROLE, tenant="crashco", agents=(f"spiffe://{TD}/agent/crash-*",), delegators=("group:crash",),
                    max_ttl="30m",
                    grants=example_grants(TD, pki_mount="pki-crash", db_mount="database-crash", token_role=CHILD_ROLE))
    return BrokerConfig(
        vault_addr=addr, audit_log=audit_log, token_file=root / "vault-token", vault_timeout=5, revoke_confirm_timeout=5,
        task_token_bootstrap_ttl=BOOTSTRAP_TTL, store_url=store_url, key_file=root / "store.key",
        maintenance={"interval": 0.5, "max_backoff": 2},
        agents=(AgentTrust(trust_domain=TD, jwks_file=broker_root / "spiffe.jwks"),),
        users=(UserIssuer(issuer=IDP, jwks_file=broker_root / "idp.jwks"),),
        task_roles=(role,),
    )


@pytest.fixture(scope="module")
def crash_root(tmp_path_factory: pytest.TempPathFactory, broker_root: Path, bao_with_engines: BaoEngines,
               identities: Identities) -> Path:
    """This test's config, keys, Vault mounts/policies/token role and broker token (once per module)."""
    root = tmp_path_factory.mktemp("crash")
    TokenSealer.generate_key_file(root / "store.key")
    bao = bao_with_engines.bao
    _config(root, broker_root, addr=bao.addr, audit_log=bao.audit_log).write(root / "broker.toml")
    catalog = Catalog.from_settings(load_settings({}, root / "broker.toml"))

    with VaultAdmin(bao.addr, token=bao.root_token, timeout=30) as admin:
        configure_pki(admin, mount="pki-crash")
        configure_child_token_role(admin, role=CHILD_ROLE)
        configure_database(admin, dsn_admin=bao_with_engines.pg.dsn(), mount="database-crash",
                           roles={"tickets-ro": DEFAULT_DB_ROLES["tickets-ro"]})
        write_broker_token(admin, catalog, root / "vault-token", policy=BROKER_POLICY)
    return root


@dataclass
class Tally:
    kills: int = 0
    by_point: Counter[str] = field(default_factory=Counter)
    issuances: int = 0
    by_grant: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    task_ids: set[str] = field(default_factory=set)
    delivered: dict[str, str] = field(default_factory=dict)  # broker lease id -> task id


class Load:
    """Agents that start tasks, ask for credentials and sometimes end their task, until the broker dies."""

    def __init__(self, base: str, ids: Identities, tally: Tally, rng: random.Random) -> None:
        self._base = base
        self._ids = ids
        self._tally = tally
        self._rng = rng

    async def agent(self, session: aiohttp.ClientSession, n: int) -> None:
        agent = AGENTS[n % len(AGENTS)]
        user = USERS[n % len(USERS)]
        agent_auth = bearer(self._ids.agent(agent))
        user_auth = bearer(self._ids.user(user, ("crash",)))
        task: str | None = None
        t = self._tally
        for _ in range(10_000):  # bounded; in practice the broker dies first
            try:
                if task is None or self._rng.random() < 0.04:
                    async with session.post(self._base + "/v1/tasks", headers=user_auth, json={
                            "agent": agent, "role": ROLE, "ttl": "20m", "reason": "crash test"}) as r:
                        t.statuses[r.status] += 1
                        if r.status != 201:
                            await asyncio.sleep(0.05)
                            continue
                        task = str((await r.json())["id"])
                        t.task_ids.add(task)
                grant = self._rng.choice(GRANTS)
                async with session.post(f"{self._base}/v1/tasks/{task}/credentials", headers=agent_auth,
                                        json={"grant": grant}) as r:
                    t.statuses[r.status] += 1
                    if r.status == 200:
                        body = await r.json()
                        t.issuances += 1
                        t.by_grant[grant] += 1
                        t.delivered[str(body["lease_id"])] = task
                    elif r.status == 410:
                        task = None
                if task is not None and self._rng.random() < 0.06:
                    async with session.post(f"{self._base}/v1/tasks/{task}/end", headers=agent_auth) as r:
                        t.statuses[r.status] += 1
                    task = None
            except (TimeoutError, aiohttp.ClientError):
                return  # the broker died under us


async def one_round(config: Path, ids: Identities, tally: Tally, rng: random.Random, point: str | None,
                    log: Path) -> None:
    """Start the broker (with ``point`` armed), load it, SIGKILL it after a random delay unless it crashed."""
    spec = f"{point}={POINT_CHANCE[point]}" if point else ""
    broker = BrokerProcess(config, log, crash_points=spec)
    try:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            # Half the rounds load the broker only once its issuance journal is on, so that the one-request
            # path (one store transaction after the read: broker.journal rule 8) takes as many kills as the
            # issuance-token path that serves the first moments after every start.
            await broker.wait_healthy(session, journal=rng.random() < 0.5)
            load = Load(broker.base, ids, tally, rng)
            agents = [asyncio.create_task(load.agent(session, n)) for n in range(len(AGENTS))]
            deadline = time.monotonic() + rng.uniform(0.2, 1.5)
            while broker.alive and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            killed_by_us = broker.kill()
            tally.kills += 1
            tally.by_point["random" if killed_by_us else str(point)] += 1
            done, pending = await asyncio.wait(agents, timeout=15)
            for a in pending:
                a.cancel()
            for a in done:
                a.result()
    finally:
        broker.stop()


def judge_crash(vault: RawVault, snap: StoreSnapshot, tally: Tally) -> Awaitable[Verdict]:
    return judge(vault, snap, task_ids=tally.task_ids, delivered=tally.delivered, token_role=TOKEN_ROLE,
                 child_role=CHILD_ROLE, lease_prefixes=LEASE_PREFIXES)


@pytest.mark.slow
class TestCrashConsistency:
    @pytest.mark.timeout(600)
    async def test_sigkill_during_issuance_leaves_no_orphan_and_no_ghost(
        self, crash_root: Path, broker_root: Path, bao_with_engines: BaoEngines, identities: Identities,
        tmp_path: Path,
    ) -> None:
        """At least 20 SIGKILLs over at least 200 issuances, then reconcile: 0 orphans and 0 ghosts in Vault truth."""
        db = tmp_path / "broker.db"
        # A fresh SQLite store for this test; the rest of the config and keys from the module's root.
        config = _config(crash_root, broker_root, addr=bao_with_engines.bao.addr,
                         audit_log=bao_with_engines.bao.audit_log, store_url=f"sqlite:///{db}").write(
                             tmp_path / "broker.toml")
        log = tmp_path / "broker.log"
        rng = random.Random(int(time.time()))
        tally = Tally()
        started = time.monotonic()
        points = list(POINTS)
        rounds = 0
        while rounds < MAX_ROUNDS and time.monotonic() - started < MAX_SECONDS and (
                tally.kills < MIN_KILLS or tally.issuances < MIN_ISSUANCES):
            point = points[(rounds // 2) % len(points)] if rounds % 2 == 0 else None
            await one_round(config, identities, tally, rng, point, log)
            rounds += 1
        last_kill = time.monotonic()
        # Everything the dead processes made Vault write: the clean start must have read it all.
        audit_log = Path(bao_with_engines.bao.audit_log)
        audit_size = audit_log.stat().st_size

        # One clean start: the reconciler resolves every intent of the dead processes.
        broker = BrokerProcess(config, log)
        bao = bao_with_engines.bao
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                await broker.wait_healthy(session)
                # 10-15 s after the last kill here (the clean start takes over at once the revocations the dead
                # processes had claimed: broker.revocations.Maintenance._due_before); an intent whose cleanup
                # Vault did not confirm backs off (up to 2 s) in between, and a loaded host is slower.
                deadline = time.monotonic() + 120
                snap = StoreSnapshot.read(db)
                # This broker's journal works (the session's device records the header): it searches the
                # issuance tokens' failed reads too.
                while (snap.unsettled() or snap.unsearched() or snap.tailer_behind(audit_log, audit_size)) \
                        and time.monotonic() < deadline:
                    await asyncio.sleep(0.25)
                    snap = StoreSnapshot.read(db)
                assert not snap.tailer_behind(audit_log, audit_size), "the tailer never read the kills' Vault entries"
                assert not snap.unsettled(), f"reconciliation did not finish: {snap.unsettled()[:10]}"
                assert not snap.unsearched(), snap.unsearched()[:10]
                reconciled = time.monotonic() - last_kill
                # Unrecorded task tokens die at their bootstrap TTL.
                await asyncio.sleep(max(0.0, last_kill + BOOTSTRAP_TTL + 1 - time.monotonic()))
                broker.stop()
                snap = StoreSnapshot.read(db)
                vault = RawVault(session, bao.addr, bao.root_token.reveal())
                # revoke-accessor answers before Vault has revoked the leases (each database lease runs its
                # revocation statements in PostgreSQL): give it up to 30 s on a slow host.
                verdict = await judge_crash(vault, snap, tally)
                for _ in range(60):
                    if not (verdict.orphans or verdict.ghosts):
                        break
                    await asyncio.sleep(0.5)
                    verdict = await judge_crash(vault, snap, tally)
        finally:
            broker.stop()

        states = Counter(x["state"] for x in snap.leases.values())
        intents = Counter(f"{x['kind']}:{x['state']}" + (":journaled" if x.get("journaled") else "")
                          for x in snap.intents.values())
        print(f"\nkills={tally.kills} issuances={tally.issuances} orphans={len(verdict.orphans)} "
              f"ghosts={len(verdict.ghosts)}")
        print(f"  rounds={rounds} kills by point: {dict(sorted(tally.by_point.items()))}")
        print(f"  issuances by grant: {dict(tally.by_grant)}; answers: {dict(sorted(tally.statuses.items()))}")
        print(f"  store: tasks={len(snap.tasks)} leases={dict(states)} intents={dict(intents)}; "
              f"reconciled {reconciled:.1f}s after the last kill; audit chain {snap.chain}")
        print(f"  vault: tokens {dict(verdict.vault_tokens)} and {verdict.vault_leases} leases of this test; "
              f"ghost tasks (active in the store, token gone)={len(verdict.ghost_tasks)}; "
              f"idle issuance tokens (unrecorded, holding nothing, dying with their task)="
              f"{len(verdict.idle_issuance_tokens)}")
        kinds = Counter(x.split(" (")[0].split(" ", 2)[0] + (": " + x.rsplit(": ", 1)[1].rstrip(")")
                        if "issuance" in x else "") for x in verdict.orphans)
        print(f"  orphans by kind: {dict(kinds)}")
        for line in (verdict.orphans + verdict.ghosts + verdict.ghost_tasks + verdict.audit_problems)[:40]:
            print("  -", line)
        assert tally.kills >= MIN_KILLS and tally.issuances >= MIN_ISSUANCES, (tally.kills, tally.issuances)
        assert verdict.orphans == [], verdict.orphans[:20]
        assert verdict.ghosts == [], verdict.ghosts[:20]
        assert verdict.audit_problems == [], verdict.audit_problems[:20]
        assert snap.chain.startswith("ok"), snap.chain


@pytest.mark.slow
class TestKillRightAfterTheAnswer:
    @pytest.mark.timeout(300)
    async def test_a_credential_handed_out_is_always_recorded(
        self, crash_root: Path, broker_root: Path, bao_with_engines: BaoEngines, identities: Identities,
        tmp_path: Path,
    ) -> None:
        """SIGKILL the broker the moment a credential's answer arrives, each grant kind, several times: the
        store always holds that lease and exactly one ``lease.issued`` record for it, and the chain verifies.
        (The record commits, with ``synchronous=FULL``, before the answer is written.)"""
        db = tmp_path / "broker.db"
        config = _config(crash_root, broker_root, addr=bao_with_engines.bao.addr,
                         audit_log=bao_with_engines.bao.audit_log, store_url=f"sqlite:///{db}").write(
                             tmp_path / "broker.toml")
        log = tmp_path / "broker.log"
        handed_out: list[str] = []
        for round_no in range(len(GRANTS)):  # one round per grant kind: each is a broker start
            broker = BrokerProcess(config, log)
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
                    await broker.wait_healthy(session)
                    user = bearer(identities.user(USERS[0], ("crash",)))
                    async with session.post(broker.base + "/v1/tasks", headers=user, json={
                            "agent": AGENTS[0], "role": ROLE, "ttl": "20m", "reason": "kill after answer"}) as r:
                        assert r.status == 201, await r.text()
                        task = (await r.json())["id"]
                    async with session.post(f"{broker.base}/v1/tasks/{task}/credentials",
                                            headers=bearer(identities.agent(AGENTS[0])),
                                            json={"grant": GRANTS[round_no % len(GRANTS)]}) as r:
                        status = r.status
                        body = await r.read()
                        broker.kill()  # as soon as the answer is in: nothing after it may be needed
                    assert status == 200, body
                    handed_out.append(str(json.loads(body)["lease_id"]))
            finally:
                broker.stop()
        snap = StoreSnapshot.read(db)
        missing = [x for x in handed_out if x not in snap.leases or snap.issued_records.get(x) != 1]
        print(f"\nkilled right after {len(handed_out)} answers; unrecorded: {len(missing)}; chain {snap.chain}")
        assert missing == []
        assert snap.chain.startswith("ok"), snap.chain
