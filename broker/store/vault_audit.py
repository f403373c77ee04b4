"""Vault's own audit record merged into the chain (broker.audit.tailer): positions and learned tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import (
    Connection,
    insert,
    select,
    update,
)

from broker.audit import AuditRecord
from broker.errors import (
    Conflict,
)
from broker.rows import (
    TaskRow,
    VaultAuditPosition,
)
from broker.store._base import StoreBase
from broker.store.schema import (
    tasks,
    vault_audit_position,
    vault_audit_requests,
    vault_audit_tokens,
)
from broker.store.statements import (
    _append_many,
    _chunks,
    _insert_tokens,
)


class VaultAuditStore(StoreBase):
    async def vault_audit_positions(self, path: str) -> list[VaultAuditPosition]:
        """Where the Vault audit tailer of ``path`` is in each file it knows; empty before its first start."""
        def run() -> list[VaultAuditPosition]:
            with self._read() as conn:
                rows = conn.execute(select(vault_audit_position).where(vault_audit_position.c.path == path)
                                    ).mappings().all()
            return [VaultAuditPosition(path=r["path"], device=r["device"], inode=r["inode"], offset=r["offset"],
                                       lines=r["lines"]) for r in rows]
        return await self._run(run)

    async def vault_audit_context(self, task_ids: Sequence[str], accessors: Sequence[str]
                                  ) -> tuple[dict[str, TaskRow], dict[str, tuple[str, str | None]]]:
        """The learned tokens among ``accessors``, and the tasks named by ``task_ids`` or by those tokens."""
        def run() -> tuple[dict[str, TaskRow], dict[str, tuple[str, str | None]]]:
            found: dict[str, TaskRow] = {}
            learned: dict[str, tuple[str, str | None]] = {}
            with self._read() as conn:
                for chunk in _chunks(sorted(set(accessors))):
                    learned.update((r[0], (r[1], r[2])) for r in conn.execute(
                        select(vault_audit_tokens.c.accessor_hmac, vault_audit_tokens.c.task,
                               vault_audit_tokens.c.lease)
                        .where(vault_audit_tokens.c.accessor_hmac.in_(chunk))))
                wanted = set(task_ids) | {t for t, _ in learned.values()}
                for chunk in _chunks(sorted(wanted)):
                    found.update((r["id"], TaskRow(**r))
                                 for r in conn.execute(select(tasks).where(tasks.c.id.in_(chunk))).mappings())
            return found, learned
        return await self._run(run)

    async def merge_vault_audit(self, *, moves: Sequence[tuple[VaultAuditPosition | None, VaultAuditPosition]],
                                records: Sequence[AuditRecord], tokens: Mapping[str, tuple[str, str | None]],
                                now: float, drop: Sequence[VaultAuditPosition] = (), dedupe: bool = False) -> None:
        """Append the records merged from Vault's audit file, the tokens learned, and the new positions: one
        transaction, so a crash loses nothing and repeats nothing.

        Each move is (expected, new) for one file: a compare-and-set from ``expected`` (None: the file is
        new to the tailer), so a second tailer fails here instead of merging the same lines twice.
        ``drop`` forgets files that no longer exist. With ``dedupe`` (several nodes' files), a ``vault.*``
        record of a Vault request already merged from another file is left out, and the request ids of
        those kept are remembered, in the same transaction.

        Raises:
            Conflict: a stored position is not the expected one (another tailer moved it).
        """
        t = vault_audit_position

        def run() -> None:
            with self._tx() as conn:
                for expected, new in moves:
                    key = (t.c.path == new.path, t.c.device == new.device, t.c.inode == new.inode)
                    vals = {"offset": new.offset, "lines": new.lines, "updated_at": now}
                    if expected is None:
                        if conn.execute(select(t.c.path).where(*key)).first() is not None:
                            raise Conflict("the Vault audit position moved", reason="another tailer started first")
                        conn.execute(insert(t).values(path=new.path, device=new.device, inode=new.inode, **vals))
                    elif conn.execute(update(t).where(*key, t.c.offset == expected.offset).values(**vals)
                                      ).rowcount != 1:
                        raise Conflict("the Vault audit position moved", reason="another tailer merged these lines")
                for old in drop:
                    conn.execute(t.delete().where(t.c.path == old.path, t.c.device == old.device,
                                                  t.c.inode == old.inode))
                _append_many(conn, _first_seen(conn, records, now) if dedupe else records)
                _insert_tokens(conn, tokens, now)
        await self._run(run)

    async def remember_vault_tokens(self, tokens: Mapping[str, tuple[str, str | None]], *, now: float) -> None:
        """Learn tokens (HMAC'd accessor -> task, lease) from outside the log (``sys/audit-hash``)."""
        def run() -> None:
            with self._tx() as conn:
                _insert_tokens(conn, tokens, now)
        await self._run(run)


def _first_seen(conn: Connection, records: Sequence[AuditRecord], now: float) -> list[AuditRecord]:
    """``records`` without the Vault requests merged before (from another node's file) or twice in the batch.

    Inside the merge's transaction: two merges that race insert the same request id, and the second one's
    primary key fails it (the tailer retries from the stored position, and then skips the entry).
    """
    t = vault_audit_requests
    ids = sorted({r.vault_request_id for r in records if r.vault_request_id and r.event.startswith("vault.")})
    seen: set[str] = set()
    for chunk in _chunks(ids):
        seen.update(str(r[0]) for r in conn.execute(select(t.c.request_id).where(t.c.request_id.in_(chunk))))
    kept: list[AuditRecord] = []
    fresh: list[dict[str, object]] = []
    for r in records:
        rid = r.vault_request_id
        if rid and r.event.startswith("vault."):
            if rid in seen:
                continue
            seen.add(rid)
            fresh.append({"request_id": rid, "seen_at": now})
        kept.append(r)
    if fresh:
        conn.execute(insert(t), fresh)
    return kept
