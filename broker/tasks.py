"""Tasks: one user's delegation of one role to one agent, until a deadline.

Rules this file keeps:
1. The state machine is ``broker.states.TASKS`` (and ``TOKENS`` for the task token); the store moves a
   task only by an event from it, as a compare-and-set.
2. Starting a task writes an intent (checking operator locks), creates the Vault task token with a
   short bootstrap TTL, records the task with ``task.started`` in one transaction, then extends the
   token to the task's end. If the token create or the record fails, the intent is given up
   (``aborting``, with the token's accessor when the start learned it) and the token revoked; the
   intent is ``aborted`` only once Vault confirms the token is gone, or, when its accessor is unknown,
   once the bootstrap TTL has killed it (``broker.intents``). If the broker dies, the token dies by
   itself within the bootstrap TTL. If the extension fails, the task is revoked like any other
   (fenced, then ``revocations.Revoker``, retried until Vault confirms).
3. Ending is a fence, then a revocation (``revocations.Revoker``): the task leaves ``active`` in the
   store first, so no new lease can commit; then its token is revoked by accessor, which makes Vault
   revoke every lease and child token it created; only when Vault confirms are the leases ``revoked``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from broker.audit import AuditRecord
from broker.delegation import Catalog, TaskView, check_start
from broker.errors import (
    BadRequest,
    Denied,
    InvalidIdentity,
    NotDelegator,
    NotFound,
    VaultError,
    VaultUnavailable,
)
from broker.faults import CrashHook, no_crash
from broker.identity import AgentIdentity, DelegationToken, UserIdentity, check_delegation
from broker.limits import RateLimiter
from broker.revocations import IntentSettler, Revoker
from broker.sealing import TokenSealer
from broker.states import TASKS, TaskEvent, TaskState, TokenState
from broker.store import Intent, LeaseRow, Person, Store, TaskRow
from broker.vault import VaultClient

log = logging.getLogger(__name__)


# Re-exported: the task table lives with the others in broker.states.
__all__ = ["TASKS", "EndResult", "TaskEvent", "TaskManager", "TaskState", "new_task_id", "view"]

_RECORDED: dict[TaskEvent, str] = {TaskEvent.END: "task.ended", TaskEvent.EXPIRE: "task.expired",
                                   TaskEvent.REVOKE: "task.revoked"}


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
        revoker: Revoker,
        settler: IntentSettler,
        clock: Callable[[], float],
        bootstrap_ttl: int = 30,
        crash: CrashHook = no_crash,
        start_rate: RateLimiter | None = None,
    ) -> None:
        self._catalog = catalog
        # Per person, before any other work: each start costs a Vault token, each refusal an audit row.
        self._start_rate = start_rate
        self._store = store
        self._vault = vault
        self._sealer = sealer
        self._revoker = revoker
        self._settler = settler
        self._clock = clock
        self._bootstrap_ttl = bootstrap_ttl
        self._crash = crash

    async def start_delegated(self, agent: AgentIdentity, token: DelegationToken, *, role: str, ttl: int,
                              reason: str, tenant: str | None) -> TaskRow:
        """Start a task for ``token``'s user, on the word of their IdP (RFC 8693), asked by ``agent`` itself.

        The same start as :meth:`start` (the same rate, catalog checks, locks and ``task.started`` record,
        which notes the token's ``jti``), after the token's own checks: ``act.sub`` is the agent, ``scope``
        names ``task:<role>``, and its ``jti`` was never accepted before. Each refusal is an ``access.denied``
        record with the jti. What the token claims and does not hold is a 401 (act, scope, replay, and a
        role the user may not delegate); what is about the caller or the moment stays as for a user start
        (an agent outside the role's patterns 403 ``agent_not_allowed``, a lock 403 ``locked``, a rate 429).
        The jti is spent after the catalog checks, before the lock check and Vault: a token refused by the
        catalog can be retried, one that met a lock or an unavailable Vault cannot.

        Raises:
            InvalidIdentity: act or scope do not match, the jti was accepted before, or the user may not
                delegate the role.
            Other errors: as :meth:`start`.
        """
        return await self.start(token.user, agent=str(agent.spiffe_id), role=role, ttl=ttl, reason=reason,
                                tenant=tenant, delegation=(token, agent))

    async def _accept(self, token: DelegationToken, agent: AgentIdentity, now: float) -> None:
        """Spend the token's jti. Raises: InvalidIdentity: it was accepted before (a replay)."""
        if not await self._store.accept_delegation(issuer=token.issuer, jti=token.jti, expires_at=token.remember_until,
                                                   agent=str(agent.spiffe_id), now=now):
            raise InvalidIdentity("delegation token replayed: its jti was accepted before")

    async def start(
        self, user: UserIdentity, *, agent: str, role: str, ttl: int, reason: str, tenant: str | None,
        delegation: tuple[DelegationToken, AgentIdentity] | None = None,
    ) -> TaskRow:
        """Check the delegation, create the task token in Vault, record the task.

        The token is created with a short bootstrap TTL (its explicit max TTL is already the task's end)
        and extended only after the task is recorded: a crash in between leaves a token that dies by
        itself within the bootstrap TTL, and an open intent that the reconciler closes.

        Raises:
            Denied subclasses: the delegation is not allowed (recorded as ``access.denied``).
            Locked: an operator lock covers the user, the agent or the tenant.
            RateLimited: this person starts tasks faster than ``limits.task_start_rate_per_user``.
            VaultUnavailable: Vault cannot be reached; nothing was recorded.
        """
        if self._start_rate is not None:
            self._start_rate.take(user.id, what="person")
        now = self._clock()
        person = Person(id=user.id, name=user.name, trusted_email=user.trusted_email, email=user.email)
        jti = delegation[0].jti if delegation is not None else None
        try:
            if delegation is not None:  # the token's own binding first: it must name this agent and role
                check_delegation(delegation[0], delegation[1], role)
            decision = check_start(self._catalog, user, agent=agent, role=role, ttl=ttl, tenant=tenant)
            if delegation is not None:  # after the catalog: a refused start leaves its token unspent
                await self._accept(delegation[0], delegation[1], now)
            r = decision.role
            task_id = new_task_id()
            await self._store.begin_task(Intent(id=task_id, kind="task", task_id=task_id, grant=None, accessor=None,
                                                created_at=now), user=person, agent=str(decision.agent),
                                         tenant=r.tenant)
        except (Denied, BadRequest, InvalidIdentity) as exc:
            await self._store.append_audit(
                AuditRecord(now, "access.denied", "denied", user=user.id, user_name=user.name, agent=agent,
                            tenant=tenant, resource=f"role:{role}", action="task.start", reason=exc.reason,
                            delegation_jti=jti)
            )
            if delegation is not None and isinstance(exc, NotDelegator):
                # The token claims an authority the catalog does not give its user: a bad token (issue 13).
                raise InvalidIdentity(exc.reason) from exc
            raise
        self._crash("task.after_intent")
        try:
            auth = await self._vault.create_token_from_role(
                r.vault_policy,
                policies=[r.vault_policy],
                ttl=min(self._bootstrap_ttl, decision.ttl),
                explicit_max_ttl=decision.ttl,
                meta={"task": task_id, "user": user.id, "agent": str(decision.agent), "tenant": r.tenant,
                      "role": r.name},
                display_name=f"task-{r.name}",
            )
        except BaseException:
            # A timeout is ambiguous: Vault may hold a token whose accessor we never saw. It dies at its
            # bootstrap TTL; the intent says so only once that has passed.
            await self._settler.abandon(task_id, accessor=None)
            raise
        self._crash("task.after_token")
        row = TaskRow(
            id=task_id, user=user.id, agent=str(decision.agent), role=r.name, tenant=r.tenant, reason=reason,
            created_at=now, expires_at=now + decision.ttl, state=TaskState.ACTIVE.value, ended_at=None,
            token_accessor=auth.accessor, sealed_token=self._sealer.seal(auth.client_token, task_id=task_id),
            token_state=(TokenState.BOOTSTRAP if decision.ttl > self._bootstrap_ttl else TokenState.LIVE).value,
            user_name=user.name, user_email=user.trusted_email,
        )
        record = AuditRecord.for_task(row, now, "task.started", "success", resource=f"role:{r.name}",
                                      action="task.start", reason=reason, delegation_jti=jti)
        try:
            recorded = await self._store.create_task(row, record)
        except BaseException:
            await self._settler.abandon(task_id, accessor=auth.accessor)
            raise
        if not recorded:  # the reconciler gave up on this start: it must not become a task
            await self._settler.abandon(task_id, accessor=auth.accessor)
            raise VaultUnavailable("the task could not be started; retry", reason=f"intent {task_id} was aborted")
        self._crash("task.after_record")
        if decision.ttl > self._bootstrap_ttl:
            try:
                await self._vault.renew_self(token=auth.client_token, increment=decision.ttl)
            except VaultError:
                await self.end(task_id, by=user, event=TaskEvent.REVOKE, reason="could not extend the task token")
                raise
            await self._store.mark_token_live(task_id)
            row = TaskRow(**{**row.__dict__, "token_state": TokenState.LIVE.value})
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

        Vault that answered the revocation but has not confirmed every lease gone within
        ``vault.revoke_confirm_timeout`` (it revokes a task of many leases in the background) is no
        error: the result has ``pending`` > 0, the leases stay ``revoke_pending`` and the maintenance loop
        confirms them (the API answers 202; ``GET /v1/tasks/{id}`` shows when it is done).

        Raises:
            NotFound: no such task.
            VaultUnavailable: Vault did not answer the revocation at all (down, sealed, unreachable); the
                task is fenced all the same and the maintenance loop keeps retrying.
            StoreUnavailable: the store is down.
        """
        now = self._clock()
        actor = f"{by.name} ({by.id})" if isinstance(by, UserIdentity) else str(by.spiffe_id)
        row = await self._store.get_task(task_id)
        if row is None:
            raise NotFound("no such task")
        if TASKS.allows(TaskState(row.state), event):
            record = AuditRecord.for_task(row, now, _RECORDED[event], "success", resource=f"role:{row.role}",
                                          action=str(event), reason=reason or f"by {actor}")
            fenced = await self._store.fence_tasks([task_id], event=event, now=now, records=[record])
            self._crash("end.after_fence")
            if fenced:
                row = fenced[0]
            else:  # another ender won: read what it made of the task
                again = await self._store.get_task(task_id)
                assert again is not None
                row = again
        if row.token_state == TokenState.REVOKED:
            return EndResult(row, revoked=0, pending=0)
        settled = await self._revoker.settle([row])
        row = await self._store.get_task(task_id)
        assert row is not None
        if settled.failed:
            raise VaultUnavailable("Vault did not answer the revocation; the task is ended and the broker keeps "
                                   "retrying", reason=f"{settled.pending} leases of task {task_id} not confirmed")
        return EndResult(row, revoked=settled.revoked, pending=settled.pending)

