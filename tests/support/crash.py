"""Helpers of the crash-consistency harness: a broker subprocess to SIGKILL, raw Vault listings, a store snapshot.

Nothing here talks to anything but loopback. The broker runs as ``python -m broker serve`` so that a
``SIGKILL`` (ours, or a named crash point's) is exactly what a power cut does to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from broker.audit import AuditRecord, ChainLink, verify_chain
from broker.delegation import Catalog
from broker.errors import AuditChainBroken
from broker.vault.admin import VaultAdmin
from broker.vault.sync import broker_policy_hcl, task_policy_hcl, task_token_role


def write_broker_token(admin: VaultAdmin, catalog: Catalog, token_file: Path, *, policy: str) -> None:
    """What `broker vault sync --write-token` writes, but under a broker policy named ``policy``: the session's
    own `agent-broker` policy (the other tests' broker token) must stay as it is."""
    for role in catalog.roles.values():
        admin.put_policy(role.vault_policy, task_policy_hcl(role))
        admin.put_token_role(role.vault_policy, task_token_role(role))
    admin.put_policy(policy, broker_policy_hcl(catalog))
    auth = admin.create_token(policies=[policy], period="24h", no_parent=True, display_name=policy)
    token_file.write_text(auth.client_token.reveal() + "\n")
    token_file.chmod(0o600)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BrokerProcess:
    """One ``broker serve`` subprocess on a fresh loopback port; ``kill()`` is SIGKILL, ``stop()`` SIGTERM."""

    def __init__(self, config: Path, log: Path, *, crash_points: str = "") -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "VAULT_", "BAO_"))}
        env["BROKER_SERVER_LISTEN"] = f"127.0.0.1:{self.port}"
        if crash_points:
            env["BROKER_CRASH_POINTS"] = crash_points
        self.log_path = log
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", str(config), "--log-level", "warning"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    async def wait_healthy(self, session: aiohttp.ClientSession, timeout: float = 20.0, *,
                           journal: bool = False) -> None:
        """Wait for 200 on /v1/health, and with ``journal`` also for ``issuance_journal: on`` (credentials
        read with the task token, one Vault request: broker.journal).

        Raises: RuntimeError: the broker died or did not get there in time.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"the broker exited with {self.proc.returncode} before it was healthy")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(self.base + "/v1/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200 and (not journal or (await r.json()).get("issuance_journal") == "on"):
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError("the broker did not become healthy in time")

    def kill(self) -> bool:
        """SIGKILL it; True when it was still alive (we killed it), False when it had already died."""
        was_alive = self.alive
        if was_alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()
        return was_alive

    def stop(self) -> None:
        """A clean stop (SIGTERM), SIGKILL after 10 s; harmless when already gone."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if not self._log.closed:
            self._log.close()


# -- Vault truth, with the root token ----------------------------------------------------------------


