"""THE mutation suite (threats §4.8, TH-19): tamper with a real log every way we know; verify names the first bad record.

One log of 10,050 records is written once through the real store (``_append``, the code path of every
state change) with the real ``Checkpointer`` signing a checkpoint whenever 100 records have passed and
appending it to a witness file. Copies of it are then mutated -- in memory (the links and checkpoint
rows as the store returns them) and, for a sample of each class, with SQL on a copy of the SQLite file
-- under a seeded RNG. For every mutation the expected ``first_bad_seq`` is computed from the
definition in ``broker.audit.verify`` and must be exactly what the verifier reports. A hundred clean logs
of varied sizes and checkpoint spacing must raise no alarm.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import multiprocessing
import os
import random
import shutil
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.audit import GENESIS, AuditRecord, ChainLink, canonical_bytes, chain_hash
from broker.audit.canonical import canonical_record
from broker.audit.checkpoints import Checkpointer, StoreVerifier, checkpoint_of, read_witness
from broker.audit.signing import Checkpoint, sign_checkpoint
from broker.audit.verify import VerifyReport, verify_log
from broker.store import Store, open_store
from broker.store.statements import _append
from tests.support.fixtures import run_coro_in_thread
from tests.support.stretched import as_stored, verify_in_stretches

SEED = 20261128
N_RECORDS = 10_050
TAIL = 50
EVERY = 100
MUTATIONS_PER_CLASS = 130
SQL_PER_CLASS = 2
ORIGIN = "mutation-suite"
CLASSES = ("edit", "delete", "insert", "swap", "truncate", "fork", "wrong_key", "replay")

pytestmark = pytest.mark.timeout(240)


class Clock:
    def __init__(self) -> None:
        self.now = 1_795_877_000.0

    def __call__(self) -> float:
        return self.now


_EVENTS = [("task.started", "success"), ("lease.issued", "success"), ("lease.renewed", "success"),
           ("vault.request", "success"), ("vault.request", "denied"), ("access.denied", "denied"),
           ("task.ended", "success"), ("lease.revoked", "success"), ("vault.unexplained", "failure")]


def random_record(rng: random.Random, now: float) -> AuditRecord:
    event, outcome = rng.choice(_EVENTS)
    n = rng.randrange(1000)
    return AuditRecord(
        now, event, outcome,  # type: ignore[arg-type]
        user=rng.choice([f"user{n % 37}@example.com", "zoë@example.com", None]),
        agent=f"spiffe://example.org/agent/support-{n % 11}", task=f"tsk_{n:04d}",
        tenant=rng.choice(["acme", "globex"]), resource=rng.choice(["database/creds/tickets-ro", "pki/issue/agents"]),
        action=rng.choice(["issue", "read", "end", "renew"]),
        reason=rng.choice([None, "ticket 42", "grant tickets-db-ro, ttl 600s", "\u201cquoted\u201d \\ \"x\""]),
        lease=f"lse_{rng.randrange(10**6):06d}" if rng.random() < 0.5 else None,
        vault_request_id=f"{rng.getrandbits(64):016x}" if event.startswith("vault.") else None,
    )


async def append_batch(store: Store, records: Sequence[AuditRecord]) -> None:
    """Several records in one transaction, through the store's own ``_append`` (redaction, chain, head)."""
    def run() -> None:
        with store._tx() as conn:
            for r in records:
                _append(conn, r)
    await store._run(run)


async def write_log(store: Store, checkpointer: Checkpointer, clock: Clock, rng: random.Random, n: int,
                    max_batch: int) -> None:
    written = 0
    while written < n:
        k = min(rng.randint(1, max_batch), n - written)
        await append_batch(store, [random_record(rng, clock.now + i / 1000) for i in range(k)])
        written += k
        clock.now += rng.uniform(0.01, 2.0)
        await checkpointer.maybe_checkpoint()


async def read_all(store: Store) -> list[ChainLink]:
    links: list[ChainLink] = []
    while page := await store.iter_chain(after_seq=links[-1].seq if links else 0, limit=5000):
        links += page
    return links


