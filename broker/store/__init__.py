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

import asyncio
import functools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.pool import StaticPool
from sqlalchemy.sql import Select

from broker.audit import AuditRecord, ChainLink, canonical_bytes, chain_hash
from broker.errors import (
    BrokerError,
    BudgetExceeded,
    Conflict,
    Gone,
    Locked,
    StoreUnavailable,
)
from broker.identity import is_person_id, normalize_email
from broker.intents import FINAL, IntentEvent, IntentState, next_state
from broker.store.rows import (
    ApprovalRow,
    AuditRow,
    CheckpointRow,
    Intent,
    LeaseLimits,
    LeaseRow,
    Person,
    RevocationRow,
    TaskRow,
    VaultAuditPosition,
)
from broker.store.schema import (
    approval_votes,
    approvals,
    audit_checkpoints,
    audit_events,
    audit_export,
    audit_head,
    health_probe,
    intents,
    leases,
    person_emails,
    revocations,
    tasks,
    vault_audit_position,
    vault_audit_tokens,
)

__all__ = ["ApprovalRow", "AuditRow", "CheckpointRow", "Intent", "LeaseLimits", "LeaseRow", "Person", "RevocationRow",
           "Store", "TaskRow", "VaultAuditPosition", "open_store"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# -- statements, compiled once -----------------------------------------------------------------------

_INSERT_TASK = insert(tasks)
_INSERT_LEASE = insert(leases)
_INSERT_INTENT = insert(intents)
_INSERT_AUDIT = insert(audit_events)
_INSERT_REVOCATION = insert(revocations)
_TASK_BY_ID = select(tasks).where(tasks.c.id == bindparam("id"))
_TASK_STATE_FOR_UPDATE = select(tasks.c.state).where(tasks.c.id == bindparam("id")).with_for_update()
_LEASE_BY_ID = select(leases).where(leases.c.id == bindparam("id"))
_INTENT_BY_ID = select(intents).where(intents.c.id == bindparam("id"))
_PROBE = update(health_probe).where(health_probe.c.id == 1).values(probed_at=bindparam("at"))
# A lock on a user names their person id or an email address. An address holds the person behind it:
# it matches the address their token claims now (verified or not: a claim can only lock its presenter
# out), and every address any of their tokens claimed before (person_emails), so a token that drops or
# changes the address is still locked. A lock from before person ids (migration 0009) may hold a bare
# subject: it matches that subject at any issuer (a lock only refuses, so matching wider is safe).
_LOCK_HIT = select(revocations.c.id, revocations.c.kind).where(
    revocations.c.lock.is_(True),
    or_(and_(revocations.c.kind == "user",
             or_(revocations.c.value == bindparam("user"), revocations.c.value == bindparam("email"),
                 revocations.c.value == bindparam("subject"),
                 revocations.c.value.in_(select(person_emails.c.email)
                                         .where(person_emails.c.person == bindparam("user"))))),
        and_(revocations.c.kind == "agent", revocations.c.value == bindparam("agent")),
        and_(revocations.c.kind == "tenant", revocations.c.value == bindparam("tenant"))),
).limit(1)
# Live leases of one agent and of one user: from the task indexes to the (task_id, state) index, so the
# cost follows that agent's and that user's tasks, not every live lease in the store.
_LIVE_BY_AGENT = select(func.count()).select_from(leases).where(
    leases.c.state == "active", leases.c.task_id.in_(select(tasks.c.id).where(tasks.c.agent == bindparam("agent"))))
_LIVE_BY_USER = select(func.count()).select_from(leases).where(
    leases.c.state == "active", leases.c.task_id.in_(select(tasks.c.id).where(tasks.c.user == bindparam("user"))))
_RENEW = (update(leases).where(leases.c.id == bindparam("lid"), leases.c.state == "active")
          .values(expires_at=bindparam("new_expiry")))
_RECORD_FIELDS = tuple(AuditRecord.__dataclass_fields__)
_HEAD_FOR_UPDATE = select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1).with_for_update()
_MOVE_HEAD = update(audit_head).where(audit_head.c.id == 1).values(seq=bindparam("new_seq"),
                                                                   hash=bindparam("new_hash"))
_HEAD = select(audit_head.c.seq, audit_head.c.hash).where(audit_head.c.id == 1)
# The chain as stored, in AuditRecord's field order so that a row becomes a record positionally (the
# verifier reads a million of them).
_CHAIN_PAGE = (select(audit_events.c.seq, *[audit_events.c[f] for f in _RECORD_FIELDS], audit_events.c.prev_hash,
                      audit_events.c.hash)
               .where(audit_events.c.seq > bindparam("after")).order_by(audit_events.c.seq).limit(bindparam("lim")))
_INSERT_CHECKPOINT = insert(audit_checkpoints)
_LAST_CHECKPOINT = select(audit_checkpoints).order_by(audit_checkpoints.c.seq.desc()).limit(1)


