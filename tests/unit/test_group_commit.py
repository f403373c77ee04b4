"""Group commit on the SQLite store (broker.store._base): operations that queue up share one commit.

Each caller still learns its result only after the commit that holds its writes; an operation that
fails rolls back alone; a commit that fails fails every operation of its group and keeps none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import event, insert, select

from broker.audit.chain import AuditRecord, verify_chain
from broker.errors import StoreUnavailable
from broker.rows import VaultAuditPosition
from broker.store import Store, open_store
from broker.store.schema import health_probe


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_store(f"sqlite:///{tmp_path / 'broker.db'}")
    try:
        yield s
    finally:
        await s.close()


def _commits(store: Store) -> list[int]:
    count = [0]

    @event.listens_for(store._engine, "commit")
    def _counted(_conn: Any) -> None:
        count[0] += 1

    return count


def _refuse_commits(store: Store) -> list[bool]:
    """Every COMMIT fails ("disk full") while the returned flag's one item is True."""
    broken = [True]

    @event.listens_for(store._engine, "commit")
    def _refuse(_conn: Any) -> None:
        if broken[0]:
            msg = "disk full"
            raise OSError(msg)

    return broken


async def _insert(store: Store, row_id: int, *, fail: bool = False) -> int:
    def run() -> int:
        with store._tx() as conn:
            conn.execute(insert(health_probe).values(id=row_id, probed_at=float(row_id)))
            if fail:
                msg = "this operation fails after its write"
                raise ValueError(msg)
        return row_id
    return await store._run(run)


async def _ids(store: Store) -> set[int]:
    def run() -> set[int]:
        with store._read() as conn:
            return {r.id for r in conn.execute(select(health_probe.c.id))}
    return await store._run(run)


class TestGroupCommit:
    async def test_concurrent_appends_share_commits_and_the_chain_verifies(self, store: Store) -> None:
        commits = _commits(store)
        records = [AuditRecord(1_800_000_000.0 + i, "lease.issued", "success", user=f"u{i}") for i in range(200)]
        await asyncio.gather(*(store.append_audit(r) for r in records))
        assert commits[0] < 100, f"{commits[0]} commits for 200 appends: nothing was grouped"
        links = await store.iter_chain()
        assert len(links) == 200
        count, _head = verify_chain(links)
        assert count == 200
        assert {link.record.user for link in links} == {f"u{i}" for i in range(200)}

    async def test_a_failing_operation_rolls_back_alone(self, store: Store) -> None:
        outcomes = await asyncio.gather(*(_insert(store, i, fail=(i == 5)) for i in range(10, 20)),
                                        _insert(store, 5, fail=True), return_exceptions=True)
        assert [o for o in outcomes if isinstance(o, BaseException)] != []
        failed = [o for o in outcomes if isinstance(o, ValueError)]
        assert len(failed) == 1
        assert await _ids(store) >= set(range(10, 20)) and 5 not in await _ids(store)

    async def test_a_duplicate_key_fails_its_own_caller_only(self, store: Store) -> None:
        await _insert(store, 40)
        outcomes = await asyncio.gather(_insert(store, 41), _insert(store, 40), _insert(store, 42),
                                        return_exceptions=True)
        assert outcomes[0] == 41 and outcomes[2] == 42
        assert isinstance(outcomes[1], StoreUnavailable)
        assert {40, 41, 42} <= await _ids(store)

    async def test_a_failed_commit_fails_the_whole_group_and_keeps_nothing(self, store: Store) -> None:
        broken = _refuse_commits(store)

        outcomes = await asyncio.gather(*(_insert(store, i) for i in range(60, 80)), return_exceptions=True)
        broken[0] = False
        assert all(isinstance(o, BaseException) for o in outcomes), outcomes
        assert not (await _ids(store)) & set(range(60, 80))

    async def test_no_caller_is_answered_before_its_commit(self, store: Store) -> None:
        """Every answered insert is visible to a second connection at the moment its caller resumes."""
        import sqlite3

        path = store._engine.url.database
        assert path is not None
        seen_missing: list[int] = []

        async def insert_then_look(i: int) -> None:
            await _insert(store, 1000 + i)
            other = sqlite3.connect(path)
            try:
                if other.execute("SELECT 1 FROM health_probe WHERE id = ?", (1000 + i,)).fetchone() is None:
                    seen_missing.append(i)
            finally:
                other.close()

        await asyncio.gather(*(insert_then_look(i) for i in range(50)))
        assert seen_missing == []


