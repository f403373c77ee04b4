"""Tasks and their Vault task tokens: intents to start, records, fences, and revocations that Vault confirmed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from sqlalchemy import (
    select,
    tuple_,
)

from broker.audit import AuditRecord, redact
from broker.errors import (
    Locked,
)
from broker.intents import IntentEvent, IntentState
from broker.rows import (
    Intent,
    Person,
    RevocationRow,
    TaskRow,
)
from broker.states import TASKS, LeaseEvent, TaskEvent, TokenEvent, TokenState
from broker.store.prepared import one_row
from broker.store.schema import (
    leases,
    tasks,
)
from broker.store.signals import SignalStore, enqueue_signals, initiator_of
from broker.store.statements import (
    _INSERT_INTENT,
    _INSERT_REVOCATION,
    _INSERT_TASK,
    P_TASK_BY_ID,
    _append,
    _by_task,
    _check_locks,
    _chunks,
    _cursor,
    _fence,
    _move_intent,
    _move_leases,
    _move_token,
    _remember_person,
    _vals,
)

# How long a fence leaves the task's revocation to the broker that fenced it (it revokes at once, inline)
# before the maintenance loop of any broker takes it up: an ender that died mid-revocation is covered.
FENCE_CLAIM = 60.0


class TaskStore(SignalStore):
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

    async def get_task(self, task_id: str) -> TaskRow | None:
        def run() -> TaskRow | None:
            with self._read() as conn:
                r = one_row(P_TASK_BY_ID.execute(conn, {"id": task_id}))
            return TaskRow(**r) if r is not None else None
        return await self._run(run)

    async def fence_tasks(self, task_ids: Sequence[str], *, event: TaskEvent, now: float,
                          records: Sequence[AuditRecord], retry_after: float = FENCE_CLAIM) -> list[TaskRow]:
        """Move these tasks along ``event`` (end, expire, revoke) from active; their tokens and leases are fenced.

        From this commit on no lease of these tasks can be recorded. Returns the rows it fenced, as they now
        are (tasks no longer active are not among them); of ``records``, only those of a fenced task (or of
        no task) are written, so two concurrent enders cannot both record the end.
        """
        enqueued = 0

        def run() -> list[TaskRow]:
            nonlocal enqueued
            with self._tx() as conn:
                fenced = _fence(conn, list(task_ids), event=event, now=now, retry_after=retry_after,
                                revocation_id=None)
                won = {t.id for t in fenced}
                for record in records:
                    if record.task is None or record.task in won:
                        _append(conn, record)
                # The SSF signal commits with the end (broker.store.signals rule 1).
                enqueued = enqueue_signals(conn, fenced, receivers=self.signal_receivers,
                                           initiator=initiator_of(event), now=now,
                                           reasons={r.task: r.redacted().reason or "" for r in records if r.task})
            return fenced
        fenced = await self._run(run)
        self._signals_enqueued(enqueued)
        return fenced

    async def fence_selected(self, revocation: RevocationRow, *, now: float, created: AuditRecord, reason: str,
                             retry_after: float = FENCE_CLAIM) -> list[TaskRow]:
        """Write an operator's revocation (and its lock) and revoke every active task its selector matches.

        The tasks are selected *inside this transaction*: a task start that committed before it is fenced
        here, and one that commits after it meets the lock. Each fenced task gets a ``task.revoked`` record
        with ``reason``; the revocation counts the tasks and leases as they were at the fence.
        """
        enqueued = 0

        def run() -> list[TaskRow]:
            nonlocal enqueued
            with self._tx() as conn:
                conn.execute(_INSERT_REVOCATION, asdict(revocation))
                _append(conn, created)
                q = _by_task(select(tasks.c.id).where(tasks.c.state.in_(_vals(TASKS.sources(TaskEvent.REVOKE)))),
                             **{k: revocation.value if k == revocation.kind else None
                                for k in ("user", "agent", "task", "tenant")})
                fenced = _fence(conn, [r[0] for r in conn.execute(q)], event=TaskEvent.REVOKE, now=now,
                                retry_after=retry_after, revocation_id=revocation.id)
                for t in fenced:
                    _append(conn, AuditRecord.for_task(t, now, "task.revoked", "success", resource=f"role:{t.role}",
                                                       action="revoke", reason=reason))
                enqueued = enqueue_signals(conn, fenced, receivers=self.signal_receivers, initiator="admin",
                                           reasons={t.id: redact(reason) for t in fenced}, now=now)
            return fenced
        fenced = await self._run(run)
        self._signals_enqueued(enqueued)
        return fenced

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

    async def mark_token_live(self, task_id: str) -> bool:
        """The task token was extended from its bootstrap TTL to the task's end (``TokenEvent.EXTENDED``).

        False when its token was no longer in bootstrap (fenced meanwhile).
        """
        def run() -> bool:
            with self._tx() as conn:
                return _move_token(conn, task_id, TokenEvent.EXTENDED)
        return await self._run(run)

    async def tasks_due_for_revocation(self, *, now: float, limit: int = 500) -> list[TaskRow]:
        q = (select(tasks).where(tasks.c.token_state == TokenState.REVOKE_PENDING.value, tasks.c.next_attempt_at <= now)
             .order_by(tasks.c.next_attempt_at).limit(limit))

        def run() -> list[TaskRow]:
            with self._read() as conn:
                return [TaskRow(**r) for r in conn.execute(q).mappings()]
        return await self._run(run)

    async def confirm_revoked(self, task_id: str, *, lease_ids: Sequence[str], lease_event: LeaseEvent, now: float,
                              records: Sequence[AuditRecord], released_ids: Sequence[str] = ()) -> bool:
        """Vault confirmed: the task token is gone (``TokenEvent.VAULT_CONFIRMED``) and so are these leases
        (``lease_event``: ``VAULT_REVOKED``, or ``VAULT_EXPIRED`` for an expired task). ``released_ids`` are
        the task's credentials nothing can revoke (``LeaseEvent.RELEASED``, broker.engines).

        False, writing nothing, when the token was no longer pending (another settler confirmed it first).
        """
        def run() -> bool:
            with self._tx() as conn:
                if not _move_token(conn, task_id, TokenEvent.VAULT_CONFIRMED, next_attempt_at=None):
                    self._undo(conn)
                    return False
                for chunk in _chunks(list(lease_ids)):
                    _move_leases(conn, leases.c.id.in_(chunk), lease_event, revoked_at=now)
                for chunk in _chunks(list(released_ids)):
                    _move_leases(conn, leases.c.id.in_(chunk), LeaseEvent.RELEASED)
                for record in records:
                    _append(conn, record)
            return True
        return await self._run(run)

    async def retry_later(self, task_id: str, *, attempts: int, next_attempt_at: float) -> None:
        """Vault did not confirm the revocation: try again at ``next_attempt_at`` (``TokenEvent.RETRY_SCHEDULED``)."""
        def run() -> None:
            with self._tx() as conn:
                _move_token(conn, task_id, TokenEvent.RETRY_SCHEDULED, revoke_attempts=attempts,
                            next_attempt_at=next_attempt_at)
        await self._run(run)