class Store:
    def __init__(self, engine: Engine, *, sqlite: bool, threads: int = 4) -> None:
        self._engine = engine
        # SQLite has one writer (and here one connection): one thread serialises every transaction,
        # which is what SQLite would do anyway, without "database is locked" retries.
        self._executor = ThreadPoolExecutor(max_workers=1 if sqlite else threads, thread_name_prefix="broker-store")

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._engine.dispose)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))
        except SQLAlchemyError as exc:
            log.error("store operation %s failed: %s", getattr(fn, "__name__", "?"), type(exc).__name__)
            raise StoreUnavailable("the store is unavailable", reason=type(exc).__name__) from exc

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self._engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._engine.connect() as conn:
            yield conn

    async def ping(self) -> None:
        """Raises: StoreUnavailable."""
        def run() -> None:
            with self._read() as conn:
                conn.execute(select(1))
        await self._run(run)

    async def probe_write(self, *, now: float) -> None:
        """Commit a one-row write, as issuing must: a readable store that cannot commit is not ready.

        Callers rate-limit it (``broker.readiness``): one small transaction per probe.

        Raises:
            StoreUnavailable: the write or its commit failed (a full disk, a read-only file or database).
        """
        def run() -> None:
            with self._tx() as conn:
                if conn.execute(_PROBE, {"at": now}).rowcount == 0:
                    conn.execute(insert(health_probe).values(id=1, probed_at=now))
        try:
            await self._run(run)
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, IntegrityError):
                return  # another replica inserted the row first: its write proves the same
            raise

    # -- tasks ---------------------------------------------------------------------------------------

    async def begin_task(self, intent: Intent, *, user: Person, agent: str, tenant: str) -> None:
        """Record the intent to create a task token, unless an operator lock covers the user, agent or tenant.

        The person's trusted email is remembered first, and kept even when a lock refuses the start: a
        lock by that address then holds them through any later token (see ``_LOCK_HIT``).

        Raises:
            Locked: an active lock covers the user, agent or tenant.
        """
        def run() -> None:
            refused: Locked | None = None
            with self._tx() as conn:
                _remember_person(conn, user, intent.created_at)
                try:
                    _check_locks(conn, user=user.id, email=user.email, agent=agent, tenant=tenant)
                except Locked as exc:
                    refused = exc  # commit what was learnt about the person, then refuse
                else:
                    conn.execute(_INSERT_INTENT, asdict(intent))
            if refused is not None:
                raise refused
        await self._run(run)

    async def create_task(self, row: TaskRow, record: AuditRecord) -> bool:
        """Record the task and complete its intent. False when the intent was aborted meanwhile.

        Raises:
            Locked: a lock on the user, agent or tenant was written since the intent.
        """
        def run() -> bool:
            with self._tx() as conn:
                # Checked again here: a lock may have been written since the intent was.
                _check_locks(conn, user=row.user, email=row.user_email, agent=row.agent, tenant=row.tenant)
                if not _move_intent(conn, row.id, IntentState.OPEN, IntentEvent.RECORDED, row.created_at):
                    return False
                conn.execute(_INSERT_TASK, asdict(row))
                _append(conn, record)
            return True
        return await self._run(run)

    async def check_unlocked(self, person: Person, *, now: float) -> None:
        """Refuse a locked person (staff too: an offboarded operator or auditor acts no more).

        Raises:
            Locked: an operator's lock covers ``person`` (by id, by an address they claim or claimed).
        """
        def run() -> None:
            refused: Locked | None = None
            with self._tx() as conn:
                _remember_person(conn, person, now)
                try:
                    _check_locks(conn, user=person.id, email=person.email, agent="", tenant="")
                except Locked as exc:
                    refused = exc
            if refused is not None:
                raise refused
        await self._run(run)

    async def same_person(self, person: Person, other: str, *, now: float) -> bool:
        """Whether ``person`` may be the person recorded as ``other``: the same id, or an address shared now
        or before. For rules that refuse on a match (self-approval), so it leans to "the same"."""
        def run() -> bool:
            if person.id == other:
                return True
            with self._tx() as conn:
                _remember_person(conn, person, now)
                hit = conn.execute(_persons_sharing_email(person.id).where(person_emails.c.person == other)
                                   .limit(1)).first()
            return hit is not None
        return await self._run(run)

    async def get_task(self, task_id: str) -> TaskRow | None:
        def run() -> TaskRow | None:
            with self._read() as conn:
                r = conn.execute(_TASK_BY_ID, {"id": task_id}).mappings().first()
            return TaskRow(**r) if r is not None else None
        return await self._run(run)

    async def fence_tasks(self, task_ids: Sequence[str], *, state: str, now: float,
                          records: Sequence[AuditRecord], revocation: RevocationRow | None = None,
                          record_for: Callable[[TaskRow], AuditRecord] | None = None,
                          retry_after: float = 60.0) -> list[str]:
        """Move active tasks to ``state``; their tokens and active leases become ``revoke_pending``.

        From this commit on no lease of these tasks can be recorded. Returns the ids that were still
        active; of ``records``, only those of a won task (or of no task) are written, so two concurrent
        enders cannot both record the end.

        With a ``revocation``, the tasks are the ones its selector matches *inside this transaction*
        (``task_ids`` is ignored), and its lock is written in the same transaction: a task start that
        committed before this transaction is fenced here, and one that commits after it meets the lock.
        ``record_for`` then makes each fenced task's record.
        """
        def run() -> list[str]:
            fenced: list[str] = []
            with self._tx() as conn:
                ids = list(task_ids)
                if revocation is not None:
                    conn.execute(_INSERT_REVOCATION, asdict(revocation))
                    q = _by_task(select(tasks.c.id).where(tasks.c.state == "active"),
                                 **{k: revocation.value if k == revocation.kind else None
                                    for k in ("user", "agent", "task", "tenant")})
                    ids = [r[0] for r in conn.execute(q)]
                for chunk in _chunks(ids):
                    res = conn.execute(
                        update(tasks).where(tasks.c.id.in_(chunk), tasks.c.state == "active")
                        # The caller settles these now; the maintenance loop takes over only if it has not
                        # finished by then (else both would revoke and confirm the same task at once).
                        .values(state=state, ended_at=now, token_state="revoke_pending",
                                next_attempt_at=now + retry_after,
                                revocation_id=revocation.id if revocation else None)
                        .returning(tasks.c.id)
                    )
                    fenced += [r[0] for r in res]
                moved = 0
                for chunk in _chunks(fenced):
                    moved += conn.execute(update(leases).where(leases.c.task_id.in_(chunk), leases.c.state == "active")
                                          .values(state="revoke_pending")).rowcount
                if revocation is not None:
                    # The counts as they were at the fence, for the operator's progress report.
                    conn.execute(update(revocations).where(revocations.c.id == revocation.id)
                                 .values(tasks=len(fenced), leases=moved))
                won = set(fenced)
                for record in records:
                    if record.task is None or record.task in won:
                        _append(conn, record)
                if record_for is not None:
                    for chunk in _chunks(fenced):
                        for r in conn.execute(select(tasks).where(tasks.c.id.in_(chunk))).mappings():
                            _append(conn, record_for(TaskRow(**r)))
            return fenced
        return await self._run(run)

    async def find_tasks(self, *, user: str | None = None, agent: str | None = None, task: str | None = None,
                         tenant: str | None = None, states: Sequence[str] | None = None,
                         expires_before: float | None = None, limit: int = 1000, after: str | None = None,
                         token_state: str | None = None, created_before: float | None = None,
                         ) -> list[TaskRow]:
        q = select(tasks).order_by(tasks.c.created_at, tasks.c.id).limit(limit)
        if token_state is not None:
            q = q.where(tasks.c.token_state == token_state)
        if created_before is not None:
            q = q.where(tasks.c.created_at < created_before)
        q = _by_task(q, user=user, agent=agent, task=task, tenant=tenant)
        if states is not None:
            q = q.where(tasks.c.state.in_(states))
        if expires_before is not None:
            q = q.where(tasks.c.expires_at <= expires_before)
        if after is not None:
            created, last_id = _cursor(after)
            q = q.where(tuple_(tasks.c.created_at, tasks.c.id) > tuple_(created, last_id))

        def run() -> list[TaskRow]:
            with self._read() as conn:
                return [TaskRow(**r) for r in conn.execute(q).mappings()]
        return await self._run(run)

    async def mark_token_live(self, task_id: str) -> None:
        """The task token was extended from its bootstrap TTL to the task's end."""
        def run() -> None:
            with self._tx() as conn:
                conn.execute(update(tasks).where(tasks.c.id == task_id, tasks.c.token_state == "bootstrap")
                             .values(token_state="live"))
        await self._run(run)

    async def tasks_due_for_revocation(self, *, now: float, limit: int = 500) -> list[TaskRow]:
        q = (select(tasks).where(tasks.c.token_state == "revoke_pending", tasks.c.next_attempt_at <= now)
             .order_by(tasks.c.next_attempt_at).limit(limit))

        def run() -> list[TaskRow]:
            with self._read() as conn:
                return [TaskRow(**r) for r in conn.execute(q).mappings()]
        return await self._run(run)

    async def confirm_revoked(self, task_id: str, *, lease_ids: Sequence[str], lease_state: str, now: float,
                              records: Sequence[AuditRecord]) -> None:
        """Vault confirmed: the task token is gone and so are these leases."""
        def run() -> None:
            with self._tx() as conn:
                conn.execute(update(tasks).where(tasks.c.id == task_id)
                             .values(token_state="revoked", next_attempt_at=None))
                for chunk in _chunks(list(lease_ids)):
                    conn.execute(update(leases)
                                 .where(leases.c.id.in_(chunk), leases.c.state.in_(("revoke_pending", "active")))
                                 .values(state=lease_state, revoked_at=now))
                for record in records:
                    _append(conn, record)
        await self._run(run)

    async def retry_later(self, task_id: str, *, attempts: int, next_attempt_at: float) -> None:
        def run() -> None:
            with self._tx() as conn:
                conn.execute(update(tasks).where(tasks.c.id == task_id)
                             .values(revoke_attempts=attempts, next_attempt_at=next_attempt_at))
        await self._run(run)

    # -- issuance ------------------------------------------------------------------------------------

    async def begin_issuance(self, intent: Intent, *, user: str, user_email: str | None, agent: str, tenant: str,
                             limits: LeaseLimits | None = None, approval_id: str | None = None) -> None:
        """Record the intent to issue, in the transaction that checks the task, the locks and the budgets.

        Raises:
            Gone: the task is no longer active. Locked: an operator lock covers the user, agent or tenant.
            BudgetExceeded: the agent or the user holds as many live leases as allowed.
        """
        def run() -> None:
            with self._tx() as conn:
                state = conn.execute(_TASK_STATE_FOR_UPDATE, {"id": intent.task_id}).scalar_one_or_none()
                if state != "active":
                    raise Gone("the task is no longer active", reason=f"task {intent.task_id} is {state}")
                _check_locks(conn, user=user, email=user_email, agent=agent, tenant=tenant)
                if limits is not None:
                    _check_budget(conn, user=user, agent=agent, limits=limits)
                if approval_id is not None:
                    # Single use: the approval is spent by the transaction that records this issuance's intent.
                    spent = conn.execute(update(approvals).where(
                        approvals.c.id == approval_id, approvals.c.state == "approved",
                        approvals.c.expires_at > intent.created_at).values(state="consumed",
                                                                           consumed_lease=intent.id))
                    if spent.rowcount != 1:
                        raise Conflict("the approval was already used or has expired",
                                       reason=f"approval {approval_id} not consumable")
                conn.execute(_INSERT_INTENT, asdict(intent))
        await self._run(run)

    async def complete_issuance(self, row: LeaseRow, record: AuditRecord) -> bool:
        """Record the lease and complete its intent, only while the task is active and the intent still open.

        Returns False, writing nothing, otherwise: the caller then revokes what it got.
        """
        def run() -> bool:
            with self._tx() as conn:
                state = conn.execute(_TASK_STATE_FOR_UPDATE, {"id": row.task_id}).scalar_one_or_none()
                if state != "active" or not _move_intent(conn, row.id, IntentState.OPEN, IntentEvent.RECORDED,
                                                         row.issued_at):
                    conn.rollback()
                    return False
                values = asdict(row)
                values["renewable"] = int(row.renewable)
                conn.execute(_INSERT_LEASE, values)
                _append(conn, record)
            return True
        return await self._run(run)

    async def move_intent(self, intent_id: str, *, from_state: IntentState, event: IntentEvent, now: float,
                          accessor: str | None = None, attempts: int | None = None,
                          next_attempt_at: float | None = None, record: AuditRecord | None = None) -> bool:
        """Move an intent along the table (``broker.intents.next_state``), compare-and-set on ``from_state``.

        The first writer wins: False, writing nothing, when the intent was no longer in ``from_state``
        (it completed, or another cleanup moved it). ``accessor`` records the token a failed task start
        learned; ``attempts`` and ``next_attempt_at`` schedule the next cleanup of an ``aborting`` intent.
        A final state clears the schedule and stamps ``resolved_at``. ``record`` commits with the move.

        Raises:
            IntentTransitionError: ``event`` does not apply to ``from_state`` (a caller's bug).
        """
        def run() -> bool:
            with self._tx() as conn:
                if not _move_intent(conn, intent_id, from_state, event, now, accessor=accessor, attempts=attempts,
                                    next_attempt_at=next_attempt_at):
                    return False
                if record is not None:
                    _append(conn, record)
            return True
        return await self._run(run)

    async def get_intent(self, intent_id: str) -> Intent | None:
        def run() -> Intent | None:
            with self._read() as conn:
                r = conn.execute(_INTENT_BY_ID, {"id": intent_id}).mappings().first()
            return Intent(**r) if r is not None else None
        return await self._run(run)

    async def intents_due(self, *, now: float, open_before: float, limit: int = 200) -> list[Intent]:
        """Intents to reconcile: ``open`` ones from before ``open_before`` (their issuer is presumed dead),
        and ``aborting`` ones whose next cleanup is due, the longest-waiting first."""
        due_at = func.coalesce(intents.c.next_attempt_at, intents.c.created_at)
        q = (select(intents).where(or_(
            and_(intents.c.state == IntentState.OPEN.value, intents.c.created_at < open_before),
            and_(intents.c.state == IntentState.ABORTING.value,
                 or_(intents.c.next_attempt_at.is_(None), intents.c.next_attempt_at <= now))))
             .order_by(due_at).limit(limit))

        def run() -> list[Intent]:
            with self._read() as conn:
                return [Intent(**r) for r in conn.execute(q).mappings()]
        return await self._run(run)

    # -- leases --------------------------------------------------------------------------------------

    async def get_lease(self, lease_id: str) -> LeaseRow | None:
        def run() -> LeaseRow | None:
            with self._read() as conn:
                r = conn.execute(_LEASE_BY_ID, {"id": lease_id}).mappings().first()
            return _lease(r) if r is not None else None
        return await self._run(run)

    async def list_leases(self, *, task_id: str, states: Sequence[str] | None = None) -> list[LeaseRow]:
        q = select(leases).where(leases.c.task_id == task_id).order_by(leases.c.issued_at)
        if states is not None:
            q = q.where(leases.c.state.in_(states))

        def run() -> list[LeaseRow]:
            with self._read() as conn:
                return [_lease(r) for r in conn.execute(q).mappings()]
        return await self._run(run)

    async def find_leases(self, *, user: str | None = None, agent: str | None = None, task: str | None = None,
                          tenant: str | None = None, states: Sequence[str] | None = None,
                          expires_before: float | None = None, limit: int = 1000, after: str | None = None,
                          ) -> list[tuple[LeaseRow, TaskRow]]:
        q = (select(leases, *[c.label(f"t_{c.name}") for c in tasks.c])
             .join(tasks, leases.c.task_id == tasks.c.id).order_by(leases.c.issued_at, leases.c.id).limit(limit))
        q = _by_task(q, user=user, agent=agent, task=task, tenant=tenant)
        if states is not None:
            q = q.where(leases.c.state.in_(states))
        if expires_before is not None:
            q = q.where(leases.c.expires_at <= expires_before)
        if after is not None:
            issued, last_id = _cursor(after)
            q = q.where(tuple_(leases.c.issued_at, leases.c.id) > tuple_(issued, last_id))

        def run() -> list[tuple[LeaseRow, TaskRow]]:
            with self._read() as conn:
                rows = conn.execute(q).mappings().all()
            return [(_lease({c.name: r[c.name] for c in leases.c}),
                     TaskRow(**{c.name: r[f"t_{c.name}"] for c in tasks.c})) for r in rows]
        return await self._run(run)

    async def renew_lease(self, lease_id: str, *, expires_at: float, record: AuditRecord) -> None:
        """Raises: Conflict: the lease is no longer active."""
        def run() -> None:
            with self._tx() as conn:
                if conn.execute(_RENEW, {"lid": lease_id, "new_expiry": expires_at}).rowcount != 1:
                    raise Conflict("the lease is no longer active")
                _append(conn, record)
        await self._run(run)

    async def expire_leases(self, lease_ids: Sequence[str], *, now: float, records: Sequence[AuditRecord]) -> None:
        def run() -> None:
            with self._tx() as conn:
                for chunk in _chunks(list(lease_ids)):
                    conn.execute(update(leases).where(leases.c.id.in_(chunk), leases.c.state == "active")
                                 .values(state="expired", revoked_at=now))
                for record in records:
                    _append(conn, record)
        await self._run(run)

    async def lease_counts(self, *, revocation_id: str) -> dict[str, int]:
        """Leases of the tasks a revocation fenced, by state."""
        q = (select(leases.c.state, func.count()).join(tasks, leases.c.task_id == tasks.c.id)
             .where(tasks.c.revocation_id == revocation_id).group_by(leases.c.state))

        def run() -> dict[str, int]:
            with self._read() as conn:
                return {state: n for state, n in conn.execute(q).all()}
        return await self._run(run)

    # -- revocations and locks -------------------------------------------------------------------------

    async def get_revocation(self, revocation_id: str) -> RevocationRow | None:
        def run() -> RevocationRow | None:
            with self._read() as conn:
                r = conn.execute(select(revocations).where(revocations.c.id == revocation_id)).mappings().first()
            return RevocationRow(**r) if r is not None else None
        return await self._run(run)

    async def list_revocations(self, *, active_only: bool) -> list[RevocationRow]:
        q = select(revocations).order_by(revocations.c.created_at)
        if active_only:
            q = q.where(revocations.c.lock.is_(True))

        def run() -> list[RevocationRow]:
            with self._read() as conn:
                return [RevocationRow(**r) for r in conn.execute(q).mappings()]
        return await self._run(run)

    async def lift_lock(self, revocation_id: str, *, by: str, by_name: str, now: float, record: AuditRecord) -> bool:
        def run() -> bool:
            with self._tx() as conn:
                res = conn.execute(update(revocations)
                                   .where(revocations.c.id == revocation_id, revocations.c.lock.is_(True))
                                   .values(lock=False, lifted_at=now, lifted_by=by, lifted_by_name=by_name))
                if res.rowcount != 1:
                    return False
                _append(conn, record)
            return True
        return await self._run(run)

    # -- Vault's own audit record (broker.audit.tailer) -----------------------------------------------------

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
                        select(vault_audit_tokens.c.accessor_hmac, vault_audit_tokens.c.task, vault_audit_tokens.c.lease)
                        .where(vault_audit_tokens.c.accessor_hmac.in_(chunk))))
                wanted = set(task_ids) | {t for t, _ in learned.values()}
                for chunk in _chunks(sorted(wanted)):
                    found.update((r["id"], TaskRow(**r))
                                 for r in conn.execute(select(tasks).where(tasks.c.id.in_(chunk))).mappings())
            return found, learned
        return await self._run(run)

    async def merge_vault_audit(self, *, moves: Sequence[tuple[VaultAuditPosition | None, VaultAuditPosition]],
                                records: Sequence[AuditRecord], tokens: Mapping[str, tuple[str, str | None]],
                                now: float, drop: Sequence[VaultAuditPosition] = ()) -> None:
        """Append the records merged from Vault's audit file, the tokens learned, and the new positions: one
        transaction, so a crash loses nothing and repeats nothing.

        Each move is (expected, new) for one file: a compare-and-set from ``expected`` (None: the file is
        new to the tailer), so a second tailer fails here instead of merging the same lines twice.
        ``drop`` forgets files that no longer exist.

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
                _append_many(conn, records)
                _insert_tokens(conn, tokens, now)
        await self._run(run)

    async def remember_vault_tokens(self, tokens: Mapping[str, tuple[str, str | None]], *, now: float) -> None:
        """Learn tokens (HMAC'd accessor -> task, lease) from outside the log (``sys/audit-hash``)."""
        def run() -> None:
            with self._tx() as conn:
                _insert_tokens(conn, tokens, now)
        await self._run(run)

    # -- approvals -----------------------------------------------------------------------------------

    async def add_approval(self, row: ApprovalRow, record: AuditRecord) -> None:
        def run() -> None:
            with self._tx() as conn:
                conn.execute(insert(approvals), asdict(row))
                _append(conn, record)
        await self._run(run)

    async def get_approval(self, approval_id: str) -> ApprovalRow | None:
        def run() -> ApprovalRow | None:
            with self._read() as conn:
                r = conn.execute(select(approvals).where(approvals.c.id == approval_id)).mappings().first()
            return ApprovalRow(**r) if r is not None else None
        return await self._run(run)

    async def list_approvals(self, *, state: str | None, now: float, limit: int = 200) -> list[ApprovalRow]:
        q = select(approvals).order_by(approvals.c.created_at).limit(limit)
        if state == "pending":
            q = q.where(approvals.c.state == "pending", approvals.c.expires_at > now)
        elif state is not None:
            q = q.where(approvals.c.state == state)

        def run() -> list[ApprovalRow]:
            with self._read() as conn:
                return [ApprovalRow(**r) for r in conn.execute(q).mappings()]
        return await self._run(run)

    async def approval_votes(self, approval_id: str) -> list[dict[str, Any]]:
        def run() -> list[dict[str, Any]]:
            with self._read() as conn:
                q = select(approval_votes).where(approval_votes.c.approval_id == approval_id)
                return [dict(r) for r in conn.execute(q.order_by(approval_votes.c.decided_at)).mappings()]
        return await self._run(run)

    async def vote(self, approval_id: str, *, approver: Person, decision: str, reason: str, auth_time: float,
                   now: float, record: AuditRecord) -> ApprovalRow:
        """Record one approver's vote and settle the approval when it is decided.

        One vote per person: a second vote by the same person id, or by the same trusted email (one person
        through two issuers), is refused, so N-of-M counts N people.

        Raises:
            Conflict: the approval is no longer pending, or this person already voted.
            Locked: an operator's lock covers the approver.
        """
        def run() -> ApprovalRow:
            with self._tx() as conn:
                r = conn.execute(select(approvals).where(approvals.c.id == approval_id).with_for_update()
                                 ).mappings().first()
                if r is None or r["state"] != "pending" or r["expires_at"] <= now:
                    raise Conflict("the approval is no longer pending")
                # An offboarded approver decides nothing either.
                _check_locks(conn, user=approver.id, email=approver.email, agent="", tenant="")
                _remember_person(conn, approver, now)
                # The same person: the same id, or anyone sharing an address with them, now or before.
                same = or_(approval_votes.c.approver == approver.id,
                           approval_votes.c.approver.in_(_persons_sharing_email(approver.id)))
                if approver.email is not None:
                    same = or_(same, approval_votes.c.approver_email == approver.email)
                voted = conn.execute(select(func.count()).select_from(approval_votes).where(
                    approval_votes.c.approval_id == approval_id, same)).scalar_one()
                if voted:
                    raise Conflict("you already decided this approval",
                                   reason=f"{approver.id} already voted on {approval_id}")
                conn.execute(insert(approval_votes), {"approval_id": approval_id, "approver": approver.id,
                                                      "approver_name": approver.name,
                                                      "approver_email": approver.email,
                                                      "decision": decision, "reason": reason,
                                                      "auth_time": auth_time, "decided_at": now})
                _append(conn, record)
                approvals_so_far = conn.execute(select(func.count()).select_from(approval_votes).where(
                    approval_votes.c.approval_id == approval_id, approval_votes.c.decision == "approve")).scalar_one()
                state = "denied" if decision == "deny" else (
                    "approved" if approvals_so_far >= r["required"] else "pending")
                if state != "pending":
                    conn.execute(update(approvals).where(approvals.c.id == approval_id)
                                 .values(state=state, decided_at=now))
                return ApprovalRow(**{**dict(r), "state": state, "decided_at": now if state != "pending" else None})
        return await self._run(run)

    async def expire_approvals(self, *, now: float) -> list[ApprovalRow]:
        """Pending or approved-but-unused approvals past their expiry become ``expired``, each recorded."""
        def run() -> list[ApprovalRow]:
            with self._tx() as conn:
                due = [ApprovalRow(**r) for r in conn.execute(
                    select(approvals).where(approvals.c.state.in_(("pending", "approved")),
                                            approvals.c.expires_at <= now).limit(500)).mappings()]
                for a in due:
                    conn.execute(update(approvals).where(approvals.c.id == a.id).values(state="expired"))
                    _append(conn, AuditRecord(now, "approval.expired", "failure", user=a.user,
                                              user_name=a.user_name, agent=a.agent,
                                              task=a.task_id, tenant=a.tenant, resource=a.path, action="issue",
                                              reason=f"{a.state} approval {a.id} expired unused"))
                return due
        return await self._run(run)

    # -- audit ---------------------------------------------------------------------------------------

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

    # -- audit chain and checkpoints (read by broker.audit.checkpoints and the verifier) --------------------

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
                return [tuple(r) for r in conn.execute(_CHAIN_PAGE, {"after": after_seq, "lim": limit})]
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

    # -- audit export cursors (broker.audit.export) ----------------------------------------------------------

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


# -- helpers that run inside a transaction -----------------------------------------------------------


def _append(conn: Connection, record: AuditRecord) -> None:
    """Append one record to the chain, in the caller's transaction (so with the state change it describes).

    Redaction comes before hashing: a secret can never be part of what the chain commits to.
    """
    red = record.redacted()
    seq, head = conn.execute(_HEAD_FOR_UPDATE).one()
    seq += 1
    digest = chain_hash(bytes.fromhex(head), canonical_bytes(red, seq))
    conn.execute(_INSERT_AUDIT, {**asdict(red), "seq": seq, "prev_hash": head, "hash": digest.hex()})
    conn.execute(_MOVE_HEAD, {"new_seq": seq, "new_hash": digest.hex()})


def _append_many(conn: Connection, records: Sequence[AuditRecord]) -> None:
    """Append records in order, as ``_append`` does one by one, with 3 statements in all instead of 3 each.

    Same chain, same transaction: the head is read (and locked) once, the hashes computed in order, the
    rows inserted with one executemany, the head moved once. The Vault audit merge appends hundreds of
    records a transaction; per-record statements cost ~0.3 ms each through SQLAlchemy (scripts/bench_audit.py).
    """
    if not records:
        return
    seq, head = conn.execute(_HEAD_FOR_UPDATE).one()
    prev = bytes.fromhex(head)
    rows: list[dict[str, Any]] = []
    for record in records:
        red = record.redacted()
        seq += 1
        digest = chain_hash(prev, canonical_bytes(red, seq))
        row = {f: getattr(red, f) for f in _RECORD_FIELDS}
        row.update(seq=seq, prev_hash=prev.hex(), hash=digest.hex())
        rows.append(row)
        prev = digest
    conn.execute(_INSERT_AUDIT, rows)
    conn.execute(_MOVE_HEAD, {"new_seq": seq, "new_hash": prev.hex()})


def _insert_tokens(conn: Connection, tokens: Mapping[str, tuple[str, str | None]], now: float) -> None:
    if not tokens:
        return
    have: set[str] = set()
    for chunk in _chunks(sorted(tokens)):
        have.update(r[0] for r in conn.execute(select(vault_audit_tokens.c.accessor_hmac)
                                               .where(vault_audit_tokens.c.accessor_hmac.in_(chunk))))
    fresh = [{"accessor_hmac": a, "task": t, "lease": lease, "learned_at": now}
             for a, (t, lease) in tokens.items() if a not in have]
    if fresh:
        conn.execute(insert(vault_audit_tokens), fresh)


def _move_intent(conn: Connection, intent_id: str, from_state: IntentState, event: IntentEvent, now: float, *,
                 accessor: str | None = None, attempts: int | None = None,
                 next_attempt_at: float | None = None) -> bool:
    """One transition of the intent table, compare-and-set, in the caller's transaction."""
    to = next_state(from_state, event)
    values: dict[str, Any] = {"state": to.value}
    if to in FINAL:
        values.update(resolved_at=now, next_attempt_at=None)
    else:
        values["next_attempt_at"] = next_attempt_at
    if attempts is not None:
        values["attempts"] = attempts
    if accessor is not None:
        values["accessor"] = accessor
    res = conn.execute(update(intents).where(intents.c.id == intent_id, intents.c.state == from_state.value)
                       .values(**values))
    return bool(res.rowcount == 1)


def _check_locks(conn: Connection, *, user: str, email: str | None, agent: str, tenant: str) -> None:
    # An absent email or subject binds as "" (never a lock's value: selectors are non-empty), not NULL, so
    # the SQL stays one shape.
    subject = user.partition("#")[2]
    hit = conn.execute(_LOCK_HIT, {"user": user, "email": email or "", "subject": subject, "agent": agent,
                                   "tenant": tenant}).first()
    if hit is not None:
        msg = f"an operator has locked this {hit[1]}"
        raise Locked(msg, reason=f"lock {hit[0]} on {hit[1]}")


def _check_budget(conn: Connection, *, user: str, agent: str, limits: LeaseLimits) -> None:
    by_agent = conn.execute(_LIVE_BY_AGENT, {"agent": agent}).scalar_one()
    by_user = conn.execute(_LIVE_BY_USER, {"user": user}).scalar_one() if by_agent < limits.per_agent else 0
    if (by_agent or 0) >= limits.per_agent:
        raise BudgetExceeded("this agent holds as many live credentials as allowed",
                             reason=f"agent {agent} holds {by_agent} live leases", retry_after=30)
    if (by_user or 0) >= limits.per_user:
        raise BudgetExceeded("this user's agents hold as many live credentials as allowed",
                             reason=f"user {user} holds {by_user} live leases", retry_after=30)


def _by_task(q: Select[Any], *, user: str | None, agent: str | None, task: str | None,
             tenant: str | None) -> Select[Any]:
    """Narrow a query over tasks (or leases joined to tasks) to a user, agent, task or tenant.

    ``user`` is a person id, or an email address meaning every person whose tokens carried it trusted
    (and the tasks that recorded it): what an operator who names someone by address means.
    """
    if user is not None:
        q = q.where(_user_is(tasks.c.user, user, email_column=tasks.c.user_email))
    for col, value in ((tasks.c.agent, agent), (tasks.c.id, task), (tasks.c.tenant, tenant)):
        if value is not None:
            q = q.where(col == value)
    return q


def _user_is(column: Any, user: str, *, email_column: Any = None) -> Any:
    """``column`` (a person id) is ``user``: that id, or, for an address, any person known by it."""
    if is_person_id(user):
        return column == user
    email = normalize_email(user)
    known = column.in_(select(person_emails.c.person).where(person_emails.c.email == email))
    # Rows from before person ids (migration 0009) hold the old name itself.
    legacy = column == user
    return or_(known, legacy, email_column == email) if email_column is not None else or_(known, legacy)


def _remember_person(conn: Connection, person: Person, now: float) -> None:
    """Note the address ``person``'s token claimed (once per address; concurrent first sightings are fine)."""
    if person.email is None:
        return
    values = {"person": person.id, "email": person.email, "first_seen": now}
    if conn.dialect.name == "postgresql":
        conn.execute(pg_insert(person_emails).values(**values).on_conflict_do_nothing())
    else:
        conn.execute(sqlite_insert(person_emails).values(**values).on_conflict_do_nothing())


def _persons_sharing_email(person: str) -> Select[Any]:
    """Every person id that claimed an address ``person`` claimed (``person`` included)."""
    mine = select(person_emails.c.email).where(person_emails.c.person == person)
    return select(person_emails.c.person).where(person_emails.c.email.in_(mine))


def _chunks(items: list[str], size: int = 500) -> Iterator[list[str]]:
    # Bounded IN lists: SQLite caps the bound parameters of one statement.
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _cursor(after: str) -> tuple[float, str]:
    """A page cursor is ``<time>:<id>`` of the last row seen. Raises: BadRequest."""
    from broker.errors import BadRequest

    at, sep, last = after.partition(":")
    try:
        when = float(at) if len(at) <= 32 and len(last) <= 64 else math.nan
    except ValueError:
        when = math.nan
    if not sep or not math.isfinite(when):
        msg = "after is not a cursor this API returned"
        raise BadRequest(msg)
    return when, last


def _lease(r: Any) -> LeaseRow:
    d = dict(r)
    d["renewable"] = bool(d["renewable"])
    return LeaseRow(**d)


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
    if sqlite:
        kwargs["poolclass"] = StaticPool
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        database = make_url(sync_url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
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
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            # IMMEDIATE: take the write lock at BEGIN, so a read-then-write transaction cannot be
            # overtaken by another writer between its read and its write (SQLite has no FOR UPDATE).
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    store = Store(engine, sqlite=sqlite)
    if migrate:
        try:
            await store._run(_upgrade, engine)
        except BrokerError:
            await store.close()
            raise
    return store


def _upgrade(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
