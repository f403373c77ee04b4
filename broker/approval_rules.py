"""Approvals, the rules: what one approval covers, who may decide it, and when it is decided. Pure: no I/O.

Rules this file keeps:
1. An approval is bound to a digest of the exact request: task, user, agent, grant, Vault path and TTL.
   Presenting it with any other task, grant or TTL is refused; it is consumed by the one issuance it
   unlocks, in the transaction that records that issuance's intent.
2. An approver must be one of ``people.approvers``, must not be the task's user, may vote once, and
   must have authenticated (``auth_time``) no longer ago than ``people.approval_max_auth_age``;
   otherwise the answer is RFC 9470's ``insufficient_user_authentication``. "The task's user" and "once"
   are about the person: the same (issuer, subject), or one address claimed by both (one person through
   another issuer), never a display name a token can change.
3. A grant may need N approvals (two-person rule); one denial ends it (``tally``). Pending and
   approved-but-unused approvals expire (default 15 minutes) and deliver nothing.
4. Request, each vote, the decision, expiry and the lease it unlocked are audit records naming the
   approver and their authentication time.

``broker.approvals.ApprovalManager`` orchestrates the store and the clock around these.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Literal, Protocol

from broker.delegation import Catalog, any_includes
from broker.errors import Conflict, InsufficientAuthentication, NotApprover
from broker.identity import UserIdentity
from broker.states import APPROVALS, ApprovalEvent, ApprovalState

__all__ = ["Decision", "check_approver", "check_fresh", "is_same_person", "request_digest", "tally"]

Decision = Literal["approve", "deny"]
_DOMAIN = "broker.approval.v1"


class ApprovalLike(Protocol):
    """What the approver checks read of an approval (a store row or anything shaped like one)."""

    @property
    def user(self) -> str: ...
    @property
    def task_id(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def expires_at(self) -> float: ...


def request_digest(*, task: str, user: str, agent: str, grant: str, path: str, ttl: int,
                   key_fingerprint: str | None = None) -> str:
    """SHA-256 over the canonical JSON of exactly what is approved.

    ``key_fingerprint``: the SSH public key to be signed, where the agent chooses it (an approval for one
    key never signs another). Left out when absent, so digests of other grants are as before.
    """
    fields: dict[str, object] = {"agent": agent, "grant": grant, "path": path, "task": task, "ttl": ttl,
                                 "user": user, "v": _DOMAIN}
    if key_fingerprint is not None:
        fields["key_fingerprint"] = key_fingerprint
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"))
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
    return trusted_email is not None and user.email == trusted_email


def check_approver(catalog: Catalog, approval: ApprovalLike, approver: UserIdentity, *, now: float,
                   user_email: str | None = None, related: bool = False) -> None:
    """May ``approver`` vote on ``approval``?

    ``user_email`` is the task user's trusted email, if recorded; ``related`` says the store found the
    approver sharing an address with the task's user, now or before (``Store.same_person``).

    Raises: NotApprover (not an approver, the task's own user), Conflict (not pending).
    """
    if not any_includes(catalog.approvers, approver):
        raise NotApprover("only approvers decide approvals", reason=f"{approver.id} is not an approver")
    if related or is_same_person(approver, approval.user, user_email):
        raise NotApprover("the task's own user cannot approve its grants",
                          reason=f"{approver.id} delegated task {approval.task_id}")
    if not APPROVALS.allows(ApprovalState(approval.state), ApprovalEvent.VOTED) or approval.expires_at <= now:
        raise Conflict(f"the approval is {'expired' if approval.expires_at <= now else approval.state}")




def tally(decisions: Sequence[str], *, required: int) -> ApprovalEvent:
    """What the votes so far (one per person, in order) make of an approval.

    One denial decides (``DENIED``); ``required`` approvals decide (``APPROVED``); else ``VOTED``.
    """
    if "deny" in decisions:
        return ApprovalEvent.DENIED
    if sum(1 for d in decisions if d == "approve") >= required:
        return ApprovalEvent.APPROVED
    return ApprovalEvent.VOTED
