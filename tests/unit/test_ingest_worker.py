"""The Vault audit ingest worker: the chain it helps build is the one the broker's own process builds.

The lines are the captured OpenBao entries of ``tests/data/openbao_audit.jsonl`` (a task token starts an
issuance, the issuance token creates an agent's child token without metadata, the child calls Vault),
copied with fresh ids per copy, tasks the store knows, and the child's own call moved a few copies
later, so that it lands in a later chunk than the response that created its token: attributing it needs
the token the worker learned from a chunk the store may not have committed yet. With 4 KiB chunks every
poll is a full chunk, so the tailer catches up through the worker (``broker.audit.ingest``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from broker.audit import AuditRecord
from broker.audit import ingest as ingest_module
from broker.audit import tailer as tailer_module
from broker.audit.canonical import canonical_record, render_record
from broker.audit.ingest import IngestWorker
from broker.audit.tailer import VaultAuditTailer
from broker.errors import StoreUnavailable
from broker.metrics import Metrics
from broker.rows import LookupSource, TaskRow
from broker.store import open_store
from tests.support.pg import PgCluster, scratch_database

DATA = Path(__file__).parent.parent / "data" / "openbao_audit.jsonl"
COPIES = 60
LATER = 3  # copies between the child token's creation and its own call
CHILD = "hmac-sha256:8df5cdf8"  # the accessor of the capture's child token (prefix)
NOW = 1_795_000_000.0


def log_lines() -> bytes:
    """COPIES copies of the capture: ids fresh per copy, the child's lookup-self LATER copies on."""
    capture = DATA.read_text().splitlines()
    copies: list[list[str]] = [[] for _ in range(COPIES + LATER)]
    for k in range(COPIES):
        for line in capture:
            e = json.loads(line)
            e["request"]["id"] = f"c{k}-{e['request']['id']}"
            text = (json.dumps(e).replace("tsk_fixture1", f"tsk_ingest_{k:03d}")
                    .replace("lse_fixture", f"lse_{k:03d}_"))
            accessor = json.loads(text).get("auth", {}).get("accessor", "")
            # The child's accessor made unique per copy wherever it appears (its creation and its use).
            text = text.replace("hmac-sha256:8df5cdf8", f"hmac-sha256:8df5cdf8{k:04d}")
            uses_child = accessor.startswith(CHILD) and e["request"]["path"] == "auth/token/lookup-self"
            copies[k + LATER if uses_child else k].append(text)
    return ("\n".join(line for copy in copies for line in copy) + "\n").encode()


async def store_with_tasks(path: Path) -> None:
    """A migrated SQLite store holding the copies' tasks (as rows: no intent, no audit record of their own)."""
    store = await open_store(f"sqlite:///{path}")
    await store.close()
    rows = task_rows()
    columns = list(rows[0])
    con = sqlite3.connect(path)
    with con:
        con.executemany(f"INSERT INTO tasks ({quoted(columns)}) "
                        f"VALUES ({', '.join('?' * len(columns))})", [tuple(r.values()) for r in rows])
    con.close()


def quoted(columns: list[str]) -> str:
    return ", ".join(f'"{c}"' for c in columns)  # "user" is a keyword in both SQL dialects


def task_rows() -> list[dict[str, Any]]:
    """The copies' tasks, as the tasks table's rows (active over every time the capture holds)."""
    return [dataclasses.asdict(TaskRow(
        id=f"tsk_ingest_{k:03d}", user="alice@example.com", agent="spiffe://example.org/agent/support-1",
        role="support-triage", tenant="acme", reason="ingest", created_at=1.0e9, expires_at=4.0e9,
        state="active", ended_at=None, token_accessor=f"acc{k}", sealed_token=b"\0")) for k in range(COPIES)]


async def merge(db: Path | str, log: Path, *, worker: bool) -> list[tuple[Any, ...]]:
    """Tail ``log`` from its beginning into ``db`` (a SQLite file or a store URL); every stored record (its
    row and hashes), in order."""
    store = await open_store(db if isinstance(db, str) else f"sqlite:///{db}", migrate=False)
    try:
        t = VaultAuditTailer(store=store, path=log, broker_paths=["pki/issue/agents"], start="beginning",
                             chunk_bytes=4096, ingest_worker=worker)
        try:
            await t.step()
            await t.catch_up()
            used = t.ingest_worker is not None
        finally:
            t.close()
        assert used is worker
        return await store.chain_rows(after_seq=0, limit=100_000)
    finally:
        await store.close()


