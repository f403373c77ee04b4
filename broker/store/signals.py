"""SSF signal deliveries: written with the fence that ends a task, claimed and settled by the transmitter.

Rules this file keeps:
1. A delivery row is inserted by ``enqueue_signals`` inside the transaction that moves its task out of
   ``active`` (``TaskStore.fence_tasks`` and ``fence_selected``, the only two ways a task leaves it): the
   signal commits with the end, or neither does. No catch-up is needed after a crash.
2. A row changes state only along ``broker.signals.deliveries.DELIVERIES``, compare-and-set.
3. Settling a delivery writes its audit record (``signal.delivered`` / ``signal.failed``) in the same
   transaction, and only if the settling worker still holds the claim it took.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select, update

from broker.audit import AuditRecord
from broker.rows import TaskRow
from broker.signals.deliveries import DELIVERIES, DeliveryEvent, DeliveryState
from broker.states import TaskEvent
from broker.store._base import StoreBase
from broker.store.schema import signal_deliveries, tasks
from broker.store.statements import _append

__all__ = ["SignalDelivery", "SignalStore", "enqueue_signals", "initiator_of"]

SESSION_REVOKED = "session-revoked"
_INSERT = insert(signal_deliveries)
_MAX_REASON = 2000


@dataclass(frozen=True)
class SignalDelivery:
    """A delivery with what its SET says about the task (its person, agent, tenant and final state)."""

    id: str
    receiver: str
    event: str
    task_id: str
    initiator: str
    reason: str
    occurred_at: float
    created_at: float
    state: str
    attempts: int
    next_attempt_at: float | None
    resolved_at: float | None
    last_error: str | None
    user: str
    user_name: str | None
    agent: str
    tenant: str
    task_state: str


def initiator_of(event: TaskEvent) -> str:
    """CAEP ``initiating_entity`` of a task's end outside an operator's revocation (that one is ``admin``).

    Its user or its agent ended it (the agent acts for the user): ``user``. Its deadline passed: ``policy``.
    The broker revoked it (its token could not be extended, or expired unused): ``system``.
    """
    return {TaskEvent.END: "user", TaskEvent.EXPIRE: "policy", TaskEvent.REVOKE: "system"}[event]


def enqueue_signals(conn: Connection, fenced: Sequence[TaskRow], *, receivers: Sequence[str], initiator: str,
                    reasons: Mapping[str, str], now: float) -> int:
    """One ``pending`` delivery per (fenced task, receiver), due now, in the caller's transaction (rule 1)."""
    rows = [{"id": "set_" + secrets.token_urlsafe(18), "receiver": receiver, "event": SESSION_REVOKED,
             "task_id": t.id, "initiator": initiator, "reason": (reasons.get(t.id) or "")[:_MAX_REASON],
             "occurred_at": t.ended_at if t.ended_at is not None else now, "created_at": now,
             "state": DeliveryState.PENDING.value, "attempts": 0, "next_attempt_at": now}
            for t in fenced for receiver in receivers]
    if rows:
        conn.execute(_INSERT, rows)
    return len(rows)


_JOINED = (select(signal_deliveries, tasks.c.user, tasks.c.user_name, tasks.c.agent, tasks.c.tenant,
                  tasks.c.state.label("task_state"))
           .join(tasks, tasks.c.id == signal_deliveries.c.task_id))


def _delivery(r: Any) -> SignalDelivery:
    return SignalDelivery(**dict(r))


class SignalStore(StoreBase):
    # Set once at start-up (broker.app) from [signals].receivers: who gets a SET when a task ends.
    signal_receivers: tuple[str, ...] = ()
    # Called (on the event loop) after a transaction enqueued deliveries: wakes this replica's transmitter.
    signal_wake: Callable[[], None] | None = None

    def _signals_enqueued(self, n: int) -> None:
        if n and self.signal_wake is not None:
            self.signal_wake()

    async def signals_due(self, *, now: float, limit: int = 100) -> list[SignalDelivery]:
        """Deliveries a worker may claim: ``pending`` and due, or ``sending`` with a lapsed claim."""
        sources = [s.value for s in DELIVERIES.sources(DeliveryEvent.CLAIMED)]
        q = (_JOINED.where(signal_deliveries.c.state.in_(sources), signal_deliveries.c.next_attempt_at <= now)
             .order_by(signal_deliveries.c.next_attempt_at).limit(limit))

        def run() -> list[SignalDelivery]:
            with self._read() as conn:
                return [_delivery(r) for r in conn.execute(q).mappings()]
        return await self._run(run)

    async def claim_signal(self, delivery_id: str, *, now: float, until: float) -> bool:
        """Take a due delivery until ``until`` (``CLAIMED``). False when another worker took it first."""
        sources = [s.value for s in DELIVERIES.sources(DeliveryEvent.CLAIMED)]
        stmt = (update(signal_deliveries)
                .where(signal_deliveries.c.id == delivery_id, signal_deliveries.c.state.in_(sources),
                       signal_deliveries.c.next_attempt_at <= now)
                .values(state=DELIVERIES.target(DeliveryEvent.CLAIMED).value, next_attempt_at=until))

        def run() -> bool:
            with self._tx() as conn:
                return bool(conn.execute(stmt).rowcount == 1)
        return await self._run(run)

    async def settle_signal(self, delivery_id: str, event: DeliveryEvent, *, claimed_until: float, now: float,
                            attempts: int, record: AuditRecord, next_attempt_at: float | None = None,
                            error: str | None = None) -> bool:
        """Move a claimed delivery along ``event`` and write ``record``, both only if the claim is still ours.

        False, writing nothing, when the claim lapsed and another worker took the delivery meanwhile.
        """
        target = DELIVERIES.next_state(DeliveryState.SENDING, event)
        final = target in DELIVERIES.final
        stmt = (update(signal_deliveries)
                .where(signal_deliveries.c.id == delivery_id,
                       signal_deliveries.c.state == DeliveryState.SENDING.value,
                       signal_deliveries.c.next_attempt_at == claimed_until)
                .values(state=target.value, attempts=attempts, next_attempt_at=None if final else next_attempt_at,
                        resolved_at=now if final else None, last_error=error[:512] if error else None))

        def run() -> bool:
            with self._tx() as conn:
                if conn.execute(stmt).rowcount != 1:
                    self._undo(conn)
                    return False
                _append(conn, record)
            return True
        return await self._run(run)

    async def list_signals(self, *, task_id: str | None = None, states: Sequence[str] | None = None,
                           limit: int = 1000) -> list[SignalDelivery]:
        q = _JOINED.order_by(signal_deliveries.c.created_at, signal_deliveries.c.id).limit(limit)
        if task_id is not None:
            q = q.where(signal_deliveries.c.task_id == task_id)
        if states is not None:
            q = q.where(signal_deliveries.c.state.in_(list(states)))

        def run() -> list[SignalDelivery]:
            with self._read() as conn:
                return [_delivery(r) for r in conn.execute(q).mappings()]
        return await self._run(run)
