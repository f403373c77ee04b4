"""Tasks: one user's delegation of one role to one agent, until a deadline.

Rules this file keeps:
1. The state machine is the table below; nothing else changes a task's state.
2. Starting a task creates its Vault task token first and records the task with ``task.started`` in
   one transaction; if that transaction fails, the token is revoked (fail closed).
3. Ending is a fence, then a revocation: the task leaves ``active`` in the store first, so no new
   lease can commit; then its token is revoked by accessor, which makes Vault revoke every lease and
   child token it created; only when Vault confirms are the leases marked ``revoked``.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from broker.audit import AuditRecord
from broker.delegation import Catalog, TaskView, check_start
from broker.errors import BrokerError, NotFound, VaultError, VaultUnavailable
from broker.identity import AgentIdentity, UserIdentity
from broker.sealing import TokenSealer
from broker.store import LeaseRow, Store, TaskRow
from broker.vault import VaultClient

log = logging.getLogger(__name__)


class TaskState(enum.StrEnum):
    ACTIVE = "active"
    ENDED = "ended"
    EXPIRED = "expired"
    REVOKED = "revoked"


class TaskEvent(enum.StrEnum):
    END = "end"
    EXPIRE = "expire"
    REVOKE = "revoke"


TRANSITIONS: dict[TaskState, dict[TaskEvent, TaskState]] = {
    TaskState.ACTIVE: {
        TaskEvent.END: TaskState.ENDED,
        TaskEvent.EXPIRE: TaskState.EXPIRED,
        TaskEvent.REVOKE: TaskState.REVOKED,
    },
    TaskState.ENDED: {},
    TaskState.EXPIRED: {},
    TaskState.REVOKED: {},
}


def next_state(state: TaskState, event: TaskEvent) -> TaskState | None:
    """The state after ``event``, or None when the event does not apply (the task already left ``active``)."""
    return TRANSITIONS[state].get(event)


def new_task_id() -> str:
    return "tsk_" + secrets.token_urlsafe(18)


def view(row: TaskRow) -> TaskView:
    return TaskView(id=row.id, agent=row.agent, role=row.role, state=row.state, expires_at=row.expires_at)


@dataclass(frozen=True)
class EndResult:
    task: TaskRow
    revoked: int
    pending: int


class TaskManager:
    """Starts, reads and ends tasks: the store, Vault and the audit trail kept in step."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        store: Store,
        vault: VaultClient,
        sealer: TokenSealer,
        clock: Callable[[], float],
        confirm_timeout: float = 5.0,
    ) -> None:
        self._catalog = catalog
        self._store = store
        self._vault = vault
        self._sealer = sealer
        self._clock = clock
        self._confirm_timeout = confirm_timeout

    async def start(
        self, user: UserIdentity, *, agent: str, role: str, ttl: int, reason: str, tenant: str | None
    ) -> TaskRow:
        """Check the delegation, create the task token in Vault, record the task.

        Raises:
            Denied subclasses: the delegation is not allowed (recorded as ``access.denied``).
            VaultUnavailable: Vault cannot be reached; nothing was recorded.
        """
        now = self._clock()
        try:
            decision = check_start(self._catalog, user, agent=agent, role=role, ttl=ttl, tenant=tenant)
        except BrokerError as exc:
            await self._store.append_audit(
                AuditRecord(now, "access.denied", "denied", user=user.name, agent=agent, tenant=tenant,
                            resource=f"role:{role}", action="task.start", reason=exc.reason)
            )
            raise
        r = decision.role
        task_id = new_task_id()
        auth = await self._vault.create_token_from_role(
            r.vault_policy,
            policies=[r.vault_policy],
            ttl=decision.ttl,
            explicit_max_ttl=decision.ttl,
            meta={"task": task_id, "user": user.name, "agent": str(decision.agent), "tenant": r.tenant, "role": r.name},
            display_name=f"task-{r.name}",
        )
        # Vault's own clock started the token's TTL: anchor the deadline no later than that.
        expires_at = now + min(decision.ttl, auth.lease_duration)
        row = TaskRow(
            id=task_id, user=user.name, agent=str(decision.agent), role=r.name, tenant=r.tenant, reason=reason,
            created_at=now, expires_at=expires_at, state=TaskState.ACTIVE, ended_at=None,
            token_accessor=auth.accessor, sealed_token=self._sealer.seal(auth.client_token, task_id=task_id),
        )
        record = AuditRecord(now, "task.started", "success", user=user.name, agent=row.agent, task=task_id,
                             tenant=r.tenant, resource=f"role:{r.name}", action="task.start", reason=reason)
        try:
            await self._store.create_task(row, record)
        except BaseException:
            # No record, no token: the task never existed.
            await _shielded_revoke(self._vault, auth.accessor)
            raise
        return row

    async def get(self, task_id: str) -> tuple[TaskRow, list[LeaseRow]]:
        """Raises: NotFound."""
        row = await self._store.get_task(task_id)
        if row is None:
            raise NotFound("no such task")
        return row, await self._store.list_leases(task_id=task_id)

    async def end(self, task_id: str, *, by: UserIdentity | AgentIdentity, event: TaskEvent = TaskEvent.END,
                  reason: str = "") -> EndResult:
        """End a task: fence it, revoke its token by accessor, confirm in Vault. Idempotent.

        A second call on an ended task retries the confirmation of anything still ``revoke_pending``.

        Raises:
            NotFound: no such task.
            VaultUnavailable: Vault could not confirm; leases stay ``revoke_pending``.
        """
        now = self._clock()
        actor = by.name if isinstance(by, UserIdentity) else str(by.spiffe_id)
        row = await self._store.get_task(task_id)
        if row is None:
            raise NotFound("no such task")
        target = next_state(TaskState(row.state), event)
        if target is not None:
            event_name = {TaskEvent.END: "task.ended", TaskEvent.EXPIRE: "task.expired",
                          TaskEvent.REVOKE: "task.revoked"}[event]
            record = AuditRecord(now, event_name, "success", user=row.user, agent=row.agent, task=row.id,
                                 tenant=row.tenant, resource=f"role:{row.role}", action=str(event),
                                 reason=reason or f"by {actor}")
            await self._store.fence_task(task_id, state=target, now=now, record=record)
            row = await self._store.get_task(task_id)
            assert row is not None
        pending = await self._store.list_leases(task_id=task_id, states=("revoke_pending",))
        if not pending and target is None:
            return EndResult(row, revoked=0, pending=0)
        await self._vault.revoke_accessor(row.token_accessor)
        gone = await self._confirm(row, pending)
        now = self._clock()
        records = [
            AuditRecord(now, "lease.revoked", "success", user=row.user, agent=row.agent, task=row.id,
                        tenant=row.tenant, resource=lease.path, action="revoke", lease=lease.id,
                        reason=f"task {row.state}")
            for lease in pending if lease.id in gone
        ]
        await self._store.mark_revoked([lease.id for lease in pending if lease.id in gone], now=now, records=records)
        left = len(pending) - len(gone)
        if left:
            raise VaultUnavailable("Vault has not confirmed the revocation yet; retry",
                                   reason=f"{left} leases of task {row.id} still present in Vault")
        return EndResult(row, revoked=len(gone), pending=0)

    async def _confirm(self, row: TaskRow, leases: list[LeaseRow]) -> set[str]:
        """Poll Vault until the task token and each lease are gone, within the confirmation timeout.

        revoke-accessor answers before Vault has revoked the token's leases, so one look is not enough.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._confirm_timeout
        gone: set[str] = set()
        delay = 0.02
        token_gone = False
        while True:
            try:
                if not token_gone:
                    token_gone = await self._vault.lookup_accessor(row.token_accessor) is None
                for lease in leases:
                    if lease.id not in gone and await _lease_gone(self._vault, lease):
                        gone.add(lease.id)
            except VaultError:
                log.warning("confirming revocation of task %s failed; will retry", row.id)
            if token_gone and len(gone) == len(leases):
                return gone
            if loop.time() + delay > deadline:
                return gone if token_gone else set()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


async def _lease_gone(vault: VaultClient, lease: LeaseRow) -> bool:
    if lease.kind == "token":
        return await vault.lookup_accessor(lease.vault_lease_id) is None
    return await vault.lookup_lease(lease.vault_lease_id) is None


async def _shielded_revoke(vault: VaultClient, accessor: str) -> None:
    try:
        await asyncio.shield(vault.revoke_accessor(accessor))
    except Exception:  # noqa: BLE001 -- best effort; the token still dies at its TTL
        log.exception("could not revoke an unrecorded task token; it expires at its TTL")
