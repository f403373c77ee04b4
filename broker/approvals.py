"""Approvals in motion: ``ApprovalManager`` requests, records votes, long-polls and checks use, over the store.

The rules (digest, freshness, who may decide, the tally) are ``broker.approval_rules``, pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from broker.approval_rules import Decision, check_approver, check_fresh, is_same_person, request_digest
from broker.audit import AuditRecord
from broker.delegation import Catalog, Grant, any_includes
from broker.errors import (
    ApprovalMismatch,
    BadRequest,
    Conflict,
    NotApprover,
    NotFound,
    RateLimited,
)
from broker.identity import AgentIdentity, UserIdentity
from broker.limits import RateLimiter
from broker.store import ApprovalRow, Person, Store, TaskRow
from broker.timefmt import utc_stamp


@dataclass(frozen=True)
class ApprovalView:
    approval: ApprovalRow
    task: TaskRow | None


_REREAD = 1.0  # seconds between re-reads of a waited-on approval, with no cross-replica wake-up
_REREAD_LISTENING = 5.0  # ... and with one (a lost notification costs at most this)


class ApprovalManager:
    def __init__(self, *, catalog: Catalog, store: Store, clock: Callable[[], float], max_auth_age: int,
                 ttl: int, backlog_ok: Callable[[], None] | None = None,
                 decide_rate: RateLimiter | None = None, max_waits: int = 4) -> None:
        self._catalog = catalog
        # Each decision costs a store transaction and an audit row: per approver.
        self._decide_rate = decide_rate
        # Long polls each hold a coroutine that looks at the store every second: a few per identity.
        self._max_waits = max_waits
        self._waiting: dict[str, int] = {}
        # The audit export's fail-closed gate (broker.export.Exporter.check): raises while the backlog is full.
        self._backlog_ok = backlog_ok
        self._store = store
        self._clock = clock
        self._max_auth_age = max_auth_age
        self._ttl = ttl
        self._changed: dict[str, asyncio.Event] = {}
        # Set by the app when another replica's decisions arrive by notification (PostgreSQL).
        self.listening: Callable[[], bool] = lambda: False

    async def request(self, task: TaskRow, grant: Grant, *, ttl: int,
                      key_fingerprint: str | None = None) -> ApprovalRow:
        """Open a pending approval for this exact request; recorded as ``approval.requested``."""
        now = self._clock()
        row = ApprovalRow(
            id="apr_" + secrets.token_urlsafe(12), task_id=task.id, grant=grant.name, path=grant.path, ttl=ttl,
            user=task.user, user_name=task.user_name, agent=task.agent, tenant=task.tenant,
            digest=request_digest(task=task.id, user=task.user, agent=task.agent, grant=grant.name, path=grant.path,
                                  ttl=ttl, key_fingerprint=key_fingerprint),
            required=grant.approvals_required, state="pending", created_at=now, expires_at=now + self._ttl,
            decided_at=None, consumed_lease=None,
        )
        await self._store.add_approval(row, AuditRecord.for_task(
            task, now, "approval.requested", "pending", resource=grant.path, action="issue",
            key_fingerprint=key_fingerprint,
            reason=f"grant {grant.name}, ttl {ttl}s, needs {row.required} approval(s) ({row.id})"))
        return row

    async def decide(self, approver: UserIdentity, approval_id: str, decision: Decision, reason: str) -> ApprovalRow:
        """One approver's vote.

        Raises:
            InsufficientAuthentication, NotApprover, NotFound, Conflict, Locked.
            RateLimited: this approver decides faster than ``limits.decide_rate_per_approver``.
            AuditBacklogFull: the audit export sinks are too far behind (503, before any other work).
        """
        if self._backlog_ok is not None:
            self._backlog_ok()
        now = self._clock()
        if not any_includes(self._catalog.approvers, approver):
            raise NotApprover("only approvers decide approvals", reason=f"{approver.id} is not an approver")
        if self._decide_rate is not None:
            self._decide_rate.take(approver.id, what="approver")
        auth_time = check_fresh(approver, now=now, max_age=self._max_auth_age)
        row = await self._store.get_approval(approval_id)
        if row is None:
            raise NotFound("no such approval")
        task = await self._store.get_task(row.task_id)
        person = Person(approver.id, approver.name, approver.trusted_email, approver.email)
        related = await self._store.same_person(person, row.user, now=now)
        check_approver(self._catalog, row, approver, now=now, user_email=task.user_email if task else None,
                       related=related)
        event = "approval.approved" if decision == "approve" else "approval.denied"
        record = AuditRecord(now, event, "success" if decision == "approve" else "denied", user=row.user,
                             user_name=row.user_name, agent=row.agent, task=row.task_id, tenant=row.tenant,
                             resource=row.path, action=decision,
                             reason=f"by {approver.name} ({approver.id}, authenticated {utc_stamp(auth_time)}): "
                                    f"{reason} ({row.id})")
        updated = await self._store.vote(row.id, approver=person,
                                         decision=decision, reason=reason, auth_time=auth_time, now=now,
                                         record=record)
        self._notify(row.id)
        return updated

    async def get(self, approval_id: str) -> ApprovalRow:
        """Raises: NotFound."""
        row = await self._store.get_approval(approval_id)
        if row is None:
            raise NotFound("no such approval")
        return row

    async def wait(self, approval_id: str, *, timeout: float, waiter: str) -> ApprovalRow:
        """The approval, once it leaves ``pending`` or after ``timeout`` seconds (long poll).

        ``waiter`` (a person id or a SPIFFE ID) may hold at most ``max_waits`` long polls at once.

        Raises:
            RateLimited: ``waiter`` already holds as many long polls as allowed.
            NotFound: no such approval.
        """
        if not 0 <= timeout <= 60 or timeout != timeout:  # noqa: PLR0124 -- NaN is not equal to itself
            msg = "wait must be between 0 and 60 seconds"
            raise BadRequest(msg)
        held = self._waiting.get(waiter, 0)
        if held >= self._max_waits:
            raise RateLimited("too many long polls for this identity", reason=f"{waiter} holds {held} long polls",
                              retry_after=1)
        self._waiting[waiter] = held + 1
        try:
            return await self._wait(approval_id, timeout)
        finally:
            left = self._waiting[waiter] - 1
            if left:
                self._waiting[waiter] = left
            else:
                del self._waiting[waiter]

    async def _wait(self, approval_id: str, timeout: float) -> ApprovalRow:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            row = await self.get(approval_id)
            remaining = deadline - loop.time()
            if row.state != "pending" or row.expires_at <= self._clock() or remaining <= 0:
                return row
            event = self._changed.setdefault(approval_id, asyncio.Event())
            # Wake on a decision made by this replica or, through the store's LISTEN (broker.store.wakeups),
            # by another; without a listener, look again every second for other replicas' decisions.
            every = _REREAD_LISTENING if self.listening() else _REREAD
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=min(every, remaining))

    def wake(self, approval_id: str) -> None:
        """A decision on ``approval_id`` was committed (by any replica): wake its long polls here."""
        self._notify(approval_id)

    def _notify(self, approval_id: str) -> None:
        event = self._changed.pop(approval_id, None)
        if event is not None:
            event.set()

    def check_for(self, approval: ApprovalRow, caller: AgentIdentity, task: TaskRow, grant: Grant, ttl: int,
                  key_fingerprint: str | None = None) -> None:
        """Does this approval cover exactly this request (the same SSH key, for one the agent chose)?

        Raises: ApprovalMismatch, Conflict.
        """
        digest = request_digest(task=task.id, user=task.user, agent=task.agent, grant=grant.name, path=grant.path,
                                ttl=ttl, key_fingerprint=key_fingerprint)
        if approval.agent != str(caller.spiffe_id) or not secrets.compare_digest(approval.digest, digest):
            raise ApprovalMismatch("this approval was given for another request",
                                   reason=f"approval {approval.id} digest does not match task {task.id}, "
                                          f"grant {grant.name}, ttl {ttl}")
        if approval.state != "approved" or approval.expires_at <= self._clock():
            state = "expired" if approval.expires_at <= self._clock() else approval.state
            raise Conflict(f"the approval is {state}", reason=f"approval {approval.id} is {state}")


__all__ = ["ApprovalManager", "check_approver",
           "check_fresh", "is_same_person", "request_digest"]
