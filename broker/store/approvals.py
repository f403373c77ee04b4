"""Approvals of high-risk grants and the approvers' votes: one vote per person, the tally from the rules."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from sqlalchemy import (
    func,
    insert,
    or_,
    select,
    text,
    update,
)

from broker.approval_rules import tally
from broker.audit import AuditRecord
from broker.errors import (
    Conflict,
)
from broker.rows import (
    ApprovalRow,
    Person,
)
from broker.states import APPROVALS, ApprovalEvent, ApprovalState
from broker.store._base import StoreBase
from broker.store.schema import (
    approval_votes,
    approvals,
)
from broker.store.statements import (
    _append,
    _check_locks,
    _persons_sharing_email,
    _remember_person,
    _vals,
)

_NOTIFY = text("SELECT pg_notify('broker_approvals', :id)")


class ApprovalStore(StoreBase):
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
        if state == ApprovalState.PENDING:
            q = q.where(approvals.c.state == ApprovalState.PENDING.value, approvals.c.expires_at > now)
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
                if r is None or not APPROVALS.allows(ApprovalState(r["state"]), ApprovalEvent.VOTED) \
                        or r["expires_at"] <= now:
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
                if conn.dialect.name == "postgresql":
                    # Delivered at commit to every replica's listener (broker.store.wakeups).
                    conn.execute(_NOTIFY, {"id": approval_id})
                decisions = [d for (d,) in conn.execute(
                    select(approval_votes.c.decision).where(approval_votes.c.approval_id == approval_id)
                    .order_by(approval_votes.c.decided_at))]
                outcome = tally(decisions, required=r["required"])
                state = APPROVALS.next_state(ApprovalState(r["state"]), outcome)
                decided = state is not ApprovalState.PENDING
                if decided:
                    conn.execute(update(approvals)
                                 .where(approvals.c.id == approval_id,
                                        approvals.c.state.in_(_vals(APPROVALS.sources(outcome))))
                                 .values(state=state.value, decided_at=now))
                return ApprovalRow(**{**dict(r), "state": state.value, "decided_at": now if decided else None})
        return await self._run(run)

    async def expire_approvals(self, *, now: float) -> list[ApprovalRow]:
        """Pending or approved-but-unused approvals past their expiry become ``expired``, each recorded."""
        def run() -> list[ApprovalRow]:
            with self._tx() as conn:
                lapsing = _vals(APPROVALS.sources(ApprovalEvent.LAPSED))
                due = [ApprovalRow(**r) for r in conn.execute(
                    select(approvals).where(approvals.c.state.in_(lapsing),
                                            approvals.c.expires_at <= now).limit(500)).mappings()]
                for a in due:
                    conn.execute(update(approvals).where(approvals.c.id == a.id, approvals.c.state.in_(lapsing))
                                 .values(state=APPROVALS.target(ApprovalEvent.LAPSED).value))
                    _append(conn, AuditRecord(now, "approval.expired", "failure", user=a.user,
                                              user_name=a.user_name, agent=a.agent,
                                              task=a.task_id, tenant=a.tenant, resource=a.path, action="issue",
                                              reason=f"{a.state} approval {a.id} expired unused"))
                return due
        return await self._run(run)
