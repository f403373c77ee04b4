"""One SET pushed to one receiver: the delivery's state table, and how a receiver's answer is read. Pure: no I/O.

Rules this file keeps:
1. A delivery's state changes only by an event of ``DELIVERIES``; the store moves a row with one
   compare-and-set on the states the event applies in (``broker.states`` rule 2).
2. A worker *claims* a due delivery before it pushes (``pending`` -> ``sending``, with ``next_attempt_at``
   set to when the claim lapses). Several replicas may run workers: the claim's compare-and-set lets one
   win. A worker that dies mid-push leaves a ``sending`` row whose claim lapses; another worker claims it
   again (``sending`` -> ``sending``) and pushes again. Delivery is therefore at least once: a receiver
   recognises a repeat by the SET's ``jti``, which is the delivery's id and never changes between attempts.
3. Only a ``202 Accepted`` is a delivery (RFC 8935 section 2.2). A ``400`` whose JSON body names an ``err``
   is the receiver refusing this SET (section 2.3): final, never retried (it would be refused again).
   Anything else (another status, a redirect, which is never followed, a timeout, a refused connection)
   is retried with exponential backoff and jitter, until the attempts or the age run out: then ``failed``.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass

from broker.intents import backoff
from broker.states import StateTable

__all__ = [
    "DELIVERIES", "Accepted", "Answer", "DeliveryEvent", "DeliveryState", "Rejected", "RetryPlan", "Transient",
    "plan_retry", "read_answer",
]


class DeliveryState(enum.StrEnum):
    PENDING = "pending"  # due at next_attempt_at
    SENDING = "sending"  # claimed by a worker until next_attempt_at
    DELIVERED = "delivered"  # the receiver answered 202
    FAILED = "failed"  # refused (400 with err), or attempts/age exhausted, or the receiver is no longer configured


class DeliveryEvent(enum.StrEnum):
    CLAIMED = "claimed"  # a worker takes a due delivery (or one whose claim lapsed)
    ACCEPTED = "accepted"  # 202
    RETRY_SCHEDULED = "retry_scheduled"  # a transient failure, attempts and age left
    REJECTED = "rejected"  # 400 with err: the receiver refuses this SET
    GAVE_UP = "gave_up"  # a transient failure with no attempts or age left, or no such receiver any more


DELIVERIES: StateTable[DeliveryState, DeliveryEvent] = StateTable("signal delivery", {
    DeliveryState.PENDING: {DeliveryEvent.CLAIMED: DeliveryState.SENDING},
    DeliveryState.SENDING: {DeliveryEvent.CLAIMED: DeliveryState.SENDING,
                            DeliveryEvent.ACCEPTED: DeliveryState.DELIVERED,
                            DeliveryEvent.RETRY_SCHEDULED: DeliveryState.PENDING,
                            DeliveryEvent.REJECTED: DeliveryState.FAILED,
                            DeliveryEvent.GAVE_UP: DeliveryState.FAILED},
    DeliveryState.DELIVERED: {},
    DeliveryState.FAILED: {},
})


# -- a receiver's answer --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    status: int = 202


@dataclass(frozen=True)
class Rejected:
    """RFC 8935 section 2.3: ``400`` with ``{"err": ..., "description": ...}``."""

    err: str
    description: str


@dataclass(frozen=True)
class Transient:
    """Worth another attempt; ``what`` says why, for the audit record (never the receiver's body)."""

    what: str


Answer = Accepted | Rejected | Transient

# The registry's codes are short ASCII words (IANA "Security Event Token Error Codes"); anything else from
# the receiver is cut to this shape before it reaches an audit record.
_ERR = re.compile(r"^[a-z0-9_.-]{1,64}$")
_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_MAX_DESCRIPTION = 200


def read_answer(status: int, content_type: str, body: bytes) -> Answer:
    """What a receiver's HTTP answer means for the delivery (rule 3).

    ``body`` is at most the first few KiB the worker read. A ``400`` whose body is not the RFC's error
    object (a proxy's page, say) is not the receiver's refusal: it is retried like any other failure.
    """
    if status == 202:
        return Accepted()
    if status == 400 and content_type.split(";")[0].strip().lower() == "application/json":
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("err"), str) and _ERR.fullmatch(doc["err"]):
            description = doc.get("description")
            text = _PRINTABLE.sub("?", description)[:_MAX_DESCRIPTION] if isinstance(description, str) else ""
            return Rejected(err=doc["err"], description=text)
    if 300 <= status < 400:
        return Transient(f"HTTP {status}: a redirect, not followed (configure the final URL)")
    return Transient(f"HTTP {status}")


# -- retries --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPlan:
    """After a transient failure: try again at ``at``, or (``at`` is None) give up."""

    at: float | None
    why: str


def plan_retry(*, attempts: int, created_at: float, now: float, max_attempts: int, max_age: float,
               max_backoff: float, rand: float) -> RetryPlan:
    """When to try again after ``attempts`` failed attempts, or None once attempts or age are spent.

    ``rand`` in [0, 1) is the jitter's draw (``broker.intents.backoff``): a crowd of deliveries that
    failed together (one receiver down) does not come back together.
    """
    if attempts >= max_attempts:
        return RetryPlan(None, f"gave up after {attempts} attempts")
    delay = backoff(attempts, cap=max_backoff, rand=lambda: rand)
    if now + delay - created_at > max_age:
        return RetryPlan(None, f"gave up after {attempts} attempts: older than {round(max_age)} s")
    return RetryPlan(now + delay, f"retry in {delay:.1f} s (attempt {attempts} of {max_attempts})")
