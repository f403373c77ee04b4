"""The broker's store: tasks, leases, intents, revocations and audit rows, through SQLAlchemy Core.

SQLite is the default (one file, nothing to run); PostgreSQL serves several replicas with the same
code. Every method that changes state writes its audit record in the same transaction, so the store
never holds a change without its record. Driver exceptions do not escape: they become
``StoreUnavailable`` here, the one boundary.

Each public method is ``async`` and runs one whole transaction, synchronously, on the store's own
thread(s): one hop between the event loop and the database per transaction, instead of one per
statement as an async driver makes. Measured on the issuance path: 2.5 ms of broker CPU per
issuance through SQLAlchemy's asyncio layer and aiosqlite (statement objects rebuilt per call, a
thread hop per statement). Statements here are module-level constants with bound parameters, so
SQLAlchemy compiles each once. The event loop never waits on the disk.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool

from broker.errors import BrokerError
from broker.rows import (
    ApprovalRow,
    AuditRow,
    CheckpointRow,
    Intent,
    JournalEntry,
    LeaseLimits,
    LeaseRow,
    Person,
    RevocationRow,
    TaskRow,
    VaultAuditPosition,
)
from broker.store._base import StoreBase
from broker.store.approvals import ApprovalStore
from broker.store.audit import AuditStore
from broker.store.delegations import DelegationStore
from broker.store.gauges import GaugeStore
from broker.store.leases import LeaseStore
from broker.store.people import PeopleStore
from broker.store.sessions import ConsoleSessionRow, ConsoleSessionStore
from broker.store.singletons import SingletonStore
from broker.store.tasks import TaskStore
from broker.store.vault_audit import VaultAuditStore
from broker.store.walcheckpoint import SAFETY_PAGES, WalCheckpointer

__all__ = ["ApprovalRow", "AuditRow", "CheckpointRow", "ConsoleSessionRow", "Intent", "JournalEntry", "LeaseLimits",
           "LeaseRow", "Person", "RevocationRow", "Store", "TaskRow", "VaultAuditPosition", "open_store"]


class Store(TaskStore, LeaseStore, PeopleStore, ApprovalStore, AuditStore, VaultAuditStore, DelegationStore,
            GaugeStore, SingletonStore, ConsoleSessionStore, StoreBase):
    """The store's one face: every aggregate's transactions (``broker.store.tasks``, ``leases``, ``people``,
    ``approvals``, ``audit``, ``vault_audit``, ``delegations``, ``gauges``, ``singletons``, the console's
    ``sessions``, and ``signals`` through ``tasks``) on one engine and one store thread."""


def _sync_url(url: str) -> str:
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres", "postgresql+asyncpg"):
        u = u.set(drivername="postgresql+psycopg")
    elif u.drivername == "sqlite+aiosqlite":
        u = u.set(drivername="sqlite")
    return u.render_as_string(hide_password=False)


async def open_store(url: str, *, migrate: bool = True) -> Store:
    """Connect, apply Alembic migrations up to head, return the store.

    SQLite runs in WAL mode with ``synchronous=FULL``: NORMAL may lose the last commits on power loss,
    and a lost commit here is a lost audit record.

    Raises:
        StoreUnavailable: the database cannot be opened or migrated.
    """
    sync_url = _sync_url(url)
    sqlite = sync_url.startswith("sqlite")
    kwargs: dict[str, Any] = {}
    checkpointed: str | None = None  # a SQLite file that the WAL checkpointer opens too
    if sqlite:
        kwargs["poolclass"] = StaticPool
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        database = make_url(sync_url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
            if not database.startswith("file:"):  # a URI's options are SQLite's to read, not a path
                checkpointed = database
    else:
        kwargs["pool_size"] = 8
        kwargs["pool_pre_ping"] = True
    engine = create_engine(sync_url, **kwargs)
    if sqlite:

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # pysqlite's own transaction handling is off so that SQLAlchemy's BEGIN is the real one.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            # Random keys (lease, intent and request ids) put each insert on a random page of a growing
            # index: past SQLite's default 2 MB page cache every issuance paid page reads, and issuance
            # slowed as history grew (scripts/bench_live.py). 64 MB of cache and reads through mmap.
            cur.execute("PRAGMA cache_size=-65536")
            cur.execute("PRAGMA mmap_size=268435456")
            if checkpointed:
                # The WAL checkpointer (broker.store.walcheckpoint) copies the WAL back; a commit runs one
                # only past this mark, as a safety net should that thread fall behind.
                cur.execute(f"PRAGMA wal_autocheckpoint={SAFETY_PAGES}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            # IMMEDIATE: take the write lock at BEGIN, so a read-then-write transaction cannot be
            # overtaken by another writer between its read and its write (SQLite has no FOR UPDATE).
            # On the DB-API connection: through exec_driver_sql this one statement cost a quarter of the
            # store thread's time per credential (scripts/bench_issue.py --profile, one agent).
            try:
                conn.connection.dbapi_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
            except sqlite3.Error as exc:  # as SQLAlchemy would have wrapped it: the store is unavailable
                raise DBAPIError.instance("BEGIN IMMEDIATE", None, exc, sqlite3.Error) from exc

    store = Store(engine, sqlite=sqlite, checkpointer=WalCheckpointer(checkpointed) if checkpointed else None)
    if migrate:
        try:
            await store._run(_upgrade, engine)
        except BrokerError:
            await store.close()
            raise
    return store


_MIGRATION_LOCK = 0x62726F6B  # "brok": this store's advisory lock key for migrations


def _upgrade(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Replicas started together would each migrate at once (and all but one fail on the version
            # row): one at a time, under a transaction-scoped advisory lock; the others then find head.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")

