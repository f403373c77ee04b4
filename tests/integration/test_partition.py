"""A network partition between the broker and OpenBao, several times, under load (threat TH-15, issue 15).

The broker runs as ``python -m broker serve`` with ``[vault].addr`` pointing at the loopback fault proxy
(tests/support/faultproxy.py). Agents start tasks and ask for credentials concurrently, mostly database
logins whose creation is slow in PostgreSQL itself (the role's creation statements begin with
``pg_sleep``), so partitions catch reads that Vault is still working on: Vault creates the login and
its answer is lost. Each partition drops all traffic for a few seconds, and the last one also resets
every connection. 30 s after the last heal, Vault truth (root token, OpenBao's direct address) must show
no orphan (live in Vault, not active in the broker) and no ghost (active in the broker, gone in Vault),
with the oracle of the crash test (tests/support/crash.py ``judge``).

Set-up, apart from the rest of the session's OpenBao, as the crash test does: task role
``partition-test`` (tenant ``partco``) with mounts ``database-part/``, ``pki-part/`` and token role
``agent-child-part`` of its own, and a broker token of its own policy.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from broker.config import load_settings
from broker.delegation import Catalog
from broker.dev.config import AgentTrust, BrokerConfig, TaskRole, UserIssuer, example_grants
from broker.dev.stack import DEFAULT_DB_ROLES, RoleSQL, configure_child_token_role, configure_database, configure_pki
from broker.sealing import TokenSealer
from broker.vault.admin import VaultAdmin
from tests.conftest import IDP, TD, Identities, bearer
from tests.support.crash import BrokerProcess, RawVault, StoreSnapshot, Verdict, judge, write_broker_token
from tests.support.faultproxy import FaultProxy
from tests.support.fixtures import BaoEngines

ROLE = "partition-test"
TOKEN_ROLE = f"broker-task-{ROLE}"
BROKER_POLICY = "agent-broker-partition"
CHILD_ROLE = "agent-child-part"
LEASE_PREFIXES = ("pki-part/issue/agents/", "database-part/creds/tickets-ro/")
GRANTS = ("tickets-db-ro", "tickets-db-ro", "tickets-db-ro", "agent-cert", "child-token")
USERS = ("pat@part.example", "pia@part.example")
AGENTS = tuple(f"spiffe://{TD}/agent/part-{i}" for i in range(1, 7))
BOOTSTRAP_TTL = 5
SLOW_CREATE = 0.25  # seconds PostgreSQL sleeps in every login's creation

CUTS = 3
CUT_SECONDS = 3.0
HEALTHY_SECONDS = 4.0
SETTLE_SECONDS = 30.0
MIN_ISSUANCES = 40

def _config(root: Path, *, addr: str, db: Path, broker_root: Path) -> BrokerConfig:
    """This test's broker: the session's identities, its own role over its own mounts, short Vault timeouts."""
    role = TaskRole(name=ROLE, tenant="partco", agents=(f"spiffe://{TD}/agent/part-*",), delegators=("group:part",),
                    max_ttl="30m",
                    grants=example_grants(TD, pki_mount="pki-part", db_mount="database-part", token_role=CHILD_ROLE))
    return BrokerConfig(
        vault_addr=addr, token_file=root / "vault-token", vault_timeout=2, revoke_confirm_timeout=2,
        task_token_bootstrap_ttl=BOOTSTRAP_TTL, store_url=f"sqlite:///{db}", key_file=root / "store.key",
        maintenance={"interval": 0.5, "max_backoff": 2, "intent_grace": 2},
        agents=(AgentTrust(trust_domain=TD, jwks_file=broker_root / "spiffe.jwks"),),
        users=(UserIssuer(issuer=IDP, jwks_file=broker_root / "idp.jwks"),),
        task_roles=(role,),
    )


@pytest.fixture(scope="module")
def partition_root(tmp_path_factory: pytest.TempPathFactory, broker_root: Path, bao_with_engines: BaoEngines) -> Path:
    """This test's keys, Vault mounts (a slow database role), policies, token role and broker token."""
    root = tmp_path_factory.mktemp("partition")
    TokenSealer.generate_key_file(root / "store.key")
    bao = bao_with_engines.bao
    catalog = Catalog.from_settings(load_settings({}, _config(
        root, addr=bao.addr, db=root / "unused.db", broker_root=broker_root).write(root / "probe.toml")))
    ro = DEFAULT_DB_ROLES["tickets-ro"]
    slow = RoleSQL(creation_statements=(f"SELECT pg_sleep({SLOW_CREATE});", *ro.creation_statements),
                   revocation_statements=ro.revocation_statements)

    with VaultAdmin(bao.addr, token=bao.root_token, timeout=30) as admin:
        configure_pki(admin, mount="pki-part")
        configure_child_token_role(admin, role=CHILD_ROLE)
        configure_database(admin, dsn_admin=bao_with_engines.pg.dsn(), mount="database-part",
                           roles={"tickets-ro": slow})
        write_broker_token(admin, catalog, root / "vault-token", policy=BROKER_POLICY)
    return root


@dataclass
class Tally:
    issuances: int = 0
    by_grant: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    task_ids: set[str] = field(default_factory=set)
    delivered: dict[str, str] = field(default_factory=dict)  # broker lease id -> task id


