"""The WAL checkpointer: SQLite's WAL copied back into the database by a thread of its own, not by commits."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.audit import AuditRecord
from broker.store import open_store
from broker.store.walcheckpoint import WalCheckpointer


def _writer(path: Path) -> sqlite3.Connection:
    """A WAL database whose commits never checkpoint (only a checkpointer copies the WAL back); a WAL that
    restarts is truncated, so its size shows whether it was copied back."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("PRAGMA journal_size_limit=0")
    conn.execute("CREATE TABLE t (x BLOB)")
    for _ in range(30):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t VALUES (?)", [(os.urandom(500),) for _ in range(50)])
        conn.execute("COMMIT")
    return conn


def _until(cond: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)


def _commit_one(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.execute("COMMIT")


def test_the_wal_is_copied_back_without_the_writer(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    conn = _writer(db)
    wal = Path(f"{db}-wal")
    grown = wal.stat().st_size
    assert grown > 1_000_000
    # Without a checkpointer the WAL only grows.
    _commit_one(conn)
    assert wal.stat().st_size >= grown
    checkpointer = WalCheckpointer(str(db), interval=0.02)
    checkpointer.start()
    try:
        _until(lambda: checkpointer.rounds >= 2)
        assert checkpointer.rounds >= 2
        # Every frame is back in the database: the next commit restarts the WAL from its beginning.
        _commit_one(conn)
        assert wal.stat().st_size < 100_000
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 30 * 50 + 2
    finally:
        checkpointer.stop()
        conn.close()


def test_it_never_creates_the_database(tmp_path: Path) -> None:
    db = tmp_path / "later.db"
    checkpointer = WalCheckpointer(str(db), interval=0.01, idle_interval=0.01)
    checkpointer.start()
    time.sleep(0.1)
    checkpointer.stop()
    assert not db.exists()
    assert checkpointer.rounds == 0


def test_a_failing_checkpoint_is_logged_once_and_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "not-a-database.db"
    db.write_bytes(b"this is not SQLite" * 100)
    checkpointer = WalCheckpointer(str(db), interval=0.01, idle_interval=0.01)
    with caplog.at_level(logging.WARNING, logger="broker.store.walcheckpoint"):
        checkpointer.start()
        time.sleep(0.2)
        checkpointer.stop()
    warnings = [r for r in caplog.records if "WAL checkpoint failed" in r.getMessage()]
    assert len(warnings) == 1
    assert "DatabaseError" in warnings[0].getMessage()


def _checkpointer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "broker-store-checkpoint"]


async def test_a_sqlite_store_starts_its_checkpointer_and_stops_it_on_close(tmp_path: Path) -> None:
    before = len(_checkpointer_threads())
    db = tmp_path / "broker.db"
    store = await open_store(f"sqlite:///{db}")
    try:
        assert len(_checkpointer_threads()) == before + 1
        for i in range(200):
            await store.append_audit(AuditRecord(time.time(), "test.event", "success", resource=f"r{i}"))
        head, _ = await store.chain_head()
        assert head == 200
    finally:
        await store.close()
    assert len(_checkpointer_threads()) == before


async def test_an_in_memory_store_has_no_checkpointer() -> None:
    before = len(_checkpointer_threads())
    store = await open_store("sqlite:///:memory:")
    try:
        assert len(_checkpointer_threads()) == before
    finally:
        await store.close()