class RawVault:
    """The few root calls the oracle needs that ``VaultClient`` has no method for (LIST, full lookups)."""

    def __init__(self, session: aiohttp.ClientSession, addr: str, root_token: str) -> None:
        self._session = session
        self._base = addr.rstrip("/") + "/v1/"
        self._headers = {"X-Vault-Token": root_token, "X-Vault-Request": "true"}

    async def list_keys(self, path: str) -> list[str]:
        """LIST ``path``; an empty listing answers 404, returned as []."""
        async with self._session.request("LIST", self._base + path, headers=self._headers) as r:
            if r.status == 404:
                return []
            r.raise_for_status()
            body = await r.json()
        return [str(k) for k in (body.get("data") or {}).get("keys") or []]

    async def _lookup_once(self, accessor: str) -> tuple[str, Mapping[str, Any] | None]:
        """One lookup: ``alive`` with its ``data``; ``tainted`` (403 even to root: Vault is revoking it, or a
        revocation cut short left it unusable until its TTL); ``expired`` (its ``expire_time`` has passed:
        Vault refuses it, and revoke-accessor answers "token not found", but a new active node still
        restoring its leases has not deleted it yet); or ``gone``."""
        async with self._session.post(self._base + "auth/token/lookup-accessor", json={"accessor": accessor},
                                      headers=self._headers) as r:
            if r.status == 400:
                return "gone", None
            if r.status == 403:
                return "tainted", None
            r.raise_for_status()
            data = (await r.json()).get("data")
        if not isinstance(data, dict):
            return "alive", None
        expires = _expire_epoch(data)
        if expires is not None and expires <= time.time():
            return "expired", data
        return "alive", data

    async def lookup_accessor(self, accessor: str) -> Mapping[str, Any] | None:
        """The whole ``data`` of a lookup (meta, path, role...), or None when the token is gone.

        A tainted token: wait for the revocation to finish (bounded), and count it as gone if it is still
        tainted then. An expired one is gone too: Vault refuses it, whatever its storage still holds.
        """
        for _ in range(50):
            status, data = await self._lookup_once(accessor)
            if status == "expired":
                return None
            if status != "tainted":
                return data
            await asyncio.sleep(0.1)
        return None

    async def token_status(self, accessor: str) -> str:
        """One lookup, no waiting: ``alive``, ``tainted``, ``expired`` or ``gone``."""
        return (await self._lookup_once(accessor))[0]

    async def lease_alive(self, lease_id: str) -> bool:
        async with self._session.put(self._base + "sys/leases/lookup", json={"lease_id": lease_id},
                                     headers=self._headers) as r:
            if r.status == 400:
                return False
            r.raise_for_status()
            return True

    async def tokens(self, concurrency: int = 32) -> dict[str, Mapping[str, Any]]:
        """Every live token's lookup, by accessor."""
        accessors = await self.list_keys("auth/token/accessors")
        slots = asyncio.Semaphore(concurrency)

        async def one(a: str) -> tuple[str, Mapping[str, Any] | None]:
            async with slots:
                return a, await self.lookup_accessor(a)

        found = await asyncio.gather(*(one(a) for a in accessors))
        return {a: d for a, d in found if d is not None}

    async def leases_under(self, prefix: str) -> list[str]:
        """Full lease ids under ``prefix`` (one level: the engines' leases sit right under their role path)."""
        return [prefix + k for k in await self.list_keys("sys/leases/lookup/" + prefix) if not k.endswith("/")]


# -- the store, read directly ------------------------------------------------------------------------


# A journaled answer the orphan sweep has not looked at (broker.journal rule 8); probes never need it.
_UNCHECKED = ("SELECT intent_id FROM vault_journal WHERE kind = 'response' AND NOT checked "
              "AND intent_id NOT LIKE 'jpr!_%' ESCAPE '!'")
# A backend error answered to an issuance token, its intent aborted, not yet searched for a leftover lease
# (broker.journal rule 9, IntentSettler.search_failed_reads).
_UNSEARCHED = ("SELECT j.intent_id FROM vault_journal j JOIN intents i ON i.id = j.intent_id AND i.task_id = j.task_id "
               "WHERE j.kind = 'issued' AND j.vault_error AND NOT j.swept AND i.state = 'aborted'")