async def reaped(pid: int) -> bool:
    """Whether ``pid`` is gone within 2 s (bounded: a killed process is reaped within a few loop turns)."""
    for _ in range(200):
        try:
            os.kill(pid, 0)  # a zombie still answers: only a reaped process is gone
        except ProcessLookupError:
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.fixture
async def stores(tmp_path: Path) -> tuple[Path, Path, Path]:
    template = tmp_path / "template.db"
    await store_with_tasks(template)
    log = tmp_path / "audit.log"
    log.write_bytes(log_lines())
    a, b = tmp_path / "worker.db", tmp_path / "here.db"
    shutil.copy(template, a)
    shutil.copy(template, b)
    return a, b, log


class TestRenderedRecords:
    def test_the_body_around_the_seq_is_the_canonical_form(self) -> None:
        """A record rendered before its seq is known hashes as the same bytes, for any seq, whatever its
        strings hold (a field that imitates the seq's key included), and comes out redacted."""
        awkward = ['x",\\"seq\\":0,', ',"seq":0,', '\u2028"\\', "", "hvs.CAESIJ" + "a" * 30]
        for i, text in enumerate(awkward):
            rec = AuditRecord(NOW + i / 7, "vault.request", "success", user=text, agent=text, task="tsk_1",
                              resource=text, reason=text, vault_request_id=f"r{i}", caller_address=text or None)
            rendered = render_record(rec)
            for seq in (1, 9, 10, 123_456_789):
                assert rendered.body(seq) == canonical_record(rec.redacted(), seq)
            assert rendered.values == dataclasses.astuple(rec.redacted())
        assert "hvs.CAESIJ" not in repr(render_record(AuditRecord(NOW, "x", "success", reason="hvs.CAESIJ" + "a" * 30)))


