"""The broker's store: tasks, leases and audit rows, through SQLAlchemy's async core.

SQLite is the default (one file, nothing to run); PostgreSQL serves several replicas with the same
code. Every method that changes state writes its audit record in the same transaction, so the store
never holds a change without its record. Driver exceptions do not escape: they become
``StoreUnavailable`` here, the one boundary.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event, insert, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from broker.audit import AuditRecord
from broker.errors import Conflict, StoreUnavailable
from broker.store.schema import audit_events, leases, tasks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskRow:
    id: str
    user: str
    agent: str
    role: str
    tenant: str
    reason: str
    created_at: float
    expires_at: float
    state: str
    ended_at: float | None
    token_accessor: str
    sealed_token: bytes

    def __repr__(self) -> str:  # the sealed token is not secret without the key, but keep reprs short
        return f"TaskRow(id={self.id!r}, user={self.user!r}, agent={self.agent!r}, state={self.state!r})"


@dataclass(frozen=True)
class LeaseRow:
    id: str
    task_id: str
    grant: str
    path: str
    kind: str
    vault_lease_id: str
    issued_at: float
    expires_at: float
    renewable: bool
    state: str
    revoked_at: float | None


@dataclass(frozen=True)
class AuditRow:
    seq: int
    record: AuditRecord


def _async_url(url: str) -> str:
    u = make_url(url)
    if u.drivername == "sqlite":
        u = u.set(drivername="sqlite+aiosqlite")
    elif u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+asyncpg")
    return u.render_as_string(hide_password=False)


class Store:
    def __init__(self, engine: AsyncEngine, *, sqlite: bool) -> None:
        self._engine = engine
        # SQLite has one writer: serialising our own transactions avoids "database is locked" retries.
        self._write_lock = asyncio.Lock() if sqlite else None

    async def close(self) -> None:
        await self._engine.dispose()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncConnection]:
        try:
            if self._write_lock is not None:
                async with self._write_lock, self._engine.begin() as conn:
                    yield conn
            else:
                async with self._engine.begin() as conn:
                    yield conn
        except SQLAlchemyError as exc:
            log.error("store transaction failed: %s", type(exc).__name__)
            raise StoreUnavailable("the store cannot be written", reason=type(exc).__name__) from exc

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        try:
            if self._write_lock is not None:
                async with self._write_lock, self._engine.connect() as conn:
                    yield conn
            else:
                async with self._engine.connect() as conn:
                    yield conn
        except SQLAlchemyError as exc:
            log.error("store read failed: %s", type(exc).__name__)
            raise StoreUnavailable("the store cannot be read", reason=type(exc).__name__) from exc

    async def ping(self) -> None:
        """Raises: StoreUnavailable."""
        async with self._read() as conn:
            await conn.execute(select(1))

    # -- tasks ---------------------------------------------------------------------------------------

    async def create_task(self, row: TaskRow, record: AuditRecord) -> None:
        async with self._tx() as conn:
            await conn.execute(insert(tasks).values(**asdict(row)))
            await _append(conn, record)

    async def get_task(self, task_id: str) -> TaskRow | None:
        async with self._read() as conn:
            r = (await conn.execute(select(tasks).where(tasks.c.id == task_id))).mappings().first()
        return TaskRow(**r) if r is not None else None

    async def fence_task(self, task_id: str, *, state: str, now: float, record: AuditRecord) -> bool:
        """Move an active task to ``state`` and its active leases to ``revoke_pending``.

        Returns False (and writes nothing) when the task was no longer active: another caller won.
        """
        async with self._tx() as conn:
            res = await conn.execute(
                update(tasks).where(tasks.c.id == task_id, tasks.c.state == "active").values(state=state, ended_at=now)
            )
            if res.rowcount != 1:
                return False
            await conn.execute(
                update(leases).where(leases.c.task_id == task_id, leases.c.state == "active")
                .values(state="revoke_pending")
            )
            await _append(conn, record)
        return True

    # -- leases --------------------------------------------------------------------------------------

    async def add_lease(self, row: LeaseRow, record: AuditRecord) -> bool:
        """Record an issued lease, but only while its task is still active (checked in the same transaction).

        Returns False, writing nothing, when the task left ``active`` meanwhile: the caller must then
        make sure the lease dies in Vault.
        """
        async with self._tx() as conn:
            state = (await conn.execute(select(tasks.c.state).where(tasks.c.id == row.task_id))).scalar_one_or_none()
            if state != "active":
                return False
            values = asdict(row)
            values["renewable"] = int(row.renewable)
            await conn.execute(insert(leases).values(**values))
            await _append(conn, record)
        return True

    async def get_lease(self, lease_id: str) -> LeaseRow | None:
        async with self._read() as conn:
            r = (await conn.execute(select(leases).where(leases.c.id == lease_id))).mappings().first()
        return _lease(r) if r is not None else None

    async def list_leases(self, *, task_id: str, states: Sequence[str] | None = None) -> list[LeaseRow]:
        q = select(leases).where(leases.c.task_id == task_id).order_by(leases.c.issued_at)
        if states is not None:
            q = q.where(leases.c.state.in_(states))
        async with self._read() as conn:
            return [_lease(r) for r in (await conn.execute(q)).mappings()]

    async def renew_lease(self, lease_id: str, *, expires_at: float, record: AuditRecord) -> None:
        """Raises: Conflict: the lease is no longer active."""
        async with self._tx() as conn:
            res = await conn.execute(
                update(leases).where(leases.c.id == lease_id, leases.c.state == "active").values(expires_at=expires_at)
            )
            if res.rowcount != 1:
                raise Conflict("the lease is no longer active")
            await _append(conn, record)

    async def mark_revoked(self, lease_ids: Iterable[str], *, now: float, records: Sequence[AuditRecord]) -> None:
        ids = list(lease_ids)
        async with self._tx() as conn:
            if ids:
                await conn.execute(
                    update(leases).where(leases.c.id.in_(ids), leases.c.state == "revoke_pending")
                    .values(state="revoked", revoked_at=now)
                )
            for record in records:
                await _append(conn, record)

    # -- audit ---------------------------------------------------------------------------------------

    async def append_audit(self, record: AuditRecord) -> None:
        """A record with no state change of its own (``access.denied``)."""
        async with self._tx() as conn:
            await _append(conn, record)

    async def query_audit(
        self,
        *,
        user: str | None = None,
        agent: str | None = None,
        task: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> list[AuditRow]:
        q = select(audit_events).where(audit_events.c.seq > after_seq).order_by(audit_events.c.seq).limit(limit)
        for col, value in ((audit_events.c.user, user), (audit_events.c.agent, agent), (audit_events.c.task, task)):
            if value is not None:
                q = q.where(col == value)
        if since is not None:
            q = q.where(audit_events.c.time >= since)
        if until is not None:
            q = q.where(audit_events.c.time < until)
        async with self._read() as conn:
            rows = (await conn.execute(q)).mappings().all()
        return [_audit_row(r) for r in rows]


_RECORD_FIELDS = tuple(AuditRecord.__dataclass_fields__)


async def _append(conn: AsyncConnection, record: AuditRecord) -> None:
    await conn.execute(insert(audit_events).values(**asdict(record.redacted())))


def _audit_row(r: Any) -> AuditRow:
    return AuditRow(seq=r["seq"], record=AuditRecord(**{k: r[k] for k in _RECORD_FIELDS}))


def _lease(r: Any) -> LeaseRow:
    d = dict(r)
    d["renewable"] = bool(d["renewable"])
    return LeaseRow(**d)


async def open_store(url: str, *, migrate: bool = True) -> Store:
    """Connect, apply Alembic migrations up to head, return the store.

    SQLite runs in WAL mode with ``synchronous=FULL``: NORMAL may lose the last commits on power loss,
    and a lost commit here is a lost audit record.

    Raises:
        StoreUnavailable: the database cannot be opened or migrated.
    """
    async_url = _async_url(url)
    sqlite = async_url.startswith("sqlite")
    kwargs: dict[str, Any] = {}
    if sqlite:
        kwargs["poolclass"] = StaticPool
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        database = make_url(async_url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
    else:
        kwargs["pool_size"] = 10
        kwargs["pool_pre_ping"] = True
    engine = create_async_engine(async_url, **kwargs)
    if sqlite:

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

    store = Store(engine, sqlite=sqlite)
    if migrate:
        try:
            async with engine.begin() as conn:
                await conn.run_sync(_upgrade)
        except SQLAlchemyError as exc:
            await engine.dispose()
            raise StoreUnavailable("the store cannot be opened", reason=f"migration failed: {type(exc).__name__}") from exc
    return store


def _upgrade(sync_conn: Any) -> None:
    from alembic import command
    from alembic.config import Config

    here = Path(__file__).parent / "migrations"
    cfg = Config()
    cfg.set_main_option("script_location", str(here))
    cfg.attributes["connection"] = sync_conn
    command.upgrade(cfg, "head")
