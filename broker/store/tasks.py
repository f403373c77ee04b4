"""Tasks and their Vault task tokens: intents to start, records, fences, and revocations that Vault confirmed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict

from sqlalchemy import (
    select,
    tuple_,
    update,
)

from broker.audit import AuditRecord
from broker.errors import (
    Locked,
)
from broker.intents import IntentEvent, IntentState
from broker.store.rows import (
    Intent,
    Person,
    RevocationRow,
    TaskRow,
)
from broker.store.schema import (
    leases,
    revocations,
    tasks,
)



from broker.store._base import StoreBase

from broker.store.statements import (
    _INSERT_TASK,
    _INSERT_INTENT,
    _INSERT_REVOCATION,
    _TASK_BY_ID,
    _append,
    _move_intent,
    _check_locks,
    _by_task,
    _remember_person,
    _chunks,
    _cursor,
)


class TaskStore(StoreBase):
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