@dataclass
class Log:
    db: Path
    witness_file: Path
    links: list[ChainLink]
    checkpoints: list[Checkpoint]
    witness: list[Checkpoint]
    key: Ed25519PrivateKey

    @property
    def sizes(self) -> list[int]:
        return [c.size for c in self.checkpoints]

    def after_last_good(self, size: int) -> int:
        """The definition for a failing checkpoint: 1 + the size of the last checkpoint below it."""
        return max((s for s in self.sizes if s < size), default=0) + 1

    @functools.cached_property
    def free_seqs(self) -> list[int]:
        """Sequence numbers with no checkpoint, above the first one."""
        taken = set(self.sizes)
        return [s for s in range(self.sizes[0] + 1, len(self.links) + 1) if s not in taken]

    def hash_at(self, seq: int) -> bytes:
        return bytes.fromhex(self.links[seq - 1].hash or "") if seq else GENESIS


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Log:
    """The 10,050-record log, written once per module (on a private loop: it is plain data afterwards)."""
    return run_coro_in_thread(_build_log(tmp_path_factory.mktemp("mutations")), timeout=180)


async def _build_log(root: Path) -> Log:
    db, witness = root / "broker.db", root / "witness.txt"
    key = Ed25519PrivateKey.generate()
    store = await open_store(f"sqlite:///{db}")
    clock = Clock()
    checkpointer = Checkpointer(store=store, key=key, origin=ORIGIN, every=EVERY, interval=1e9,
                                witness_file=witness, clock=clock)
    started = time.perf_counter()
    rng = random.Random(SEED)
    await write_log(store, checkpointer, clock, rng, N_RECORDS - TAIL, max_batch=30)
    # The last records after the last checkpoint: the tail no verifier can vouch for (TH-19).
    await append_batch(store, [random_record(rng, clock.now) for _ in range(TAIL)])
    links = await read_all(store)
    cps = [checkpoint_of(r, ORIGIN) for r in await store.list_checkpoints()]
    await store.close()
    print(f"\nlog: {len(links)} records, {len(cps)} checkpoints (last at {cps[-1].size}), written and read in "
          f"{time.perf_counter() - started:.1f} s")
    return Log(db, witness, links, cps, read_witness(witness), key)


# -- the mutations ------------------------------------------------------------------------------------


@dataclass
class Mutation:
    cls: str
    variant: str
    expected: int
    links: list[ChainLink]
    checkpoints: list[Checkpoint]
    use_witness: bool


def _edit_record(rng: random.Random, rec: AuditRecord) -> AuditRecord:
    name = rng.choice(["time", "event", "outcome", "user", "agent", "task", "tenant", "resource", "action", "reason",
                       "lease", "vault_request_id"])
    old = getattr(rec, name)
    if name == "time":
        return dataclasses.replace(rec, time=rec.time + rng.choice([-1.0, 1e-6, 3600.0]))
    if name == "outcome":
        return dataclasses.replace(rec, outcome="denied" if old != "denied" else "success")
    new = rng.choice(["mallory@evil.example", "", "x"]) if old is not None else "planted"
    new = new if new != old else new + "!"
    return dataclasses.replace(rec, **{name: new})


def _rechain(links: list[ChainLink], start: int) -> list[ChainLink]:
    out = links[:start]
    prev = bytes.fromhex(out[-1].hash or "") if out else GENESIS
    for link in links[start:]:
        h = chain_hash(prev, canonical_record(link.record, link.seq))  # canonical_bytes, faster (pinned in test_verify)
        out.append(ChainLink(link.seq, link.record, prev.hex(), h.hex()))
        prev = h
    return out