@dataclass
class StoreSnapshot:
    """What the broker's SQLite store says, read with sqlite3 (WAL: safe next to a running broker)."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    leases: dict[str, dict[str, Any]] = field(default_factory=dict)
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    issued_records: dict[str, int] = field(default_factory=dict)
    chain: str = "not read"  # "ok, N records" or why the audit hash chain does not verify
    # Journaled answers the orphan sweep has not looked at yet (broker.journal rule 8), and how far the
    # tailer has read each Vault audit file (path -> byte offset).
    unchecked_answers: list[str] = field(default_factory=list)
    unsearched_reads: list[str] = field(default_factory=list)
    tailer_offsets: dict[str, int] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> StoreSnapshot:
        snap = cls()
        with _connect(path) as db:
            snap.tasks = {r["id"]: dict(r) for r in db.execute("SELECT * FROM tasks")}
            snap.leases = {r["id"]: dict(r) for r in db.execute("SELECT * FROM leases")}
            snap.intents = {r["id"]: dict(r) for r in db.execute("SELECT * FROM intents")}
            snap.unchecked_answers = [r[0] for r in db.execute(_UNCHECKED)]
            snap.unsearched_reads = [r[0] for r in db.execute(_UNSEARCHED)]
            snap.tailer_offsets = {r[0]: r[1] for r in db.execute(
                'SELECT path, max("offset") FROM vault_audit_position GROUP BY path')}
            snap.issued_records = {r[0]: r[1] for r in db.execute(
                "SELECT lease, count(*) FROM audit_events WHERE event = 'lease.issued' GROUP BY lease")}
            names = tuple(AuditRecord.__dataclass_fields__)
            links = (ChainLink(seq=r["seq"], record=AuditRecord(**{k: r[k] for k in names}),
                               prev_hash=r["prev_hash"], hash=r["hash"])
                     for r in db.execute("SELECT * FROM audit_events ORDER BY seq"))
            try:
                n, _ = verify_chain(links)
                snap.chain = f"ok, {n} records"
            except AuditChainBroken as exc:
                snap.chain = f"broken at record {exc.first_bad_seq}: {exc.reason}"
        return snap

    @classmethod
    def read_url(cls, url: str) -> StoreSnapshot:
        """The same from any SQLAlchemy URL (a PostgreSQL store of several replicas)."""
        from sqlalchemy import create_engine, text

        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        snap = cls()
        try:
            with engine.connect() as db:
                def rows(sql: str) -> list[dict[str, Any]]:
                    return [dict(r) for r in db.execute(text(sql)).mappings()]
                snap.tasks = {r["id"]: r for r in rows("SELECT * FROM tasks")}
                snap.leases = {r["id"]: r for r in rows("SELECT * FROM leases")}
                snap.intents = {r["id"]: r for r in rows("SELECT * FROM intents")}
                snap.unchecked_answers = [r["intent_id"] for r in rows(_UNCHECKED)]
                snap.unsearched_reads = [r["intent_id"] for r in rows(_UNSEARCHED)]
                snap.issued_records = {r["lease"]: r["n"] for r in rows(
                    "SELECT lease, count(*) AS n FROM audit_events WHERE event = 'lease.issued' GROUP BY lease")}
                names = tuple(AuditRecord.__dataclass_fields__)
                links = (ChainLink(seq=r["seq"], record=AuditRecord(**{k: r[k] for k in names}),
                                   prev_hash=r["prev_hash"], hash=r["hash"])
                         for r in db.execute(text("SELECT * FROM audit_events ORDER BY seq")).mappings())
                try:
                    n, _ = verify_chain(links)
                    snap.chain = f"ok, {n} records"
                except AuditChainBroken as exc:
                    snap.chain = f"broken at record {exc.first_bad_seq}: {exc.reason}"
        finally:
            engine.dispose()
        return snap

    @staticmethod
    def vault_request_ids(url: str) -> set[str]:
        """The Vault request ids the chain holds (``vault.*`` records merged from Vault's audit files)."""
        from sqlalchemy import create_engine, text

        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            with engine.connect() as db:
                return {str(r[0]) for r in db.execute(text(
                    "SELECT vault_request_id FROM audit_events WHERE event LIKE 'vault.%' "
                    "AND vault_request_id IS NOT NULL"))}
        finally:
            engine.dispose()

    def unsettled(self) -> list[str]:
        """Why reconciliation is not finished yet (empty when it is)."""
        out = [f"intent {i} {x['kind']} {x['state']} (task {x.get('task_id')}, next attempt at {x.get('next_attempt_at')})"
               for i, x in self.intents.items() if x["state"] in ("open", "aborting")]
        out += [f"task {t} ({x['state']}) token revoke_pending (attempts {x.get('revoke_attempts')}, next at "
                f"{x.get('next_attempt_at')})" for t, x in self.tasks.items() if x["token_state"] == "revoke_pending"]
        out += [f"lease {i} revoke_pending" for i, x in self.leases.items() if x["state"] == "revoke_pending"]
        out += [f"answer {i} not yet looked at by the orphan sweep" for i in self.unchecked_answers]
        return out

    def unsearched(self) -> list[str]:
        """Failed reads of issuance tokens not yet searched for a lease they left (broker.journal rule 9): only
        a broker whose journal works searches them (it vouches that every naming answer was read)."""
        return [f"failed read {i} not yet searched for a lease it left" for i in self.unsearched_reads]

    def tailer_behind(self, audit_log: Path, size: int) -> bool:
        """Whether the tailer has not yet read ``audit_log`` up to ``size`` bytes (its entries, the journal's
        included, are not all in the store yet)."""
        return self.tailer_offsets.get(str(audit_log), 0) < size


@dataclass
class Verdict:
    orphans: list[str]
    ghosts: list[str]
    ghost_tasks: list[str]
    audit_problems: list[str]
    vault_tokens: Counter[str]
    vault_leases: int
    idle_issuance_tokens: list[str] = field(default_factory=list)  # unrecorded, of an active task (see judge)


async def judge(vault: RawVault, snap: StoreSnapshot, *, task_ids: Iterable[str], delivered: Iterable[str],
                token_role: str, child_role: str, lease_prefixes: Sequence[str]) -> Verdict:
    """Compare Vault (root token) with the store: orphans, ghosts, and the audit trail's bookkeeping.

    Orphans (a Vault object that no ACTIVE task in the store owns), by kind:
    - task token (token role ``token_role``): owned iff the store has its ``meta.task`` as an active task
      whose ``token_accessor`` is this accessor.
    - issuance token (``meta.lease`` set, ``meta.task`` one of the test's tasks): owned iff its task is
      active and the store holds the lease ``meta.lease`` as ``active`` with this ``issuance_accessor`` (or
      an intent still open or aborting with this accessor). One more case is not an orphan, but *idle*
      (counted in ``Verdict.idle_issuance_tokens``): a token that no intent and no lease names (its
      create's answer was lost, or the broker died before writing the intent), of a task still active,
      non-renewable and expiring no later than its task. Issuance tokens are born with the task's
      remaining TTL and never renewed (broker.leases rule 2), so it dies with its task; and it holds
      nothing, since every Vault lease and agent child token of the test must be an active lease of the
      store (the two checks below), each read with the issuance token its row names. An unrecorded
      issuance token of a task that is no longer active is an orphan (the task's end must revoke it).
    - agent child token (created through ``auth/token/create/<child_role>``): owned iff it is the
      ``vault_lease_id`` of an active ``token`` lease of an active task.
    - Vault lease under one of ``lease_prefixes``: owned iff it is the ``vault_lease_id`` of an active lease
      of an active task.
    Ghosts: an active (or revoke_pending) lease in the store whose Vault lease or token is gone.
    ``task_ids`` are the tasks the test saw started; ``delivered`` the broker lease ids a client received.
    """
    tokens = await vault.tokens()
    active_tasks = {tid: t for tid, t in snap.tasks.items() if t["state"] == "active"}
    live_leases = {lid: x for lid, x in snap.leases.items() if x["state"] in ("active", "revoke_pending")}
    owned_leases = {x["vault_lease_id"]: lid for lid, x in live_leases.items()
                    if x["state"] == "active" and x["task_id"] in active_tasks}
    ours = set(task_ids) | set(snap.tasks) | {i["task_id"] for i in snap.intents.values()}
    ours |= {str(d.get("meta", {}).get("task")) for d in tokens.values() if d.get("role") == token_role}
    open_accessors = {i["accessor"] for i in snap.intents.values() if i["state"] in ("open", "aborting")}

    orphans: list[str] = []
    idle: list[str] = []
    n_tokens: Counter[str] = Counter()
    for accessor, d in tokens.items():
        meta: Mapping[str, Any] = d.get("meta") or {}
        task_id = str(meta.get("task", ""))
        if d.get("role") == token_role:
            n_tokens["task"] += 1
            t = active_tasks.get(task_id)
            if t is None or t["token_accessor"] != accessor:
                state = snap.tasks[task_id]["state"] if task_id in snap.tasks else "unrecorded"
                orphans.append(f"task token {accessor} of task {task_id} ({state})")
        elif "lease" in meta and task_id in ours:
            n_tokens["issuance"] += 1
            lease = snap.leases.get(str(meta["lease"]))
            owned = task_id in active_tasks and (
                (lease is not None and lease["state"] == "active" and lease["issuance_accessor"] == accessor)
                or accessor in open_accessors)
            intent = snap.intents.get(str(meta["lease"]))
            if not owned and lease is None and intent is None and task_id in active_tasks \
                    and not d.get("renewable") and _expires_by(d, active_tasks[task_id]["expires_at"]):
                idle.append(f"issuance token {accessor} (lease {meta['lease']}, grant {meta.get('grant')})")
            elif not owned:
                why = (f"lease {lease['state']}" if lease else
                       f"intent {intent['state']}" if intent else "no intent, no lease")
                task_state = snap.tasks[task_id]["state"] if task_id in snap.tasks else "unrecorded"
                orphans.append(f"issuance token {accessor} (lease {meta['lease']}, grant {meta.get('grant')}, "
                               f"task {task_state}: {why})")
        elif str(d.get("path", "")).startswith(f"auth/token/create/{child_role}"):
            n_tokens["child"] += 1
            if accessor not in owned_leases:
                orphans.append(f"child token {accessor} not an active lease of an active task")
    vault_leases: list[str] = []
    for prefix in lease_prefixes:
        vault_leases += await vault.leases_under(prefix)
    by_vault_id = {x["vault_lease_id"]: x for x in snap.leases.values()}
    for lease_id in vault_leases:
        if lease_id not in owned_leases:
            # What the store says of it, for the reader of a failure: revoked (Vault not done yet, or not
            # told), of a task no longer active, or unknown (an issuance nobody recorded).
            known = by_vault_id.get(lease_id)
            why = (f"store: lease {known['state']}, task "
                   f"{snap.tasks.get(known['task_id'], {}).get('state', 'unrecorded')}" if known
                   else "unknown to the store")
            orphans.append(f"Vault lease {lease_id} not an active lease of an active task ({why})")

    ghosts: list[str] = []
    for lid, x in live_leases.items():
        alive = (x["vault_lease_id"] in tokens if x["kind"] == "token"
                 else await vault.lease_alive(x["vault_lease_id"]))
        if not alive:
            ghosts.append(f"lease {lid} ({x['grant']}, {x['state']}) is gone in Vault")
    ghost_tasks = [f"task {tid} active but its token is gone" for tid, t in active_tasks.items()
                   if t["token_accessor"] not in tokens]

    audit: list[str] = [f"lease {lid} has {snap.issued_records.get(lid, 0)} lease.issued records"
                        for lid in snap.leases if snap.issued_records.get(lid, 0) != 1]
    audit += [f"lease.issued record for unrecorded lease {lid}" for lid in snap.issued_records
              if lid not in snap.leases]
    audit += [f"credential {lid} was delivered but the store has no lease" for lid in delivered
              if lid not in snap.leases]
    return Verdict(orphans, ghosts, ghost_tasks, audit, n_tokens, len(vault_leases), idle)


def _expire_epoch(lookup: Mapping[str, Any]) -> float | None:
    """A token lookup's ``expire_time`` in epoch seconds; None for a token that never expires."""
    raw = lookup.get("expire_time")
    return dt.datetime.fromisoformat(str(raw)).timestamp() if raw else None


def _expires_by(lookup: Mapping[str, Any], deadline: float) -> bool:
    """The token's ``expire_time`` is no later than ``deadline`` (epoch seconds; 1 s for rounding)."""
    expires = _expire_epoch(lookup)
    # A token that never expires never dies with its task's deadline.
    return expires is not None and expires <= deadline + 1.0


@contextlib.contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(str(path), timeout=30)
    db.row_factory = sqlite3.Row
    try:
        yield db
    finally:
        db.close()
