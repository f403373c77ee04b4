"""The audit chain as stored: appends with their state change, queries, checkpoints and export cursors."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from sqlalchemy import (
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from broker.audit import AuditRecord, ChainLink
from broker.rows import (
    AuditRow,
    ChainSource,
    CheckpointRow,
)
from broker.store._base import StoreBase
from broker.store.schema import (
    audit_checkpoints,
    audit_events,
    audit_export,
)
from broker.store.statements import (
    _CHAIN_PAGE,
    _HEAD,
    _INSERT_CHECKPOINT,
    _LAST_CHECKPOINT,
    _RECORD_FIELDS,
    P_CHAIN_PAGE,
    _append,
    _user_is,
)


class AuditStore(StoreBase):
    async def append_audit(self, record: AuditRecord) -> None:
        """A record with no state change of its own (``access.denied``)."""
        def run() -> None:
            with self._tx() as conn:
                _append(conn, record)
        await self._run(run)

    async def query_audit(self, *, user: str | None = None, agent: str | None = None, task: str | None = None,
                          since: float | None = None, until: float | None = None, after_seq: int = 0,
                          limit: int = 100) -> list[AuditRow]:
        q = select(audit_events).where(audit_events.c.seq > after_seq).order_by(audit_events.c.seq).limit(limit)
        if user is not None:
            q = q.where(_user_is(audit_events.c.user, user))
        for col, value in ((audit_events.c.agent, agent), (audit_events.c.task, task)):
            if value is not None:
                q = q.where(col == value)
        if since is not None:
            q = q.where(audit_events.c.time >= since)
        if until is not None:
            q = q.where(audit_events.c.time < until)

        def run() -> list[AuditRow]:
            with self._read() as conn:
                rows = conn.execute(q).mappings().all()
            return [AuditRow(seq=r["seq"], record=AuditRecord(**{k: r[k] for k in _RECORD_FIELDS})) for r in rows]
        return await self._run(run)

    async def chain_head(self) -> tuple[int, str]:
        """The chain's head row: (records, hex hash of the last one; 64 zeros when there is none)."""
        def run() -> tuple[int, str]:
            with self._read() as conn:
                seq, head = conn.execute(_HEAD).one()
            return int(seq), str(head)
        return await self._run(run)

    async def iter_chain(self, *, after_seq: int = 0, limit: int = 10_000) -> list[ChainLink]:
        """The next ``limit`` records after ``after_seq``, as stored (hashes included, nothing checked)."""
        n = len(_RECORD_FIELDS)

        def run() -> list[ChainLink]:
            with self._read() as conn:
                rows = conn.execute(_CHAIN_PAGE, {"after": after_seq, "lim": limit}).all()
            return [ChainLink(r[0], AuditRecord(*r[1:n + 1]), r[n + 1], r[n + 2]) for r in rows]
        return await self._run(run)

    async def chain_rows(self, *, after_seq: int = 0, limit: int = 10_000) -> list[tuple[Any, ...]]:
        """:meth:`iter_chain` as plain tuples ``(seq, *AuditRecord fields, prev_hash, hash)``, for the verifier."""
        def run() -> list[tuple[Any, ...]]:
            with self._read() as conn:
                # The raw cursor's tuples: SQLAlchemy's row processing was half of verify's time per record.
                return list(P_CHAIN_PAGE.execute(conn, {"after": after_seq, "lim": limit}).fetchall())
        return await self._run(run)

    async def chain_end(self) -> int:
        """The highest sequence number stored (0 when there is none): what the rows say, not the head row."""
        def run() -> int:
            with self._read() as conn:
                return int(conn.execute(select(func.coalesce(func.max(audit_events.c.seq), 0))).scalar_one())
        return await self._run(run)

    async def chain_source(self) -> ChainSource | None:
        """How another process reads :meth:`chain_rows` (the parallel verifier's workers); None when no other
        process can open this database (SQLite in memory)."""
        def run() -> ChainSource | None:
            target = self._dbapi_target()
            if target is None:
                return None
            module, args, kwargs = target
            with self._read() as conn:
                sql, order, defaults = P_CHAIN_PAGE.rendered(conn)
            return ChainSource(module, args, kwargs, sql, order, defaults)
        return await self._run(run)

    async def add_checkpoint(self, row: CheckpointRow) -> bool:
        """Store a signed checkpoint. False when one of that size is stored already (another replica's)."""
        def run() -> bool:
            try:
                with self._tx() as conn:
                    conn.execute(_INSERT_CHECKPOINT, asdict(row))
            except IntegrityError:
                return False
            return True
        return await self._run(run)

    async def list_checkpoints(self, *, after_seq: int = -1) -> list[CheckpointRow]:
        """Every stored checkpoint above ``after_seq``, smallest first."""
        q = select(audit_checkpoints).where(audit_checkpoints.c.seq > after_seq).order_by(audit_checkpoints.c.seq)

        def run() -> list[CheckpointRow]:
            with self._read() as conn:
                return [CheckpointRow(**r) for r in conn.execute(q).mappings()]
        return await self._run(run)

    async def last_checkpoint(self) -> CheckpointRow | None:
        def run() -> CheckpointRow | None:
            with self._read() as conn:
                r = conn.execute(_LAST_CHECKPOINT).mappings().first()
            return CheckpointRow(**r) if r is not None else None
        return await self._run(run)

    async def export_positions(self) -> dict[str, int]:
        """Every export sink's last delivered sequence number (empty before the first export)."""
        def run() -> dict[str, int]:
            with self._read() as conn:
                return {str(r[0]): int(r[1]) for r in conn.execute(select(audit_export.c.sink, audit_export.c.seq))}
        return await self._run(run)

    async def advance_export(self, sink: str, *, expected: int, seq: int, now: float) -> bool:
        """Move ``sink``'s cursor from ``expected`` to ``seq`` (compare-and-set). False when it had moved."""
        t = audit_export

        def run() -> bool:
            with self._tx() as conn:
                have = conn.execute(select(t.c.seq).where(t.c.sink == sink)).scalar_one_or_none()
                if have is None:
                    if expected != 0:
                        return False
                    conn.execute(insert(t).values(sink=sink, seq=seq, updated_at=now))
                    return True
                return bool(conn.execute(update(t).where(t.c.sink == sink, t.c.seq == expected)
                                         .values(seq=seq, updated_at=now)).rowcount == 1)
        return await self._run(run)