async def agent_loop(base: str, ids: Identities, n: int, tally: Tally, rng: random.Random,
                     stop: asyncio.Event) -> None:
    """Start a task, ask for credentials, now and then end the task and start another, until ``stop``."""
    agent, user = AGENTS[n % len(AGENTS)], USERS[n % len(USERS)]
    agent_auth, user_auth = bearer(ids.agent(agent)), bearer(ids.user(user, ("part",)))
    task: str | None = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        while not stop.is_set():
            try:
                if task is None:
                    async with session.post(base + "/v1/tasks", headers=user_auth, json={
                            "agent": agent, "role": ROLE, "ttl": "20m", "reason": "partition test"}) as r:
                        tally.statuses[r.status] += 1
                        if r.status != 201:
                            await asyncio.sleep(0.2)
                            continue
                        task = str((await r.json())["id"])
                        tally.task_ids.add(task)
                grant = rng.choice(GRANTS)
                async with session.post(f"{base}/v1/tasks/{task}/credentials", headers=agent_auth,
                                        json={"grant": grant}) as r:
                    tally.statuses[r.status] += 1
                    if r.status == 200:
                        body = await r.json()
                        tally.issuances += 1
                        tally.by_grant[grant] += 1
                        tally.delivered[str(body["lease_id"])] = task
                    elif r.status == 410:
                        task = None
                    else:
                        await asyncio.sleep(0.1)
                if task is not None and rng.random() < 0.05:
                    async with session.post(f"{base}/v1/tasks/{task}/end", headers=agent_auth) as r:
                        tally.statuses[r.status] += 1
                    task = None
            except (TimeoutError, aiohttp.ClientError):
                tally.statuses[0] += 1


class TestPartition:
    @pytest.mark.slow
    @pytest.mark.timeout(240)
    async def test_partitions_under_load_leave_no_orphan_and_no_ghost(
        self, partition_root: Path, broker_root: Path, bao_with_engines: BaoEngines, identities: Identities,
        tmp_path: Path,
    ) -> None:
        """3 partitions under concurrent issuance with slow database reads: 30 s after the last heal, 0 orphans
        and 0 ghosts against Vault truth, and every intent settled."""
        bao = bao_with_engines.bao
        u = urlsplit(bao.addr)
        proxy = await FaultProxy(u.hostname or "127.0.0.1", u.port or 8200).start()
        db = tmp_path / "broker.db"
        config = _config(partition_root, addr=proxy.addr, db=db,
                         broker_root=broker_root).write(tmp_path / "broker.toml")
        broker = BrokerProcess(config, tmp_path / "broker.log")
        tally = Tally()
        rng = random.Random(int(time.time()))
        stop = asyncio.Event()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                await broker.wait_healthy(session)
                agents = [asyncio.create_task(agent_loop(broker.base, identities, n, tally, rng, stop))
                          for n in range(len(AGENTS))]
                await asyncio.sleep(HEALTHY_SECONDS)
                for cut in range(CUTS):
                    proxy.drop()
                    await asyncio.sleep(CUT_SECONDS * rng.uniform(0.7, 1.3))
                    if cut == CUTS - 1:
                        proxy.cut()  # the last one also resets every connection it held
                    proxy.heal()
                    last_heal = time.monotonic()
                    await asyncio.sleep(HEALTHY_SECONDS)
                stop.set()
                await asyncio.wait(agents, timeout=30)
                assert broker.alive

                vault = RawVault(session, bao.addr, bao.root_token.reveal())

                async def verdict_now() -> tuple[StoreSnapshot, Verdict]:
                    snap = StoreSnapshot.read(db)
                    return snap, await judge(vault, snap, task_ids=tally.task_ids, delivered=tally.delivered,
                                             token_role=TOKEN_ROLE, child_role=CHILD_ROLE,
                                             lease_prefixes=LEASE_PREFIXES)

                snap, verdict = await verdict_now()
                first_orphans = len(verdict.orphans)
                while (snap.unsettled() or verdict.orphans or verdict.ghosts) and \
                        time.monotonic() < last_heal + SETTLE_SECONDS:
                    await asyncio.sleep(1.0)
                    snap, verdict = await verdict_now()
                settled_after = time.monotonic() - last_heal
        finally:
            stop.set()
            broker.stop()
            await proxy.close()

        intents = Counter(f"{x['kind']}:{x['state']}" for x in snap.intents.values())
        retried = sum(1 for x in snap.intents.values() if x["attempts"] > 0)
        print(f"\ncuts={proxy.drops} issuances={tally.issuances} orphans={len(verdict.orphans)} "
              f"ghosts={len(verdict.ghosts)}")
        print(f"  issuances by grant: {dict(tally.by_grant)}; answers: {dict(sorted(tally.statuses.items()))}")
        print(f"  store: tasks={len(snap.tasks)} leases={dict(Counter(x['state'] for x in snap.leases.values()))} "
              f"intents={dict(intents)} (retried after a failed cleanup: {retried}); audit chain {snap.chain}")
        print(f"  vault: tokens {dict(verdict.vault_tokens)} and {verdict.vault_leases} leases of this test; "
              f"orphans when the load stopped: {first_orphans}; clean {settled_after:.1f}s after the last heal; "
              f"idle issuance tokens (unrecorded, holding nothing, dying with their task)="
              f"{len(verdict.idle_issuance_tokens)}")
        for line in (verdict.orphans + verdict.ghosts + verdict.audit_problems + snap.unsettled())[:40]:
            print("  -", line)
        assert proxy.drops == CUTS
        assert tally.issuances >= MIN_ISSUANCES, tally.issuances
        assert snap.unsettled() == [], snap.unsettled()[:20]
        assert verdict.orphans == [], verdict.orphans[:20]
        assert verdict.ghosts == [], verdict.ghosts[:20]
        assert verdict.audit_problems == [], verdict.audit_problems[:20]
        assert snap.chain.startswith("ok"), snap.chain