class TestUndo:
    async def test_an_operation_that_undoes_its_writes_keeps_the_groups_others(self, store: Store) -> None:
        def undoing() -> bool:
            with store._tx() as conn:
                conn.execute(insert(health_probe).values(id=300, probed_at=0.0))
                store._undo(conn)  # a compare-and-set that lost: write nothing
                return False

        outcomes = await asyncio.gather(_insert(store, 301), store._run(undoing), _insert(store, 302))
        assert outcomes == [301, False, 302]
        ids = await _ids(store)
        assert {301, 302} <= ids and 300 not in ids

    async def test_an_operation_that_rolls_the_group_back_fails_the_group(self, store: Store) -> None:
        def breaks_the_group() -> None:
            with store._tx() as conn:
                conn.rollback()

        async with _store_thread_held(store):  # so that all four queue up and run as one group
            jobs = asyncio.gather(_insert(store, 311), store._run(breaks_the_group), _insert(store, 312),
                                  return_exceptions=True)
        outcomes = await jobs
        assert all(isinstance(o, BaseException) for o in outcomes), outcomes
        assert not {311, 312} & await _ids(store)


@contextlib.asynccontextmanager
async def _store_thread_held(store: Store) -> AsyncIterator[None]:
    """Keep the store's thread busy while the body queues operations; they then run as one group."""
    release = threading.Event()
    holding = asyncio.ensure_future(store._run(release.wait, 5))
    await asyncio.sleep(0.05)
    try:
        yield
        await asyncio.sleep(0.05)  # let the body's operations reach the queue
    finally:
        release.set()
        await holding


@pytest.mark.parametrize("n", [1, 2])
async def test_small_groups_behave_like_single_transactions(store: Store, n: int) -> None:
    outcomes = await asyncio.gather(*(_insert(store, 500 + i) for i in range(n)))
    assert outcomes == [500 + i for i in range(n)]


async def _synchronous_in(store: Store, *, replayable: bool) -> int:
    """The flush mode (SQLite: 1 NORMAL, 2 FULL) seen inside an operation's own transaction."""
    def run() -> int:
        with store._tx() as conn:
            return int(conn.connection.dbapi_connection.execute("PRAGMA synchronous").fetchone()[0])  # type: ignore[union-attr]
    return await (store._run_replayable(run) if replayable else store._run(run))


class TestFlushes:
    """A replayable transaction (the Vault audit merge) is not flushed on its own; every other one is."""

    async def test_a_replayable_operation_alone_commits_without_a_flush(self, store: Store) -> None:
        assert await _synchronous_in(store, replayable=True) == 1
        assert await _synchronous_in(store, replayable=False) == 2  # and the next one is flushed again

    async def test_a_group_with_any_durable_operation_is_flushed(self, store: Store) -> None:
        gate = threading.Event()

        def hold() -> None:  # keeps the store thread busy so that the next ones queue into one group
            gate.wait(5)
        blocker = asyncio.ensure_future(store._run(hold))
        await asyncio.sleep(0.05)
        mixed = [asyncio.ensure_future(_synchronous_in(store, replayable=i % 2 == 0)) for i in range(6)]
        await asyncio.sleep(0.05)
        gate.set()
        await blocker
        assert list(await asyncio.gather(*mixed)) == [2] * 6

    async def test_a_merge_of_vault_audit_lines_is_replayable(self, store: Store) -> None:
        seen: list[bool] = []
        original = store._run_replayable

        async def spy(fn: Any) -> Any:
            seen.append(True)
            return await original(fn)
        store._run_replayable = spy  # type: ignore[method-assign]
        new = VaultAuditPosition("/vault/audit.log", 1, 2, 100, 3, None)
        await store.merge_vault_audit(moves=[(None, new)], records=[], tokens={}, now=1_800_000_000.0)
        assert seen == [True]
        assert await store.vault_audit_positions("/vault/audit.log") == [new]