def mutate(cls: str, log: Log, rng: random.Random, i: int) -> Mutation:
    """Apply one mutation of class ``cls`` to a copy of the log; compute the first bad seq it must produce."""
    links, cps, n, last_cp = list(log.links), list(log.checkpoints), len(log.links), log.sizes[-1]
    alt = i % 2 == 0  # alternate variants; the store-only path is checked without the witness on half
    if cls == "edit":
        k = rng.randint(1, n)
        links[k - 1] = dataclasses.replace(links[k - 1], record=_edit_record(rng, links[k - 1].record))
        return Mutation(cls, "field", k, links, cps, alt)
    if cls == "delete":
        k = rng.randint(1, n - 1)
        del links[k - 1]
        if alt:  # the later rows renumbered to close the gap
            links[k - 1:] = [dataclasses.replace(x, seq=x.seq - 1) for x in links[k - 1:]]
        return Mutation(cls, "renumbered" if alt else "gap", k, links, cps, not alt)
    if cls == "insert":
        k = rng.randint(1, n + 1)
        donor = links[rng.randrange(n)]
        forged = ChainLink(k, _edit_record(rng, donor.record), donor.prev_hash, donor.hash)
        if alt and k > 1:  # a careful forger links it to the previous record; its own hash still cannot match
            forged = dataclasses.replace(forged, prev_hash=links[k - 2].hash)
        links[k - 1:] = [forged] + [dataclasses.replace(x, seq=x.seq + 1) for x in links[k - 1:]]
        return Mutation(cls, "linked" if alt else "copied", k, links, cps, alt)
    if cls == "swap":
        a, b = sorted(rng.sample(range(1, n + 1), 2))
        la, lb = links[a - 1], links[b - 1]
        if alt:  # contents swapped under the same sequence numbers
            links[a - 1], links[b - 1] = dataclasses.replace(lb, seq=a), dataclasses.replace(la, seq=b)
        else:  # rows swapped whole, so the sequence numbers travel with them
            links[a - 1], links[b - 1] = lb, la
        return Mutation(cls, "contents" if alt else "rows", a, links, cps, not alt)
    if cls == "truncate":
        t = rng.randint(1, last_cp)
        del links[t - 1:]
        if alt:  # the store's checkpoints beyond the cut deleted too: only the witness remembers
            return Mutation(cls, "with checkpoints", t, links, [c for c in cps if c.size < t], True)
        return Mutation(cls, "records only", t, links, cps, i % 4 == 1)
    if cls == "fork":
        k = rng.randint(1, last_cp)
        links[k - 1] = dataclasses.replace(links[k - 1], record=_edit_record(rng, links[k - 1].record))
        links = _rechain(links, k - 1)
        if alt:
            return Mutation(cls, "with checkpoints", log.after_last_good(k), links,
                            [c for c in cps if c.size < k], True)
        return Mutation(cls, "records only", log.after_last_good(k), links, cps, i % 4 == 1)
    if cls == "wrong_key":
        other = Ed25519PrivateKey.generate()
        if alt:  # an existing checkpoint re-signed
            c = rng.randrange(len(cps))
            cps[c] = sign_checkpoint(dataclasses.replace(cps[c], note=""), other)
            return Mutation(cls, "re-signed", log.after_last_good(cps[c].size), links, cps, i % 4 == 0)
        s = rng.choice(log.free_seqs)
        forged = sign_checkpoint(Checkpoint(ORIGIN, s, log.hash_at(s), int(time.time())), other)
        cps = sorted([*cps, forged], key=lambda c: c.size)
        return Mutation(cls, "new row", log.after_last_good(s), links, cps, i % 4 == 1)
    if cls == "replay":
        kind = i % 3
        if kind == 0:  # an old checkpoint's note under a newer row's seq and head
            c = rng.randrange(1, len(cps))
            old = cps[rng.randrange(c)]
            cps[c] = dataclasses.replace(cps[c], note=old.note)
            return Mutation(cls, "old note in newer row", log.after_last_good(cps[c].size), links, cps, rng.random() < .5)
        if kind == 1:  # an old note re-inserted as a new row claiming a newer seq (and that seq's true head)
            s = rng.choice(log.free_seqs)
            old = rng.choice([c for c in cps if c.size < s])
            row = dataclasses.replace(old, size=s, head=log.hash_at(s))
            return Mutation(cls, "old note as new row", log.after_last_good(s), links,
                            sorted([*cps, row], key=lambda c: c.size), rng.random() < .5)
        # A validly signed checkpoint of another history (e.g. before a rewrite) for an existing size.
        c = rng.randrange(len(cps))
        other_head = chain_hash(rng.randbytes(32), b"another history")
        cps[c] = sign_checkpoint(Checkpoint(ORIGIN, cps[c].size, other_head, cps[c].time), log.key)
        return Mutation(cls, "other history", log.after_last_good(cps[c].size), links, cps, rng.random() < .5)
    raise AssertionError(cls)


# -- the same mutations with SQL on a copy of the SQLite file ---------------------------------------------


