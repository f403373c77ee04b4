"""Issuance and leases: an intent checked against the task, the locks and the budgets; the lease it becomes."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import (
    Connection,
    and_,
    delete,
    exists,
    func,
    or_,
    select,
    tuple_,
    update,
)

from broker.audit import AuditRecord
from broker.errors import (
    Conflict,
    Gone,
)
from broker.intents import IntentEvent, IntentState, next_state
from broker.journal import ISSUED, PROBE_PREFIX
from broker.rows import (
    Intent,
    LeaseLimits,
    LeaseRow,
    TaskRow,
)
from broker.states import APPROVALS, ApprovalEvent, LeaseEvent, TaskState
from broker.store._base import StoreBase
from broker.store.schema import (
    approvals,
    intents,
    leases,
    tasks,
    vault_journal,
)
from broker.store.statements import (
    _INTENT_BY_ID,
    _LEASE_BY_ID,
    _RENEW,
    P_INSERT_INTENT,
    P_INSERT_INTENT_IF_NEW,
    P_INSERT_LEASE,
    P_ONE_MORE_LIVE,
    P_RECORD_INTENT,
    P_TASK_STATE_FOR_UPDATE,
    _append,
    _by_task,
    _check_budget,
    _check_locks,
    _chunks,
    _cursor,
    _lease,
    _move_intent,
    _move_leases,
    _vals,
)

# A journaled issuance's intent is written once, already past its first move (broker.journal rule 8): the
# states the table gives an open intent that is recorded, or given up.
_BORN_RECORDED = next_state(IntentState.OPEN, IntentEvent.RECORDED)
_BORN_ABANDONED = next_state(IntentState.OPEN, IntentEvent.ABANDONED)


def _record_lease(conn: Connection, row: LeaseRow, record: AuditRecord) -> None:
    """The lease and its ``lease.issued`` record, in the caller's transaction (broker.leases rule 3)."""
    values = dict(vars(row))
    values["renewable"] = int(row.renewable)
    P_INSERT_LEASE.execute(conn, values)
    _append(conn, record)


