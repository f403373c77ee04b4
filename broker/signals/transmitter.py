"""The delivery worker: claims due signal deliveries from the store, pushes each SET (RFC 8935), audits the outcome.

Rules this file keeps:
1. It runs as its own background task (``broker.app``), async end to end: the store's calls go through its
   thread, the pushes through the shared ``aiohttp`` session, at most ``concurrency`` at once. A slow or
   dead receiver holds one slot for at most its ``timeout``; it never holds up the maintenance loop.
2. Every push is preceded by a claim (``broker.signals.deliveries`` rule 2) and followed by one settle
   that writes the audit record: ``signal.delivered`` for a ``202``, ``signal.failed`` for every other
   outcome, a retry included (its reason says when the next attempt is, or that there will be none).
3. The SET is built and signed at each attempt from the row and its task (same ``jti``, ``iat`` and
   claims every time; a key rotated meanwhile signs the retry). The request carries the SET, the
   receiver's configured ``Authorization`` header if any, and nothing else; redirects are not followed
   (a redirect would carry the header elsewhere). Nothing from a push, header or body, is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp

from broker.audit import AuditRecord, Outcome
from broker.errors import StoreUnavailable
from broker.metrics import Metrics
from broker.signals.deliveries import (
    Accepted,
    Answer,
    DeliveryEvent,
    Rejected,
    Transient,
    plan_retry,
    read_answer,
)
from broker.signals.events import Initiator, RevokedSession, encode_set, session_revoked_claims
from broker.signals.keys import SigningKey
from broker.store import Store
from broker.store.signals import SignalDelivery
from broker.vault import Sensitive

__all__ = ["Receiver", "Transmitter"]

log = logging.getLogger(__name__)

_MAX_ANSWER = 16 * 1024  # of a receiver's answer, read for a 400's error object; the rest is ignored
_CLAIM_MARGIN = 5.0  # a claim outlives the push's own timeout by this much
_INITIATORS: dict[str, Initiator] = {"admin": "admin", "user": "user", "policy": "policy", "system": "system"}


@dataclass(frozen=True)
class Receiver:
    name: str
    url: str
    audience: str
    timeout: float
    authorization: Sensitive | None = None


class Transmitter:
    """Pushes ``session-revoked`` SETs to receivers until each is delivered, refused or given up."""

    def __init__(self, *, store: Store, session: aiohttp.ClientSession, issuer: str, key: SigningKey,
                 receivers: Mapping[str, Receiver], clock: Callable[[], float], max_attempts: int,
                 max_age: float, max_backoff: float, poll_interval: float, concurrency: int = 8,
                 rand: Callable[[], float] = random.random, metrics: Metrics | None = None) -> None:
        self._store = store
        self._session = session
        self._issuer = issuer
        self._key = key
        self._receivers = dict(receivers)
        self._clock = clock
        self._max_attempts = max_attempts
        self._max_age = max_age
        self._max_backoff = max_backoff
        self._poll = poll_interval
        self._slots = asyncio.Semaphore(concurrency)
        self._rand = rand
        self._wake = asyncio.Event()
        self._metrics = metrics

    def wake(self) -> None:
        """A task ended on this replica: look for due deliveries now rather than at the next poll."""
        self._wake.set()

    async def run_forever(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable:
                log.warning("signal transmitter: the store is unavailable; retrying")
            except Exception:
                log.exception("signal transmitter tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll)
            self._wake.clear()

    async def tick(self) -> int:
        """One round: every due delivery claimed and pushed once. Returns how many were pushed."""
        due = await self._store.signals_due(now=self._clock())
        results = await asyncio.gather(*(self._one(d) for d in due))
        return sum(results)

    async def _one(self, d: SignalDelivery) -> bool:
        async with self._slots:
            receiver = self._receivers.get(d.receiver)
            now = self._clock()
            timeout = receiver.timeout if receiver is not None else 0.0
            claimed_until = now + timeout + _CLAIM_MARGIN
            if not await self._store.claim_signal(d.id, now=now, until=claimed_until):
                return False  # another worker took it
            attempts = d.attempts + 1
            if receiver is None:
                await self._settle(d, DeliveryEvent.GAVE_UP, "failure", claimed_until, attempts,
                                   f"receiver {d.receiver} is no longer configured; not sent")
                return False
            answer = await self._push(receiver, self._set_for(d, receiver))
            await self._record(d, receiver, answer, claimed_until, attempts)
            return True

    def _set_for(self, d: SignalDelivery, receiver: Receiver) -> str:
        # The store writes one of CAEP's four words; anything else (a row from a newer broker) says "system".
        initiator = _INITIATORS.get(d.initiator, "system")
        claims = session_revoked_claims(RevokedSession(
            jti=d.id, issuer=self._issuer, audience=receiver.audience, issued_at=d.created_at, task=d.task_id,
            task_state=d.task_state, user=d.user, agent=d.agent, tenant=d.tenant, revoked_at=d.occurred_at,
            initiator=initiator, reason=d.reason))
        return encode_set(claims, self._key)

    async def _push(self, receiver: Receiver, token: str) -> Answer:
        headers = {"Content-Type": "application/secevent+jwt", "Accept": "application/json"}
        if receiver.authorization is not None:
            headers["Authorization"] = receiver.authorization.reveal()
        try:
            async with self._session.post(receiver.url, data=token.encode(), headers=headers,
                                          allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=receiver.timeout)) as resp:
                body = await resp.content.read(_MAX_ANSWER)
                return read_answer(resp.status, resp.headers.get("Content-Type", ""), body)
        except TimeoutError:
            return Transient(f"no answer within {receiver.timeout:g} s")
        except aiohttp.ClientError as exc:
            # The exception's class only: its text may hold the URL, whose query may hold a secret.
            return Transient(f"could not reach the receiver ({type(exc).__name__})")

    async def _record(self, d: SignalDelivery, receiver: Receiver, answer: Answer, claimed_until: float,
                      attempts: int) -> None:
        what = f"session-revoked SET {d.id} to {receiver.name}"
        if isinstance(answer, Accepted):
            await self._settle(d, DeliveryEvent.ACCEPTED, "success", claimed_until, attempts,
                               f"{what}: accepted (HTTP 202), attempt {attempts}")
            return
        if isinstance(answer, Rejected):
            detail = f"{answer.err}: {answer.description}" if answer.description else answer.err
            await self._settle(d, DeliveryEvent.REJECTED, "failure", claimed_until, attempts,
                               f"{what}: refused by the receiver (HTTP 400 {detail}); not retried")
            return
        now = self._clock()
        plan = plan_retry(attempts=attempts, created_at=d.created_at, now=now, max_attempts=self._max_attempts,
                          max_age=self._max_age, max_backoff=self._max_backoff, rand=self._rand())
        event = DeliveryEvent.RETRY_SCHEDULED if plan.at is not None else DeliveryEvent.GAVE_UP
        log.warning("signal %s to %s: %s; %s", d.id, receiver.name, answer.what, plan.why)
        await self._settle(d, event, "failure", claimed_until, attempts, f"{what}: {answer.what}; {plan.why}",
                           next_attempt_at=plan.at, error=answer.what)

    async def _settle(self, d: SignalDelivery, event: DeliveryEvent, outcome: Outcome, claimed_until: float,
                      attempts: int, reason: str, *, next_attempt_at: float | None = None,
                      error: str | None = None) -> None:
        now = self._clock()
        record = AuditRecord(now, "signal.delivered" if event == DeliveryEvent.ACCEPTED else "signal.failed",
                             outcome, user=d.user, user_name=d.user_name, agent=d.agent, task=d.task_id,
                             tenant=d.tenant, resource=f"receiver:{d.receiver}", action="signal.push", reason=reason)
        if not await self._store.settle_signal(d.id, event, claimed_until=claimed_until, now=now, attempts=attempts,
                                               record=record, next_attempt_at=next_attempt_at, error=error):
            log.warning("signal %s: the claim lapsed before the outcome was recorded; another worker retries", d.id)
            return
        if self._metrics is not None:
            self._metrics.inc({DeliveryEvent.ACCEPTED: "broker_signals_delivered_total",
                               DeliveryEvent.RETRY_SCHEDULED: "broker_signals_retried_total"}.get(
                                   event, "broker_signals_failed_total"))