def sql_mutation(cls: str, log: Log, rng: random.Random, db: Path) -> tuple[int, bool]:
    """Mutate the database file; return the expected first bad seq and whether the witness is needed."""
    n, last_cp, sizes = len(log.links), log.sizes[-1], log.sizes
    con = sqlite3.connect(db)
    try:
        if cls == "edit":
            k = rng.randint(1, n)
            con.execute("UPDATE audit_events SET user = 'mallory@evil.example' WHERE seq = ?", (k,))
            expected, witness = k, False
        elif cls == "delete":
            k = rng.randint(1, n - 1)
            con.execute("DELETE FROM audit_events WHERE seq = ?", (k,))
            expected, witness = k, False
        elif cls == "insert":
            k = rng.randint(2, n)
            con.execute("UPDATE audit_events SET seq = -seq - 1 WHERE seq >= ?", (k,))
            con.execute("UPDATE audit_events SET seq = -seq WHERE seq < 0")
            con.execute("INSERT INTO audit_events (seq, time, event, outcome, user, prev_hash, hash) "
                        "SELECT ?, time, 'task.ended', outcome, 'mallory', prev_hash, hash FROM audit_events "
                        "WHERE seq = ?", (k, k + 1))
            expected, witness = k, False
        elif cls == "swap":
            a, b = sorted(rng.sample(range(1, n + 1), 2))
            con.execute("UPDATE audit_events SET seq = CASE seq WHEN ? THEN ? ELSE ? END WHERE seq IN (?, ?)",
                        (a, -b, -a, a, b))
            con.execute("UPDATE audit_events SET seq = -seq WHERE seq < 0")
            expected, witness = a, False
        elif cls == "truncate":
            t = rng.randint(1, last_cp)
            con.execute("DELETE FROM audit_events WHERE seq >= ?", (t,))
            con.execute("DELETE FROM audit_checkpoints WHERE seq >= ?", (t,))
            con.execute("UPDATE audit_head SET seq = ?, hash = ?", (t - 1, log.hash_at(t - 1).hex()))
            expected, witness = t, True
        elif cls == "fork":
            k = rng.randint(1, last_cp)
            con.execute("UPDATE audit_events SET reason = 'rewritten' WHERE seq = ?", (k,))
            _sql_rechain(con, k)
            expected, witness = log.after_last_good(k), False
        elif cls == "wrong_key":
            c = rng.randrange(len(sizes))
            bad = sign_checkpoint(dataclasses.replace(log.checkpoints[c], note=""), Ed25519PrivateKey.generate())
            con.execute("UPDATE audit_checkpoints SET note = ? WHERE seq = ?", (bad.note, sizes[c]))
            expected, witness = log.after_last_good(sizes[c]), False
        else:  # replay: the previous checkpoint's row copied over a newer one (a rolled-back checkpoint)
            c = rng.randrange(1, len(sizes))
            con.execute("UPDATE audit_checkpoints SET note = (SELECT note FROM audit_checkpoints WHERE seq = ?) "
                        "WHERE seq = ?", (sizes[c - 1], sizes[c]))
            expected, witness = log.after_last_good(sizes[c]), False
        con.commit()
    finally:
        con.close()
    return expected, witness


def _sql_rechain(con: sqlite3.Connection, start: int) -> None:
    fields = [f.name for f in dataclasses.fields(AuditRecord)]
    prev = con.execute("SELECT hash FROM audit_events WHERE seq = ?", (start - 1,)).fetchone()
    prev_hash = bytes.fromhex(prev[0]) if prev else GENESIS
    rows = con.execute(f"SELECT seq, {', '.join(fields)} FROM audit_events WHERE seq >= ? ORDER BY seq",
                       (start,)).fetchall()
    for row in rows:
        h = chain_hash(prev_hash, canonical_bytes(AuditRecord(*row[1:]), row[0]))
        con.execute("UPDATE audit_events SET prev_hash = ?, hash = ? WHERE seq = ?", (prev_hash.hex(), h.hex(), row[0]))
        prev_hash = h


# -- the suite ------------------------------------------------------------------------------------------


@dataclass
class Tally:
    mutations: int = 0
    detected: int = 0
    right_seq: int = 0
    per_class: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    misses: list[str] = dataclasses.field(default_factory=list)

    def add(self, m_cls: str, variant: str, expected: int, report: VerifyReport) -> None:
        self.mutations += 1
        self.per_class[m_cls] += 1
        self.detected += not report.ok
        if not report.ok and report.first_bad_seq == expected:
            self.right_seq += 1
        elif len(self.misses) < 10:
            self.misses.append(f"{m_cls}/{variant}: expected {expected}, got {report}")


# The log, for forked workers: set by the test before the pool forks, so it is inherited, never pickled.
_SHARED: list[Log] = []


# Stretch lengths for the parallel path's pure half: at, around and between checkpoint intervals.
_STRETCHES = (97, 100, 1000, 1001, 2500, 3333)