class LeaseStore(StoreBase):
    async def begin_issuance(self, intent: Intent, *, user: str, user_email: str | None, agent: str, tenant: str,
                             limits: LeaseLimits | None = None, approval_id: str | None = None) -> None:
        """Record the intent to issue, in the transaction that checks the task, the locks and the budgets.

        Raises:
            Gone: the task is no longer active. Locked: an operator lock covers the user, agent or tenant.
            BudgetExceeded: the agent or the user holds as many live leases as allowed.
        """
        def run() -> None:
            with self._tx() as conn:
                found = P_TASK_STATE_FOR_UPDATE.execute(conn, {"id": intent.task_id}).fetchone()
                state = found[0] if found is not None else None
                if state != TaskState.ACTIVE.value:
                    raise Gone("the task is no longer active", reason=f"task {intent.task_id} is {state}")
                _check_locks(conn, user=user, email=user_email, agent=agent, tenant=tenant)
                if limits is not None:
                    _check_budget(conn, user=user, agent=agent, limits=limits)
                if approval_id is not None:
                    # Single use: the approval is spent by the transaction that records this issuance's intent.
                    spent = conn.execute(update(approvals).where(
                        approvals.c.id == approval_id,
                        approvals.c.state.in_(_vals(APPROVALS.sources(ApprovalEvent.CONSUMED))),
                        approvals.c.expires_at > intent.created_at).values(
                            state=APPROVALS.target(ApprovalEvent.CONSUMED).value,
                                                                           consumed_lease=intent.id))
                    if spent.rowcount != 1:
                        raise Conflict("the approval was already used or has expired",
                                       reason=f"approval {approval_id} not consumable")
                P_INSERT_INTENT.execute(conn, dict(vars(intent)))  # not asdict(): it deep-copies
        await self._run(run)

    async def complete_issuance(self, row: LeaseRow, record: AuditRecord) -> bool:
        """Record the lease and complete its intent, only while the task is active and the intent still open.

        Returns False, writing nothing, otherwise: the caller then revokes what it got.
        """
        def run() -> bool:
            with self._tx() as conn:
                # Counting the lease locks the task row and checks that it is still active.
                if P_ONE_MORE_LIVE.execute(conn, {"id": row.task_id}).rowcount != 1 or P_RECORD_INTENT.execute(
                        conn, {"id": row.id, "now": row.issued_at}).rowcount != 1:
                    self._undo(conn)
                    return False
                _record_lease(conn, row, record)
            return True
        return await self._run(run)

    async def record_issuance(self, intent: Intent, row: LeaseRow, record: AuditRecord, *, user: str,
                              user_email: str | None, agent: str, tenant: str,
                              limits: LeaseLimits | None = None) -> bool:
        """A journaled issuance's one transaction, after Vault answered (broker.journal rule 8): check the task,
        the locks and the budgets as ``begin_issuance`` does, and record the intent already ``done``, the
        lease and its ``lease.issued`` record together.

        Returns False, writing nothing, when the task is no longer active or the intent's id is taken (the
        orphan sweep claimed its journal entries first): the caller then gives up what it got.

        Raises:
            Locked: an operator lock covers the user, agent or tenant.
            BudgetExceeded: the agent or the user already holds as many live leases as allowed.
        """
        born = dict(vars(intent))  # not asdict(): it deep-copies
        born.update(state=_BORN_RECORDED.value, resolved_at=row.issued_at, next_attempt_at=None)

        def run() -> bool:
            with self._tx() as conn:
                # Counting the lease locks the task row and checks that it is still active.
                if P_ONE_MORE_LIVE.execute(conn, {"id": row.task_id}).rowcount != 1:
                    self._undo(conn)
                    return False
                _check_locks(conn, user=user, email=user_email, agent=agent, tenant=tenant)
                if limits is not None:
                    _check_budget(conn, user=user, agent=agent, limits=limits, counted=1)
                if P_INSERT_INTENT_IF_NEW.execute(conn, born).rowcount != 1:
                    self._undo(conn)
                    return False
                _record_lease(conn, row, record)
            return True
        return await self._run(run)

    async def check_issuance(self, *, user: str, user_email: str | None, agent: str, tenant: str,
                             limits: LeaseLimits | None = None) -> None:
        """The locks and budgets ``record_issuance`` checks, read only: before the read of an agent or user
        refused a moment ago (broker.leases), so that Vault does not make a credential to be revoked.

        Raises:
            Locked: an operator lock covers the user, agent or tenant.
            BudgetExceeded: the agent or the user holds as many live leases as allowed.
        """
        def run() -> None:
            with self._read() as conn:
                _check_locks(conn, user=user, email=user_email, agent=agent, tenant=tenant)
                if limits is not None:
                    _check_budget(conn, user=user, agent=agent, limits=limits)
        await self._run(run)

    async def give_up_issuance(self, intent: Intent, *, retry_at: float,
                               vault_ref: tuple[str, str] | None = None) -> bool:
        """Write a journaled issuance that recorded nothing as ``aborting`` (its first cleanup at ``retry_at``),
        unless its id is taken already (the orphan sweep claimed it). ``vault_ref`` is what Vault's answer
        named, when one came. Returns whether it wrote the intent."""
        born = dict(vars(intent))
        born.update(state=_BORN_ABANDONED.value, next_attempt_at=retry_at)
        if vault_ref is not None:
            born.update(vault_ref_kind=vault_ref[0], vault_ref=vault_ref[1])

        def run() -> bool:
            with self._tx() as conn:
                return bool(P_INSERT_INTENT_IF_NEW.execute(conn, born).rowcount == 1)
        return await self._run(run)

    async def move_intent(self, intent_id: str, *, from_state: IntentState, event: IntentEvent, now: float,
                          accessor: str | None = None, attempts: int | None = None,
                          next_attempt_at: float | None = None, record: AuditRecord | None = None,
                          vault_ref: tuple[str, str] | None = None) -> bool:
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
                                    next_attempt_at=next_attempt_at, vault_ref=vault_ref):
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

    async def forget_settled_intents(self, *, settled_before: float, limit: int = 1000) -> int:
        """Delete up to ``limit`` final intents settled before ``settled_before``, with their journal entries,
        and the start-up probes' journal entries older than that. An ``aborted`` intent
        whose late answer is not swept yet is kept (broker.intents rule 6). Returns how many intents went."""
        unswept = exists().where(vault_journal.c.intent_id == intents.c.id,
                                 vault_journal.c.kind.in_(("response", ISSUED)),
                                 vault_journal.c.swept.is_(False), vault_journal.c.failed.is_(False),
                                 or_(vault_journal.c.lease_id.is_not(None), vault_journal.c.accessor.is_not(None),
                                     and_(vault_journal.c.kind == ISSUED, vault_journal.c.vault_error.is_(True))))
        pick = (select(intents.c.id).where(
            intents.c.state.in_((IntentState.DONE.value, IntentState.ABORTED.value)),
            intents.c.resolved_at < settled_before,
            or_(intents.c.state == IntentState.DONE.value, ~unswept)).limit(limit))
        # Start-up probes (``jpr_...``) are the journal's only entries with no intent: a key range, not a scan.
        probes = delete(vault_journal).where(vault_journal.c.intent_id >= PROBE_PREFIX,
                                             vault_journal.c.intent_id < _after(PROBE_PREFIX),
                                             vault_journal.c.at < settled_before)

        def run() -> int:
            with self._tx() as conn:
                ids = list(conn.execute(pick).scalars())
                for chunk in _chunks(ids):
                    conn.execute(delete(vault_journal).where(vault_journal.c.intent_id.in_(chunk)))
                    conn.execute(delete(intents).where(intents.c.id.in_(chunk)))
                conn.execute(probes)
            return len(ids)
        return await self._run(run)

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
                    _move_leases(conn, leases.c.id.in_(chunk), LeaseEvent.VAULT_EXPIRED, revoked_at=now)
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


def _after(prefix: str) -> str:
    """The least string greater than every string that starts with ``prefix`` (its last character + 1)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)