class TestTheStoreConnection:
    """The store thread keeps one SQLite connection: nothing an operation began outlives the operation."""

    async def test_a_read_leaves_no_lock_behind(self, store: Store) -> None:
        import sqlite3

        await _insert(store, 7)
        assert 7 in await _ids(store)  # a read through SQLAlchemy: it began a transaction (BEGIN IMMEDIATE)
        path = store._engine.url.database
        assert path is not None
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # fails with "database is locked" if the read still held it
            other.execute("INSERT INTO health_probe (id, probed_at) VALUES (8, 8.0)")
            other.execute("COMMIT")
        finally:
            other.close()
        assert {7, 8} <= await _ids(store)

    async def test_a_failed_lone_commit_leaves_the_connection_usable(self, store: Store) -> None:
        broken = _refuse_commits(store)

        with pytest.raises(OSError, match="disk full"):
            await _insert(store, 90)
        broken[0] = False
        assert await _insert(store, 91) == 91
        ids = await _ids(store)
        assert 91 in ids and 90 not in ids

    async def test_a_locked_database_is_store_unavailable(self, store: Store) -> None:
        """BEGIN IMMEDIATE runs on the DB-API connection; "database is locked" still becomes a 503's error."""
        import sqlite3

        def short_wait() -> None:
            with store._read() as conn:
                conn.connection.dbapi_connection.execute("PRAGMA busy_timeout=100")  # type: ignore[union-attr]
        await store._run(short_wait)
        path = store._engine.url.database
        assert path is not None
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreUnavailable):
                await _insert(store, 95)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert await _insert(store, 96) == 96

    async def test_a_failed_return_to_full_flushes_reopens_the_connection(self, store: Store) -> None:
        """If the flush mode cannot be set back after a replayable merge, later commits are still flushed."""
        original = store._synchronous
        calls: list[str] = []

        def failing(mode: str) -> None:
            calls.append(mode)
            if mode == "FULL" and calls.count("FULL") == 1:
                msg = "disk I/O error"
                raise OSError(msg)
            original(mode)
        store._synchronous = failing  # type: ignore[method-assign]
        assert await _synchronous_in(store, replayable=True) == 1
        store._synchronous = original  # type: ignore[method-assign]
        assert await _synchronous_in(store, replayable=False) == 2


class TestClose:
    """Closing the store while operations are queued: they finish first, and nothing waits forever."""

    async def test_close_while_operations_are_queued_keeps_them_and_refuses_later_ones(self, tmp_path: Path) -> None:
        store = await open_store(f"sqlite:///{tmp_path / 'broker.db'}")
        gate = threading.Event()

        def blocked() -> None:  # holds the store thread so that the next operations queue up behind it
            gate.wait(10)
        first = asyncio.ensure_future(store._run(blocked))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(_insert(store, i)) for i in range(1, 6)]
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(store.close())
        await asyncio.sleep(0.05)
        with pytest.raises(StoreUnavailable, match="closed"):
            await _insert(store, 99)
        gate.set()
        await asyncio.wait_for(closing, 10)  # before: the close ran in the queued group and failed it
        await first
        assert [await q for q in queued] == [1, 2, 3, 4, 5]
        again = await open_store(f"sqlite:///{tmp_path / 'broker.db'}")
        try:
            assert {1, 2, 3, 4, 5} <= await _ids(again)
        finally:
            await again.close()