def _check_mutations(jobs: list[tuple[int, int]]) -> tuple[float, list[tuple[str, str, int, VerifyReport]]]:
    """Mutate and verify; each job (i, class) has its own seeded RNG, so results do not depend on the split.

    Half the mutations are verified in stretches too (as the parallel verifier does, one of ``_STRETCHES``),
    over the rows as a store would hold them: that report must be the sequential one over the same rows.
    Returns the CPU seconds spent too: on a shared machine the wall clock says little.
    """
    cpu = time.process_time()
    log = _SHARED[0]
    pub = log.key.public_key()
    out = []
    for i, c in jobs:
        m = mutate(CLASSES[c], log, random.Random(SEED * 10_000 + i * len(CLASSES) + c), i)
        witness = log.witness if m.use_witness else ()
        report = verify_log(m.links, m.checkpoints, pub, witness=witness, origin=ORIGIN)
        out.append((m.cls, m.variant, m.expected, report))
        if (i // 2) % 2:  # half of them (both variants of each class): the suite has a time budget
            continue
        stretch = _STRETCHES[i // 4 % len(_STRETCHES)]
        rows = as_stored(m.links)
        stored = report if rows == m.links else verify_log(rows, m.checkpoints, pub, witness=witness, origin=ORIGIN)
        stretched = verify_in_stretches(m.links, m.checkpoints, pub, stretch=stretch, witness=witness, origin=ORIGIN)
        if stretched != stored:
            out.append((m.cls, f"{m.variant}, in stretches of {stretch}", -1, stretched))
    return time.process_time() - cpu, out


@pytest.mark.slow
async def verify_both(db: Path, pub: Ed25519PublicKey, witness: Path | None) -> tuple[VerifyReport, VerifyReport]:
    """The store file verified in this process and on the parallel path (worker processes reading the
    file, stretches cut at 1001, 2001, ...)."""
    store = await open_store(f"sqlite:///{db}", migrate=False)
    try:
        report = await StoreVerifier(store, pub, ORIGIN, witness).verify()
        parallel = await StoreVerifier(store, pub, ORIGIN, witness, parallel_from=0, workers=2,
                                       stretch=1000).verify()
    finally:
        await store.close()
    return report, parallel


class TestMutationSuite:
    def test_every_mutation_detected_at_the_right_seq(self, log: Log) -> None:
        """>= 1,000 random mutations over 8 classes: 100% detected, each with exactly the defined first_bad_seq."""
        assert verify_log(log.links, log.checkpoints, log.key.public_key(), witness=log.witness, origin=ORIGIN).ok
        jobs = [(i, c) for i in range(MUTATIONS_PER_CLASS) for c in range(len(CLASSES))]
        _SHARED[:] = [log]
        started = time.perf_counter()
        # Two processes (this machine's two cores): the verifier is pure Python and holds the GIL.
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
            parts = list(pool.map(_check_mutations, [jobs[0::2], jobs[1::2]]))
        elapsed = time.perf_counter() - started
        results = [r for _, part in parts for r in part]
        cpu = sum(c for c, _ in parts)
        tally = Tally()
        variants: collections.Counter[str] = collections.Counter()
        for cls, variant, expected, report in results:
            tally.add(cls, variant, expected, report)
            variants[f"{cls}/{variant}"] += 1
        print(f"\nmutations={tally.mutations} detected={tally.detected} right_seq={tally.right_seq} "
              f"({elapsed:.1f} s wall, {cpu:.1f} s CPU in 2 processes, {len(log.links)} records, {len(log.checkpoints)} checkpoints, "
              f"undetectable tail={len(log.links) - log.sizes[-1]} records after the last checkpoint)")
        print("per class: " + " ".join(f"{c}={tally.per_class[c]}" for c in CLASSES))
        print("variants: " + " ".join(f"{v}={n}" for v, n in sorted(variants.items())))
        assert tally.mutations >= 1000
        assert tally.misses == []
        assert tally.detected == tally.right_seq == tally.mutations

    async def test_sql_mutations_on_the_database_file(self, log: Log, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
        """Each class applied with SQL to a copy of the SQLite file, read back and verified through the store."""
        rng = random.Random(SEED + 2)
        tally = Tally()
        pub = log.key.public_key()
        for j in range(SQL_PER_CLASS):
            for cls in CLASSES:
                db = tmp_path / f"{cls}-{j}.db"
                shutil.copyfile(log.db, db)
                expected, needs_witness = sql_mutation(cls, log, rng, db)
                witness = log.witness_file if needs_witness or j else None
                report, parallel = await verify_both(db, pub, witness)
                tally.add(cls, "sql", expected, report)
                assert parallel == report, f"{cls}: parallel {parallel}, sequential {report}"
        print(f"\nsql mutations={tally.mutations} detected={tally.detected} right_seq={tally.right_seq}")
        assert "verifying in this process" not in caplog.text  # the parallel reports came from the workers
        assert tally.misses == []
        assert tally.detected == tally.right_seq == tally.mutations == SQL_PER_CLASS * len(CLASSES)


    async def test_a_value_of_a_type_the_broker_never_writes_is_a_broken_record(self, log: Log,
                                                                                tmp_path: Path) -> None:
        """SQLite stores any type in any column: a BLOB where the broker writes text, text where it writes a
        time. The verifier reports that record as the first bad one (both paths); it does not raise."""
        pub = log.key.public_key()
        k = len(log.links) // 2
        edits = {"blob user": "UPDATE audit_events SET user = CAST('mallory' AS BLOB) WHERE seq = ?",
                 "blob reason": "UPDATE audit_events SET reason = X'00ff' WHERE seq = ?",
                 "text time": "UPDATE audit_events SET time = 'noon' WHERE seq = ?"}
        for name, sql in edits.items():
            db = tmp_path / f"{name.replace(' ', '-')}.db"
            shutil.copyfile(log.db, db)
            con = sqlite3.connect(db)
            con.execute(sql, (k,))
            con.commit()
            con.close()
            report, parallel = await verify_both(db, pub, None)
            assert not report.ok and report.first_bad_seq == k, (name, report)
            assert parallel == report, (name, parallel, report)


def _verifier_workers() -> int:
    """Worker processes of the parallel verifier that this process started and that are alive now."""
    me, n = os.getpid(), 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue  # it ended meanwhile
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        n += ppid == me and b"broker.audit.parallel" in cmdline
    return n


class TestParallelVerifier:
    async def test_auditors_asking_together_wait_for_the_workers_instead_of_starting_more(self, log: Log,
                                                                                         tmp_path: Path) -> None:
        db = tmp_path / "copy.db"
        shutil.copyfile(log.db, db)
        store = await open_store(f"sqlite:///{db}", migrate=False)
        peak = 0

        async def watch() -> None:
            nonlocal peak
            for _ in range(6000):  # bounded: 60 s at most
                peak = max(peak, _verifier_workers())
                await asyncio.sleep(0.01)
        try:
            verifier = StoreVerifier(store, log.key.public_key(), ORIGIN, log.witness_file, parallel_from=0,
                                     workers=2, stretch=1000)
            watcher = asyncio.create_task(watch())
            reports = await asyncio.gather(*(verifier.verify() for _ in range(4)))
            watcher.cancel()
        finally:
            await store.close()
        assert reports[0].ok and reports[0].records == len(log.links)
        assert all(r == reports[0] for r in reports)
        assert 1 <= peak <= 2  # four verifications, never more than one's workers at once


async def reset(store: Store, witness: Path) -> None:
    def run() -> None:
        with store._tx() as conn:
            conn.exec_driver_sql("DELETE FROM audit_events")
            conn.exec_driver_sql("DELETE FROM audit_checkpoints")
            conn.exec_driver_sql(f"UPDATE audit_head SET seq = 0, hash = '{GENESIS.hex()}'")
    await store._run(run)
    witness.unlink(missing_ok=True)


class TestCleanLogs:
    async def test_no_false_alarms(self, tmp_path: Path) -> None:
        """100 clean logs of 200-800 records, checkpoints every 20-250 records or by time: 0 alarms."""
        rng = random.Random(SEED + 3)
        key = Ed25519PrivateKey.generate()
        witness = tmp_path / "witness.txt"
        # The same store code on an in-memory SQLite database: 100 logs without 3,000 fsyncs.
        store = await open_store("sqlite://")
        alarms: list[str] = []
        records = checkpoints = 0
        try:
            for i in range(100):
                await reset(store, witness)
                clock = Clock()
                cp = Checkpointer(store=store, key=key, origin=ORIGIN, every=rng.randint(20, 250),
                                  interval=rng.choice([1e9, 30.0]), witness_file=witness, clock=clock)
                await write_log(store, cp, clock, rng, rng.randint(200, 800), max_batch=rng.choice([10, 60, 150]))
                report = await StoreVerifier(store, key.public_key(), ORIGIN, witness).verify()
                records += report.records
                checkpoints += report.checkpoints
                if not report.ok:
                    alarms.append(f"log {i}: {report}")
        finally:
            await store.close()
        print(f"\nclean_logs=100 false_alarms={len(alarms)} ({records} records, {checkpoints} checkpoints)")
        assert alarms == []
        assert checkpoints >= 100
