"""Vault's own audit record merged into the chain (broker.audit.tailer): positions and learned tokens."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from broker import journal
from broker.audit import AuditRecord
from broker.audit.canonical import RenderedRecord
from broker.errors import (
    Conflict,
)
from broker.intents import IntentState
from broker.journal import ISSUED, PROBE_PREFIX
from broker.rows import (
    JournalEntry,
    LookupSource,
    TaskRow,
    VaultAuditPosition,
)
from broker.states import LeaseState
from broker.store._base import StoreBase
from broker.store.prepared import Prepared, one_row
from broker.store.schema import (
    intents,
    leases,
    tasks,
    vault_audit_position,
    vault_audit_requests,
    vault_audit_tokens,
    vault_journal,
)
from broker.store.statements import (
    P_INSERT_INTENT_IF_NEW,
    P_TASK_BY_ID,
    _append_many,
    _chunks,
    _insert_tokens,
)

# The tailer's statements, prepared (broker.store.prepared): each merge runs them, at any rate of lines.
_POSITION_KEY = (vault_audit_position.c.path == bindparam("path"),
                 vault_audit_position.c.device == bindparam("device"),
                 vault_audit_position.c.inode == bindparam("inode"))
_POSITION_VALUES: dict[str, Any] = {c: bindparam(c) for c in ("offset", "lines", "updated_at", "last_entry_at")}
P_POSITION_EXISTS = Prepared(select(vault_audit_position.c.path).where(*_POSITION_KEY))
P_INSERT_POSITION = Prepared(insert(vault_audit_position).values(
    path=bindparam("path"), device=bindparam("device"), inode=bindparam("inode"), **_POSITION_VALUES))
P_MOVE_POSITION = Prepared(update(vault_audit_position).where(
    *_POSITION_KEY, vault_audit_position.c.offset == bindparam("expected")).values(**_POSITION_VALUES))
P_TOKEN_BY_ACCESSOR = Prepared(select(vault_audit_tokens.c.accessor_hmac, vault_audit_tokens.c.task,
                                      vault_audit_tokens.c.lease)
                               .where(vault_audit_tokens.c.accessor_hmac == bindparam("accessor")))
_JOURNAL_VALUES: dict[str, Any] = {c.name: bindparam(c.name) for c in vault_journal.c}
P_JOURNAL_IF_NEW = Prepared(
    sqlite_insert(vault_journal).values(_JOURNAL_VALUES).on_conflict_do_nothing(),
    per_dialect={"postgresql": pg_insert(vault_journal).values(_JOURNAL_VALUES).on_conflict_do_nothing()})


# The journal's kinds that name what Vault created: a journaled answer, and an issuance token's (rule 7).
_ANSWERS = ("response", ISSUED)
# The lease states Vault may still list (revoked and expired ones it confirmed gone).
_LIVE_LEASE_STATES = (LeaseState.ACTIVE.value, LeaseState.REVOKE_PENDING.value, LeaseState.RELEASED.value)


class VaultAuditStore(StoreBase):
    async def vault_audit_positions(self, path: str) -> list[VaultAuditPosition]:
        """Where the Vault audit tailer of ``path`` is in each file it knows; empty before its first start."""
        def run() -> list[VaultAuditPosition]:
            with self._read() as conn:
                rows = conn.execute(select(vault_audit_position).where(vault_audit_position.c.path == path)
                                    ).mappings().all()
            return [VaultAuditPosition(path=r["path"], device=r["device"], inode=r["inode"], offset=r["offset"],
                                       lines=r["lines"], last_entry_at=r["last_entry_at"]) for r in rows]
        return await self._run(run)

    async def journal_for(self, intent_id: str) -> list[JournalEntry]:
        """What Vault's audit device wrote for a journaled intent, as far as the tailer has read it."""
        q = select(vault_journal).where(vault_journal.c.intent_id == intent_id)

        def run() -> list[JournalEntry]:
            with self._read() as conn:
                return [JournalEntry(**r) for r in conn.execute(q).mappings()]
        return await self._run(run)

    async def journal_unswept(self, *, limit: int = 100) -> list[JournalEntry]:
        """Answers that created something for an intent given up on (``aborted``) and not yet revoked: the
        late-answer sweep's work (broker.journal rule 6)."""
        q = (select(vault_journal).join(intents, intents.c.id == vault_journal.c.intent_id)
             .where(vault_journal.c.kind.in_(_ANSWERS), vault_journal.c.swept.is_(False),
                    vault_journal.c.failed.is_(False), intents.c.state == IntentState.ABORTED.value,
                    or_(vault_journal.c.lease_id.is_not(None), vault_journal.c.accessor.is_not(None)))
             .order_by(vault_journal.c.at).limit(limit))

        def run() -> list[JournalEntry]:
            with self._read() as conn:
                return [JournalEntry(**r) for r in conn.execute(q).mappings()]
        return await self._run(run)

    async def journal_unsearched(self, *, skip_paths: Sequence[str] = (), limit: int = 100
                                 ) -> list[tuple[JournalEntry, float]]:
        """Backend errors answered to issuance tokens whose intent is ``aborted`` and whose path is not searched
        yet, each with its intent's creation: where a failed read may have left a lease (broker.journal rule 9).
        ``skip_paths``: paths whose search waits (a stuck one must not hold the newer ones back)."""
        # The answer must come from the intent's own task (broker.journal rule 1).
        waiting = [vault_journal.c.path.not_in(list(skip_paths))] if skip_paths else []
        q = (select(vault_journal, intents.c.created_at.label("intent_created_at"))
             .join(intents, and_(intents.c.id == vault_journal.c.intent_id,
                                 intents.c.task_id == vault_journal.c.task_id))
             .where(vault_journal.c.kind == ISSUED, vault_journal.c.vault_error.is_(True),
                    vault_journal.c.swept.is_(False), intents.c.state == IntentState.ABORTED.value, *waiting)
             .order_by(vault_journal.c.at).limit(limit))

        def run() -> list[tuple[JournalEntry, float]]:
            with self._read() as conn:
                rows = [dict(r) for r in conn.execute(q).mappings()]
            return [(JournalEntry(**{k: v for k, v in r.items() if k != "intent_created_at"}),
                     float(r["intent_created_at"])) for r in rows]
        return await self._run(run)

    async def claim_orphan_answers(self, *, before: float, now: float, limit: int = 500) -> list[JournalEntry]:
        """Claim the journal's answers from before ``before`` that no intent and no lease names (broker.journal
        rule 8): write each one's intent ``aborting`` (journaled, due ``now``), so the settler revokes what
        the answer created. Answers whose intent exists, and refusals, are only marked checked. Returns the
        claimed answers.

        The intent's primary key arbitrates with an issuance still recording it (``record_issuance``): the
        first writer wins, so a claim never takes a credential that was handed out.
        """
        answer = and_(vault_journal.c.checked.is_(False), vault_journal.c.kind == "response",
                      vault_journal.c.at < before)
        known = or_(exists().where(intents.c.id == vault_journal.c.intent_id),
                    exists().where(leases.c.id == vault_journal.c.intent_id))
        # A refusal created nothing (``decide`` concludes the same), and a task this store does not hold is
        # another deployment's sharing the Vault (and its audit log): no intent to claim for either.
        ours = exists().where(tasks.c.id == vault_journal.c.task_id)
        seen = (update(vault_journal).where(answer, or_(known, vault_journal.c.failed.is_(True), ~ours))
                .values(checked=True))
        left = select(vault_journal).where(answer).order_by(vault_journal.c.at).limit(limit)

        def run() -> list[JournalEntry]:
            with self._tx() as conn:
                conn.execute(seen)
                orphans = [JournalEntry(**r) for r in conn.execute(left).mappings()]
                for e in orphans:
                    P_INSERT_INTENT_IF_NEW.execute(conn, vars(journal.orphan_intent(e, now=now)))
                for chunk in _chunks([e.intent_id for e in orphans]):
                    conn.execute(update(vault_journal).where(vault_journal.c.intent_id.in_(chunk),
                                                             vault_journal.c.kind == "response")
                                 .values(checked=True))
            return orphans
        return await self._run(run)

    async def unnamed_vault_leases(self, lease_ids: Sequence[str], *, since: float) -> list[str]:
        """The Vault lease ids among ``lease_ids`` (a grant path's listing) that neither a live lease nor a
        journal answer from ``since`` on (Vault's time) names: what a read Vault's backend failed may have
        left, if it was issued from ``since`` on (broker.journal rule 9; the caller checks that).

        Both reads go by index (live leases by state, answers by time), not by the listed ids, which no
        index covers: a search stays bounded by the live leases and the recent answers, however long the
        tables. Every live lease counts, whatever its grant's path: a live credential must never look
        unnamed because two spellings of one path differ. A revoked or expired lease is one Vault confirmed
        gone; an answer before ``since`` names a lease issued before the window.
        """
        live = select(leases.c.vault_lease_id).where(leases.c.state.in_(_LIVE_LEASE_STATES))
        # ``checked`` leads the only index with ``at`` in it (ix_vault_journal_checked): naming both of its
        # values lets the time range use it.
        answered = (select(vault_journal.c.lease_id)
                    .where(vault_journal.c.checked.in_((False, True)), vault_journal.c.kind.in_(_ANSWERS),
                           vault_journal.c.at >= since, vault_journal.c.lease_id.is_not(None)))

        def run() -> list[str]:
            with self._read() as conn:
                named = set(conn.execute(live).scalars())
                named.update(conn.execute(answered).scalars())
            return [i for i in lease_ids if i not in named]
        return await self._run(run)

    async def journal_swept(self, intent_id: str) -> None:
        """What Vault created for this intent is gone: the sweep is done with it."""
        def run() -> None:
            with self._tx() as conn:
                conn.execute(update(vault_journal).where(vault_journal.c.intent_id == intent_id)
                             .values(swept=True))
        await self._run(run)

    async def journal_read_until(self) -> float | None:
        """Vault's time of the newest audit entry the tailer has read (any file), None before it read one."""
        q = select(func.max(vault_audit_position.c.last_entry_at))

        def run() -> float | None:
            with self._read() as conn:
                v = conn.execute(q).scalar_one_or_none()
            return float(v) if v is not None else None
        return await self._run(run)

    async def vault_audit_context(self, task_ids: Sequence[str], accessors: Sequence[str]
                                  ) -> tuple[dict[str, TaskRow], dict[str, tuple[str, str | None]]]:
        """The learned tokens among ``accessors``, and the tasks named by ``task_ids`` or by those tokens."""
        def run() -> tuple[dict[str, TaskRow], dict[str, tuple[str, str | None]]]:
            found: dict[str, TaskRow] = {}
            learned: dict[str, tuple[str, str | None]] = {}
            # One prepared lookup per id, not an IN list: a batch names a few tasks, and building an
            # expanding IN statement through SQLAlchemy cost more than the lookups themselves.
            with self._read() as conn:
                for accessor in set(accessors):
                    hit = P_TOKEN_BY_ACCESSOR.execute(conn, {"accessor": accessor}).fetchone()
                    if hit is not None:
                        learned[hit[0]] = (hit[1], hit[2])
                for task_id in set(task_ids) | {t for t, _ in learned.values()}:
                    r = one_row(P_TASK_BY_ID.execute(conn, {"id": task_id}))
                    if r is not None:
                        found[task_id] = TaskRow(**r)
            return found, learned
        return await self._run(run)

    async def ingest_source(self) -> LookupSource | None:
        """How another process runs :meth:`vault_audit_context` (the tailer's ingest worker); None when no other
        process can open this database (SQLite in memory)."""
        def run() -> LookupSource | None:
            target = self._dbapi_target()
            if target is None:
                return None
            with self._read() as conn:
                token_sql, token_order, _ = P_TOKEN_BY_ACCESSOR.rendered(conn)
                task_sql, task_order, _ = P_TASK_BY_ID.rendered(conn)
            return LookupSource(*target, token_sql, token_order, task_sql, task_order)
        return await self._run(run)

    async def merge_vault_audit(self, *, moves: Sequence[tuple[VaultAuditPosition | None, VaultAuditPosition]],
                                records: Sequence[AuditRecord | RenderedRecord],
                                tokens: Mapping[str, tuple[str, str | None]], now: float,
                                drop: Sequence[VaultAuditPosition] = (), journal: Sequence[JournalEntry] = (),
                                dedupe: bool = False) -> None:
        """Append the records merged from Vault's audit file, the tokens learned, and the new positions: one
        transaction, so a crash loses nothing and repeats nothing.

        Each move is (expected, new) for one file: a compare-and-set from ``expected`` (None: the file is
        new to the tailer), so a second tailer fails here instead of merging the same lines twice.
        ``drop`` forgets files that no longer exist. ``journal`` holds the entries of journaled intents
        (``broker.journal``); an entry already there (a line read twice after a truncation) is kept as is.
        ``records`` may come rendered already (``broker.audit.ingest``'s worker: redacted, canonical bytes
        around the seq). With ``dedupe`` (several nodes' files), a ``vault.*``
        record of a Vault request already merged from another file is left out, and the request ids of
        those kept are remembered, in the same transaction.

        Raises:
            Conflict: a stored position is not the expected one (another tailer moved it).
        """

        def run() -> None:
            with self._tx() as conn:
                for expected, new in moves:
                    vals = {"path": new.path, "device": new.device, "inode": new.inode, "offset": new.offset,
                            "lines": new.lines, "updated_at": now, "last_entry_at": new.last_entry_at}
                    if expected is None:
                        if P_POSITION_EXISTS.execute(conn, vals).fetchone() is not None:
                            raise Conflict("the Vault audit position moved", reason="another tailer started first")
                        P_INSERT_POSITION.execute(conn, vals)
                    elif P_MOVE_POSITION.execute(conn, {**vals, "expected": expected.offset}).rowcount != 1:
                        raise Conflict("the Vault audit position moved", reason="another tailer merged these lines")
                for old in drop:
                    conn.execute(vault_audit_position.delete().where(*_POSITION_KEY),
                                 {"path": old.path, "device": old.device, "inode": old.inode})
                _append_many(conn, _first_seen(conn, records, now) if dedupe else records)
                _insert_tokens(conn, tokens, now)
                _insert_journal(conn, journal)
        # Replayable: a merge lost to a power cut is read again from Vault's file at the old position.
        await self._run_replayable(run)

    async def remember_vault_tokens(self, tokens: Mapping[str, tuple[str, str | None]], *, now: float) -> None:
        """Learn tokens (HMAC'd accessor -> task, lease) from outside the log (``sys/audit-hash``)."""
        def run() -> None:
            with self._tx() as conn:
                _insert_tokens(conn, tokens, now)
        await self._run(run)


def _insert_journal(conn: Connection, entries: Sequence[JournalEntry]) -> None:
    """Insert the entries not yet known (by intent and kind): the first reading of an entry stands."""
    if entries:
        # Only a journaled answer can be an orphan (broker.journal rule 8): every other entry is born checked.
        P_JOURNAL_IF_NEW.executemany(conn, [
            {**vars(e), "checked": e.kind != "response" or e.intent_id.startswith(PROBE_PREFIX)} for e in entries])


def _first_seen(conn: Connection, records: Sequence[AuditRecord | RenderedRecord], now: float
                ) -> list[AuditRecord | RenderedRecord]:
    """``records`` without the Vault requests merged before (from another node's file) or twice in the batch.

    Inside the merge's transaction: two merges that race insert the same request id, and the second one's
    primary key fails it (the tailer retries from the stored position, and then skips the entry).
    """
    t = vault_audit_requests
    ids = sorted({r.vault_request_id for r in records if r.vault_request_id and r.event.startswith("vault.")})
    seen: set[str] = set()
    for chunk in _chunks(ids):
        seen.update(str(r[0]) for r in conn.execute(select(t.c.request_id).where(t.c.request_id.in_(chunk))))
    kept: list[AuditRecord | RenderedRecord] = []
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
