"""Approvals: a human, freshly re-authenticated, lets one exact high-risk request through, once.

Rules this file keeps:
1. An approval is bound to a digest of the exact request: task, user, agent, grant, Vault path and TTL.
   Presenting it with any other task, grant or TTL is refused; it is consumed by the one issuance it
   unlocks, in the transaction that records that issuance's intent.
2. An approver must be one of ``people.approvers``, must not be the task's user, may vote once, and
   must have authenticated (``auth_time``) no longer ago than ``people.approval_max_auth_age``;
   otherwise the answer is RFC 9470's ``insufficient_user_authentication``. "The task's user" and "once"
   are about the person: the same (issuer, subject), or the same trusted email (one person through
   another issuer), never a display name a token can change.
3. A grant may need N approvals (two-person rule); one denial ends it. Pending and approved-but-unused
   approvals expire (default 15 minutes) and deliver nothing.
4. Request, each vote, the decision, expiry and the lease it unlocked are audit records naming the
   approver and their authentication time.
The decisions here are pure; ``ApprovalManager`` orchestrates the store and the clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from broker.audit import AuditRecord
from broker.delegation import Catalog, Grant, any_includes
from broker.errors import BadRequest, Conflict, Denied, InvalidIdentity, NotFound, RateLimited
from broker.identity import AgentIdentity, UserIdentity
from broker.limits import RateLimiter
from broker.store import ApprovalRow, Person, Store, TaskRow
from broker.timefmt import utc_stamp

Decision = Literal["approve", "deny"]
_DOMAIN = "broker.approval.v1"


class InsufficientAuthentication(InvalidIdentity):
    """RFC 9470: the approver's authentication is too old; re-authenticate and try again."""

    code = "insufficient_user_authentication"
    title = "Re-authentication required"

    def __init__(self, reason: str, *, max_age: int) -> None:
        super().__init__(reason)
        self.args = (f"sign in again (authentication no older than {max_age} s) to decide approvals",)
        self.max_age = max_age


class ApprovalMismatch(Denied):
    code = "approval_mismatch"
    title = "The approval does not cover this request"


class NotApprover(Denied):
    code = "not_approver"
    title = "Not allowed to decide this approval"


def request_digest(*, task: str, user: str, agent: str, grant: str, path: str, ttl: int) -> str:
    """SHA-256 over the canonical JSON of exactly what is approved."""
    body = json.dumps({"agent": agent, "grant": grant, "path": path, "task": task, "ttl": ttl, "user": user,
                       "v": _DOMAIN}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def check_fresh(user: UserIdentity, *, now: float, max_age: int) -> float:
    """Return the approver's authentication time.

    Raises:
        InsufficientAuthentication: no ``auth_time``, or older than ``max_age`` seconds.
    """
    if user.auth_time is None:
        raise InsufficientAuthentication("the token has no auth_time", max_age=max_age)
    if now - user.auth_time > max_age:
        raise InsufficientAuthentication(f"authenticated {int(now - user.auth_time)} s ago", max_age=max_age)
    return user.auth_time


def is_same_person(user: UserIdentity, person_id: str, trusted_email: str | None) -> bool:
    """Whether ``user`` is the person recorded as ``person_id`` (with that trusted email, if any).

    Used where a match *refuses* (self-approval, a second vote), so it leans to "same": the same
    (issuer, subject), or both sides carrying the same trusted address.
    """
    if user.id == person_id:
        return True
    return trusted_email is not None and user.trusted_email == trusted_email


def check_approver(catalog: Catalog, approval: ApprovalRow, approver: UserIdentity, *, now: float,
                   user_email: str | None = None) -> None:
    """May ``approver`` vote on ``approval``? ``user_email`` is the task user's trusted email, if recorded.

    Raises: NotApprover (not an approver, the task's own user), Conflict (not pending).
    """
    if not any_includes(catalog.approvers, approver):
        raise NotApprover("only approvers decide approvals", reason=f"{approver.id} is not an approver")
    if is_same_person(approver, approval.user, user_email):
        raise NotApprover("the task's own user cannot approve its grants",
                          reason=f"{approver.id} delegated task {approval.task_id}")
    if approval.state != "pending" or approval.expires_at <= now:
        raise Conflict(f"the approval is {'expired' if approval.expires_at <= now else approval.state}")


@dataclass(frozen=True)
class ApprovalView:
    approval: ApprovalRow
    task: TaskRow | None


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

    async def request(self, task: TaskRow, grant: Grant, *, ttl: int) -> ApprovalRow:
        """Open a pending approval for this exact request; recorded as ``approval.requested``."""
        now = self._clock()
        row = ApprovalRow(
            id="apr_" + secrets.token_urlsafe(12), task_id=task.id, grant=grant.name, path=grant.path, ttl=ttl,
            user=task.user, user_name=task.user_name, agent=task.agent, tenant=task.tenant,
            digest=request_digest(task=task.id, user=task.user, agent=task.agent, grant=grant.name, path=grant.path,
                                  ttl=ttl),
            required=grant.approvals_required, state="pending", created_at=now, expires_at=now + self._ttl,
            decided_at=None, consumed_lease=None,
        )
        await self._store.add_approval(row, AuditRecord.for_task(
            task, now, "approval.requested", "pending", resource=grant.path, action="issue",
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
        check_approver(self._catalog, row, approver, now=now, user_email=task.user_email if task else None)
        event = "approval.approved" if decision == "approve" else "approval.denied"
        record = AuditRecord(now, event, "success" if decision == "approve" else "denied", user=row.user,
                             user_name=row.user_name, agent=row.agent, task=row.task_id, tenant=row.tenant,
                             resource=row.path, action=decision,
                             reason=f"by {approver.name} ({approver.id}, authenticated {utc_stamp(auth_time)}): "
                                    f"{reason} ({row.id})")
        updated = await self._store.vote(row.id, approver=Person(approver.id, approver.name, approver.trusted_email),
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
            # Wake on a decision made by this replica, or look again every second for other replicas'.
            try:
                await asyncio.wait_for(event.wait(), timeout=min(1.0, remaining))
            except TimeoutError:
                pass

    def _notify(self, approval_id: str) -> None:
        event = self._changed.pop(approval_id, None)
        if event is not None:
            event.set()

    def check_for(self, approval: ApprovalRow, caller: AgentIdentity, task: TaskRow, grant: Grant, ttl: int) -> None:
        """Does this approval cover exactly this request? Raises: ApprovalMismatch, Conflict."""
        digest = request_digest(task=task.id, user=task.user, agent=task.agent, grant=grant.name, path=grant.path,
                                ttl=ttl)
        if approval.agent != str(caller.spiffe_id) or not secrets.compare_digest(approval.digest, digest):
            raise ApprovalMismatch("this approval was given for another request",
                                   reason=f"approval {approval.id} digest does not match task {task.id}, "
                                          f"grant {grant.name}, ttl {ttl}")
        if approval.state != "approved" or approval.expires_at <= self._clock():
            state = "expired" if approval.expires_at <= self._clock() else approval.state
            raise Conflict(f"the approval is {state}", reason=f"approval {approval.id} is {state}")


__all__ = ["ApprovalManager", "ApprovalMismatch", "InsufficientAuthentication", "NotApprover", "check_approver",
           "check_fresh", "is_same_person", "request_digest"]