class TestIngestWorker:
    async def test_the_worker_builds_the_chain_this_process_builds(self, stores: tuple[Path, Path, Path]) -> None:
        """Same records, same order, same hashes; every child-token call attributed to its task's person."""
        a, b, log = stores
        by_worker = await merge(a, log, worker=True)
        here = await merge(b, log, worker=False)
        assert by_worker == here
        # The child's lookup-self, a chunk or more after its creation, is its task's and its person's.
        # (seq, time, event, outcome, user, agent, task, tenant, resource, ...)
        child_calls = {row[6] for row in here if row[2] == "vault.request" and row[4] == "alice@example.com"
                       and row[8] == "auth/token/lookup-self"}
        assert child_calls >= {f"tsk_ingest_{k:03d}" for k in range(COPIES)}

    @pytest.mark.parametrize(("signum", "why"), [
        # Seen by the answers' reader (EOF) or by the next job's write (a broken pipe), whichever comes first.
        (signal.SIGKILL, "the Vault audit ingest worker stopped"),
        # Alive but silent (it could be stuck on the store): given up on past the answer timeout, and killed.
        (signal.SIGSTOP, "did not answer within 2 s"),
    ], ids=["killed", "silent"])
    async def test_a_worker_lost_midway_loses_and_repeats_nothing(
            self, stores: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
            signum: signal.Signals, why: str) -> None:
        """The worker dies, or stops answering, while chunks are in its hands: the tailer merges the rest in
        its own process, and the chain is the one an in-process merge makes."""
        a, b, log = stores
        here = await merge(b, log, worker=False)
        if signum == signal.SIGSTOP:  # the killed worker keeps the default: a loaded host cannot trip it
            monkeypatch.setattr(ingest_module, "_ANSWER_TIMEOUT", 2.0)
        store = await open_store(f"sqlite:///{a}", migrate=False)
        try:
            metrics = Metrics()
            t = VaultAuditTailer(store=store, path=log, broker_paths=["pki/issue/agents"], start="beginning",
                                 chunk_bytes=4096, metrics=metrics)
            for _ in range(6):
                await t.step()
            worker = t.ingest_worker
            assert worker is not None and worker.pid is not None
            pid = worker.pid
            os.kill(pid, signum)
            with caplog.at_level(logging.WARNING):
                await asyncio.wait_for(t.catch_up(), 120)
            assert t.ingest_worker is None
            assert await reaped(pid), "the lost worker is still there"  # a stopped process still dies of SIGKILL
            t.close()
            assert metrics.get("broker_vault_audit_worker_failures_total") == 1
            assert why in caplog.text and "merging in the broker's process for 60 s" in caplog.text
            rows = await store.chain_rows(after_seq=0, limit=100_000)
        finally:
            await store.close()
        assert rows == here

    async def test_a_new_worker_is_tried_after_the_wait(self, stores: tuple[Path, Path, Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
        """After a failure the tailer merges in its own process for a while, then starts a new worker."""
        a, b, log = stores
        here = await merge(b, log, worker=False)
        monkeypatch.setattr(tailer_module, "_WORKER_RETRY", 0.0)
        store = await open_store(f"sqlite:///{a}", migrate=False)
        try:
            t = VaultAuditTailer(store=store, path=log, broker_paths=["pki/issue/agents"], start="beginning",
                                 chunk_bytes=4096)
            await t.step()
            await t.step()
            first = t.ingest_worker.pid if t.ingest_worker is not None else None
            assert first is not None
            os.kill(first, 9)
            await t.catch_up()
            second = t.ingest_worker.pid if t.ingest_worker is not None else None
            await t.aclose()
            rows = await store.chain_rows(after_seq=0, limit=100_000)
        finally:
            await store.close()
        assert second is not None and second != first
        assert rows == here

    async def test_a_worker_that_cannot_read_the_store_is_left(self, stores: tuple[Path, Path, Path],
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
        """The worker cannot open the store the broker can (its path is gone for it): the tailer says so,
        naming no more than the error's kind, and merges everything itself."""
        a, b, log = stores
        here = await merge(b, log, worker=False)
        store = await open_store(f"sqlite:///{a}", migrate=False)
        real = store.ingest_source

        async def elsewhere() -> LookupSource | None:
            source = await real()
            assert source is not None
            return dataclasses.replace(source, args=(f"file:{a.parent / 'gone.db'}?mode=ro",))

        monkeypatch.setattr(store, "ingest_source", elsewhere)
        try:
            t = VaultAuditTailer(store=store, path=log, broker_paths=["pki/issue/agents"], start="beginning",
                                 chunk_bytes=4096)
            await t.step()
            with caplog.at_level(logging.WARNING):
                await t.catch_up()
            await t.aclose()
            rows = await store.chain_rows(after_seq=0, limit=100_000)
        finally:
            await store.close()
        assert "merging in the broker's process for 60 s" in caplog.text
        assert "gone.db" not in caplog.text
        assert rows == here

    async def test_a_failed_commit_drops_what_was_prepared_after_it(self, stores: tuple[Path, Path, Path],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        """A merge transaction fails with chunks in the worker's hands: the next polls start again at the
        stored position and the chain is the one merged without any failure."""
        a, b, log = stores
        here = await merge(b, log, worker=False)
        store = await open_store(f"sqlite:///{a}", migrate=False)
        real = store.merge_vault_audit
        calls = 0

        async def flaky(**kwargs: Any) -> None:
            nonlocal calls
            calls += 1
            if calls in (4, 9):
                raise StoreUnavailable("the store is unavailable", reason="injected")
            await real(**kwargs)

        monkeypatch.setattr(store, "merge_vault_audit", flaky)
        try:
            t = VaultAuditTailer(store=store, path=log, broker_paths=["pki/issue/agents"], start="beginning",
                                 chunk_bytes=4096)
            failures = 0
            for _ in range(10_000):
                try:
                    if not (await t.step()).lines and calls > 9:
                        break
                except StoreUnavailable:
                    failures += 1
                    t.reload()
            t.close()
            rows = await store.chain_rows(after_seq=0, limit=100_000)
        finally:
            await store.close()
        assert failures == 2
        assert rows == here

    @staticmethod
    @contextlib.asynccontextmanager
    async def _running_worker(stores: tuple[Path, Path, Path]) -> AsyncIterator[tuple[IngestWorker, int]]:
        """A worker on the first store that has prepared one chunk of the log: (worker, its pid)."""
        a, _, log = stores
        store = await open_store(f"sqlite:///{a}", migrate=False)
        try:
            source = await store.ingest_source()
            assert source is not None
            worker = IngestWorker(source, broker_paths=["pki/issue/agents"], skew=5.0)
            chunk = await worker.prepare(log.read_bytes()[:65536])
            assert chunk.lines > 0 and chunk.records
            assert worker.pid is not None
            yield worker, worker.pid
        finally:
            await store.close()

    async def test_the_worker_ends_with_the_tailer(self, stores: tuple[Path, Path, Path]) -> None:
        """No process is left behind: closed with its tailer, and it exits by itself when its stdin closes."""
        async with self._running_worker(stores) as (worker, pid):
            await worker.close()
            assert worker.pid is None
            with pytest.raises(ProcessLookupError):  # exited (and reaped) after its stdin closed
                os.kill(pid, 0)

    async def test_a_worker_killed_from_synchronous_code_is_reaped_on_the_loop(
            self, stores: tuple[Path, Path, Path]) -> None:
        """``kill`` (the tailer's synchronous ``close``) on a running loop also reaps the process, so its
        transport closes while the loop is there: no zombie, no warning when the loop ends."""
        async with self._running_worker(stores) as (worker, pid):
            worker.kill()
            assert worker.pid is None
            assert await reaped(pid)

    async def test_a_worker_that_takes_no_job_is_given_up_on(
            self, stores: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
        """A stopped worker leaves a chunk larger than its pipe half written: the submit fails after the
        answer timeout instead of holding the tailer for good, and the worker is killed and reaped."""
        monkeypatch.setattr(ingest_module, "_ANSWER_TIMEOUT", 2.0)
        async with self._running_worker(stores) as (worker, pid):
            os.kill(pid, signal.SIGSTOP)
            with pytest.raises(ingest_module.WorkerFailed, match="took no job within 2 s"):
                await worker.submit(b"\n" * (4 * ingest_module._PIPE_BYTES))
            assert worker.pid is None
            assert await reaped(pid)

    async def test_a_broker_package_in_the_working_directory_is_not_the_workers(
            self, stores: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """``python -m`` puts the working directory first on the path: a ``broker`` there (another checkout,
        or planted) must not become the worker's code."""
        planted = tmp_path / "cwd" / "broker"
        planted.mkdir(parents=True)
        marker = tmp_path / "imported"
        (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
        monkeypatch.chdir(planted.parent)
        async with self._running_worker(stores) as (worker, _):
            await worker.close()
        assert not marker.exists()

    async def test_no_worker_for_a_store_in_memory(self, tmp_path: Path) -> None:
        """No other process can open an in-memory SQLite store: the tailer merges in its own process."""
        store = await open_store("sqlite://")
        log = tmp_path / "audit.log"
        log.write_bytes(log_lines())
        try:
            t = VaultAuditTailer(store=store, path=log, broker_paths=["pki/issue/agents"], start="beginning",
                                 chunk_bytes=4096)
            await t.step()
            merged = await t.catch_up()
            assert merged == log.read_bytes().count(b"\n") and t.ingest_worker is None
            t.close()
        finally:
            await store.close()


class TestOnPostgres:
    async def test_the_worker_builds_the_same_chain_on_postgresql(self, pg_cluster: PgCluster, tmp_path: Path) -> None:
        """The worker's own connection to a PostgreSQL store (psycopg, autocommit): the same chain as the
        broker's process builds, in two fresh databases of the tests' SCRAM cluster."""
        import psycopg

        log = tmp_path / "audit.log"
        log.write_bytes(log_lines())
        chains = []
        for worker in (True, False):
            async with scratch_database(pg_cluster, "ingest_") as name:
                url = pg_cluster.dsn(name)
                await (await open_store(url)).close()
                rows = task_rows()
                columns = list(rows[0])
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn, conn.cursor() as cur:
                    await cur.executemany(
                        f"INSERT INTO tasks ({quoted(columns)}) "
                        f"VALUES ({', '.join(['%s'] * len(columns))})", [tuple(r.values()) for r in rows])
                chains.append(await merge(url, log, worker=worker))
        assert chains[0] == chains[1]
        assert sum(row[2] == "vault.request" for row in chains[0]) > COPIES
