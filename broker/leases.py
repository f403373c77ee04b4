"""Leases: the credentials a task's agent obtained, and the rules of their life.

Rules this file keeps:
1. The state machine is ``broker.states.LEASES``; the store moves a lease only by an event from it, as a
   compare-and-set (fenced with its task, confirmed gone by Vault, renewed).
2. A credential is read from Vault with a child of the task's own token (its issuance token, same
   policy), so Vault enforces the task's scope too, and revoking the task token revokes the credential.
   The issuance token is born with the task's remaining TTL and never renewed: one created whose intent
   was never written (a crash, a lost answer) holds nothing, since nothing is read with a token before
   its intent holds its accessor, and it dies with its task (the task end revokes the tree, the task
   token's explicit max TTL expires it). Task tokens are orphans: they keep their bootstrap TTL.
3. No audit record, no credential: the lease and its ``lease.issued`` record commit together, only
   while the task is still active and the issuance's intent still open; otherwise the intent is given
   up (``aborting``) and its issuance token revoked, taking the credential with it, before the error is
   returned, and nothing is handed out. The intent is ``aborted`` only once Vault confirms the token is
   gone; until then the maintenance loop retries (``revocations.IntentSettler``, ``broker.intents``).
4. The agent never sees Vault's lease id or the task token: only the broker's own lease id.
5. Once Vault's audit device is known to journal issuances (``broker.journal``: the ``X-Broker-Intent``
   header, written in plain text), a credential is read with the task token itself, its intent's id in
   that header: one Vault request per credential, and one store transaction, after the read, that writes
   the intent (no accessor, ``journaled``) already done with the lease and its record (broker.journal
   rule 8). An answer that cannot be recorded is revoked by what it names (``vault_ref``), a lost answer
   is found in the journal, and an answer whose broker died before recording it is claimed from the
   journal by the orphan sweep. A high-risk grant's intent still commits before the read: it spends the
   approval. Token grants take this path only where the device writes accessors
   in plain text (``hmac_accessor = false``); elsewhere, and until the journal is confirmed, rule 2.
6. Vault checks a token when a request arrives, not when it registers what the request created: a read
   still inside Vault while its issuance token (or the task token above it) is revoked creates a lease
   that no token holds, and Vault keeps it for its whole TTL. So revoking the issuance token is not
   enough once an answer came back: an answer that cannot be recorded (the task ended meanwhile) is
   revoked by the lease or accessor it names, and the intent is aborted only when Vault confirms both.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from broker.approvals import ApprovalManager
from broker.audit import AuditRecord
from broker.delegation import AgentInputs, Catalog, Grant, cap_ttl, check_grant, check_inputs
from broker.errors import (
    ApprovalRequired,
    BadRequest,
    BrokerError,
    BudgetExceeded,
    Conflict,
    Denied,
    Gone,
    Locked,
    NotFound,
    NotTaskAgent,
    RateLimited,
    StoreUnavailable,
    VaultBadResponse,
    VaultDenied,
)
from broker.faults import CrashHook, no_crash
from broker.identity import AgentIdentity
from broker.journal import JournalMode
from broker.limits import RateLimiter
from broker.revocations import IntentSettler
from broker.sealing import TokenSealer
from broker.states import LEASES, LeaseEvent, LeaseState, TaskState, TransitionError
from broker.store import ApprovalRow, Intent, LeaseLimits, LeaseRow, Store, TaskRow
from broker.tasks import view
from broker.vault import Sensitive, VaultClient, VaultSecret

log = logging.getLogger(__name__)


def _ref_of(secret: VaultSecret | None) -> tuple[str, str] | None:
    """What an answer named, to revoke it if it cannot be recorded: (kind, lease id or token accessor)."""
    if secret is None:
        return None
    if secret.auth is not None:
        return ("token", secret.auth.accessor)
    return ("lease", secret.lease_id) if secret.lease_id else None


_TASK_CACHE_TTL = 1.0  # seconds a task row read for one credential serves the next ones
# Seconds after a lock or a budget refused an agent's or a user's credential during which their next ones are
# checked before Vault is asked too (a read): the journaled path's own check comes only in the transaction
# after the read (broker.journal rule 8), so a refused agent would otherwise cost Vault a credential a try.
_REFUSAL_MEMORY = 5.0
_TASK_CACHE_MAX = 8192


def new_lease_id() -> str:
    return "lse_" + secrets.token_urlsafe(18)


@dataclass(frozen=True)
class PendingApproval:
    """A high-risk grant asked for without an approval: nothing was issued; people must decide first."""

    approval: ApprovalRow


@dataclass(frozen=True)
class Issued:
    lease: LeaseRow
    data: Mapping[str, Any]

    def __repr__(self) -> str:
        return f"Issued(lease={self.lease!r}, data=<redacted>)"


class LeaseManager:
    def __init__(
        self, *, catalog: Catalog, store: Store, vault: VaultClient, sealer: TokenSealer, clock: Callable[[], float],
        settler: IntentSettler, limits: LeaseLimits | None = None, agent_rate: RateLimiter | None = None,
        user_rate: RateLimiter | None = None, crash: CrashHook = no_crash, bootstrap_ttl: int = 30,
        approvals: ApprovalManager | None = None, backlog_ok: Callable[[], None] | None = None,
        renew_rate: RateLimiter | None = None, journal: JournalMode | None = None,
    ) -> None:
        self._catalog = catalog
        self._store = store
        self._vault = vault
        self._sealer = sealer
        self._clock = clock
        self._settler = settler
        self._limits = limits
        self._agent_rate = agent_rate
        self._user_rate = user_rate
        # Renewals cost a Vault call and an audit row each: per agent, before any other work.
        self._renew_rate = renew_rate
        self._crash = crash
        # Unused since issuance tokens are born with the task's remaining TTL (rule 2): the task token's
        # bootstrap TTL is the task manager's. Still accepted so the app's call stands.
        del bootstrap_ttl
        self._approvals = approvals
        # The audit export's fail-closed gate (broker.export.Exporter.check): raises while the backlog is full.
        self._backlog_ok = backlog_ok
        # Whether Vault's audit device is known to journal issuances (rule 5): until then, issuance tokens.
        self._journal = journal
        # Active tasks as last read, for at most _TASK_CACHE_TTL: a store round trip fewer per credential.
        # Only the task's fixed fields are trusted from it; its state is checked again in the transaction
        # that records the intent, and by Vault, which refuses an ended task's token.
        self._task_cache: dict[str, tuple[float, TaskRow]] = {}
        # Agents and users a lock or a budget refused a moment ago ("agent:<id>", "user:<id>" -> until): their
        # next credentials are checked before the read as well.
        self._refusals: dict[str, float] = {}

    @property
    def journal(self) -> JournalMode | None:
        """Whether issuances may be journaled by Vault's audit device (None: not configured)."""
        return self._journal

    async def _task(self, task_id: str, now: float, *, fresh: bool = False) -> tuple[TaskRow | None, bool]:
        """The task, from the cache while its entry is young (and ``fresh`` is not asked): (row, cached)."""
        hit = None if fresh else self._task_cache.get(task_id)
        if hit is not None and now - hit[0] < _TASK_CACHE_TTL:
            return hit[1], True
        task = await self._store.get_task(task_id)
        if task is not None and task.state == TaskState.ACTIVE:
            if len(self._task_cache) >= _TASK_CACHE_MAX:
                self._task_cache = {k: v for k, v in self._task_cache.items() if now - v[0] < _TASK_CACHE_TTL}
                if len(self._task_cache) >= _TASK_CACHE_MAX:
                    self._task_cache.clear()
            self._task_cache[task_id] = (now, task)
        else:
            self._task_cache.pop(task_id, None)
        return task, False

    async def _denied(self, caller: AgentIdentity, task: TaskRow | None, task_id: str, resource: str,
                      action: str, exc: BrokerError) -> None:
        await self._store.append_audit(AuditRecord(
            self._clock(), "access.denied", "denied", user=task.user if task else None,
            user_name=task.user_name if task else None, agent=str(caller.spiffe_id),
            task=task_id, tenant=task.tenant if task else None, resource=resource, action=action, reason=exc.reason,
        ))

    async def issue(self, caller: AgentIdentity, task_id: str, grant_name: str, ttl: int | None,
                    approval_id: str | None = None, public_key: str | None = None) -> Issued | PendingApproval:
        """Obtain ``grant_name`` for the task's agent, recorded before it is returned.

        The credential is read with a fresh child of the task token (the issuance token), whose accessor
        the intent holds before Vault is asked for anything: whatever happens next, revoking that one
        accessor removes exactly what this issuance obtained.

        Raises:
            RateLimited: the agent or the user asks too often (before any other work).
            NotFound, NotTaskAgent, Gone, GrantNotInRole, ApprovalRequired, Locked, BudgetExceeded:
                recorded as ``access.denied``.
            VaultUnavailable, VaultError, StoreUnavailable: nothing was handed out.
            AuditBacklogFull: the audit export sinks are too far behind (503, before any other work).
        """
        if self._backlog_ok is not None:
            self._backlog_ok()
        if self._agent_rate is not None:
            self._agent_rate.take(str(caller.spiffe_id), what="agent")
        now = self._clock()
        task, cached = await self._task(task_id, now)
        try:
            if task is None:
                raise NotFound("no such task")
            grant = check_grant(self._catalog, view(task), caller, grant_name, now=now)
            if cached and grant.risk == "high":
                # An approval is asked for only on the task as it is now, not as it was a moment ago.
                task, _ = await self._task(task_id, now, fresh=True)
                if task is None:
                    raise NotFound("no such task")
                grant = check_grant(self._catalog, view(task), caller, grant_name, now=now)
            lease_ttl = cap_ttl(grant, view(task), ttl, now=now)
            # The only field an agent chooses (an SSH public key), parsed before any work (broker.engines rule 3).
            inputs = check_inputs(grant, public_key=public_key)
            approval: ApprovalRow | None = None
            if grant.risk == "high":
                if self._approvals is None:
                    raise ApprovalRequired("this grant needs an approval, and no approvers are configured",
                                           reason=f"high-risk grant {grant.name} without approvals")
                # The approval binds the TTL asked for; issuance may still cap it lower as the task runs out.
                asked = min(ttl or grant.max_ttl, grant.max_ttl)
                # An agent-chosen key is part of what is approved (its fingerprint is in the digest).
                chosen = inputs.key_fingerprint if inputs.params else None
                if approval_id is None:
                    return PendingApproval(await self._approvals.request(task, grant, ttl=asked,
                                                                         key_fingerprint=chosen))
                approval = await self._approvals.get(approval_id)
                self._approvals.check_for(approval, caller, task, grant, asked, key_fingerprint=chosen)
            if self._user_rate is not None:
                self._user_rate.take(task.user, what="user")
        except (NotFound, NotTaskAgent) as exc:
            # Don't let a stranger learn whose task an id is: record it without the task's people.
            await self._denied(caller, None, task_id, f"grant:{grant_name}", "issue", exc)
            raise
        except (Denied, Gone, BadRequest, RateLimited, Conflict) as exc:
            await self._denied(caller, task, task_id, f"grant:{grant_name}", "issue", exc)
            raise
        task_token = self._sealer.open(task.sealed_token, task_id=task.id)
        lease_id = new_lease_id()
        approval_ref = approval.id if approval else None
        if self._journal is not None and self._journal.covers(grant.path):
            return await self._issue_journaled(caller, task, grant, task_token, lease_id, lease_ttl, now, approval_ref,
                                               inputs)
        remaining = max(1, math.floor(task.expires_at - now))
        try:
            # Born to the task's end (rule 2): if the broker dies before the intent below holds its accessor,
            # nothing knows this token, but nothing is read with it either, and it dies with the task token.
            issuance = await self._vault.create_child_token(
                token=task_token, policies=[f"broker-task-{task.role}"], ttl=remaining, explicit_max_ttl=remaining,
                meta={"task": task.id, "lease": lease_id, "grant": grant.name}, display_name=f"issue-{grant.name}",
            )
        except (VaultDenied, VaultBadResponse) as exc:
            raise await self._gone_or(exc, caller, task, grant.path) from exc
        self._crash("issue.after_token")
        try:
            await self._store.begin_issuance(
                Intent(id=lease_id, kind="lease", task_id=task.id, grant=grant.name, accessor=issuance.accessor,
                       created_at=now),
                user=task.user, user_email=task.user_email, agent=task.agent, tenant=task.tenant, limits=self._limits,
                approval_id=approval_ref)
        except (Denied, Gone, RateLimited, Conflict) as exc:
            if isinstance(exc, Gone):
                self._task_cache.pop(task.id, None)
            await self._revoke_token(issuance.accessor)
            await self._denied(caller, task, task_id, f"grant:{grant_name}", "issue", exc)
            raise
        except BaseException:
            # The intent may have committed all the same (a cancelled call still finishes on the store's
            # thread): give it up if it is there, else just revoke the token no intent holds.
            await self._settler.abandon(lease_id, accessor=issuance.accessor)
            raise
        self._crash("issue.after_intent")
        secret: VaultSecret | None = None
        try:
            # Only now that the intent holds its accessor is anything read with the issuance token.
            secret = await self._vault.read_credential(
                grant.path, token=issuance.client_token, method=grant.method,
                data=self._params(grant, task, lease_ttl, inputs),
            )
            self._crash("issue.after_vault")
            return await self._record(caller, task, grant, secret, lease_id, lease_ttl, issuance.client_token,
                                      approval_ref, inputs, issuance_accessor=issuance.accessor)
        except BaseException as exc:
            # Ambiguous or failed: whatever Vault may have issued dies with the issuance token, and what its
            # answer named is revoked by that name too (rule 6). The intent stays retryable until Vault
            # confirms both (a partition makes this first revoke fail too).
            await self._settler.abandon(lease_id, accessor=issuance.accessor, vault_ref=_ref_of(secret))
            if isinstance(exc, VaultDenied | VaultBadResponse):
                raise await self._gone_or(exc, caller, task, grant.path) from exc
            raise

    @staticmethod
    def _params(grant: Grant, task: TaskRow, lease_ttl: int, inputs: AgentInputs) -> dict[str, object] | None:
        if grant.method != "POST":
            return None
        return grant.request_params(task=task.id, agent=task.agent, user=task.user_name or task.user,
                                    user_id=task.user, user_email=task.user_email, tenant=task.tenant,
                                    role=task.role, ttl=lease_ttl, inputs=inputs.params)

    async def _issue_journaled(self, caller: AgentIdentity, task: TaskRow, grant: Grant, task_token: Sensitive,
                               lease_id: str, lease_ttl: int, now: float, approval_id: str | None,
                               inputs: AgentInputs) -> Issued:
        """One Vault request: the read, with the task token, its intent's id in Vault's audit log (rule 5).

        Then one store transaction writes the intent, the lease and its record (broker.journal rule 8). A
        high-risk grant still spends its approval in an intent written before the read: the one credential
        it unlocks is never read twice, even by two requests that race for it.
        """
        intent = Intent(id=lease_id, kind="lease", task_id=task.id, grant=grant.name, accessor=None, created_at=now,
                        journaled=True)
        if approval_id is not None:
            return await self._issue_approved(caller, task, grant, task_token, intent, lease_ttl, approval_id, inputs)
        if self._refused_lately(task, now):
            # Refused a moment ago (a lock, a budget): check again before Vault makes a credential for nothing.
            try:
                await self._store.check_issuance(user=task.user, user_email=task.user_email, agent=task.agent,
                                                 tenant=task.tenant, limits=self._limits)
            except (Locked, BudgetExceeded) as exc:
                self._refuse(task, now)
                await self._denied(caller, task, task.id, f"grant:{grant.name}", "issue", exc)
                raise
        secret: VaultSecret | None = None
        try:
            secret = await self._vault.read_credential(grant.path, token=task_token, method=grant.method,
                                                       data=self._params(grant, task, lease_ttl, inputs),
                                                       intent=lease_id)
            self._crash("issue.after_vault")
            return await self._record(caller, task, grant, secret, lease_id, lease_ttl, task_token, None, inputs,
                                      intent=intent)
        except BaseException as exc:
            # Nothing was recorded: the intent is written given up, and what Vault made is revoked, by what
            # its answer named or what the journal finds. If even that write fails, the journal's orphan
            # sweep finds the answer (broker.journal rule 8).
            await self._settler.give_up(intent, vault_ref=_ref_of(secret))
            if isinstance(exc, Locked | BudgetExceeded):
                self._refuse(task, now)
                await self._denied(caller, task, task.id, f"grant:{grant.name}", "issue", exc)
            if isinstance(exc, VaultDenied | VaultBadResponse):
                raise await self._gone_or(exc, caller, task, grant.path) from exc
            raise

    def _refused_lately(self, task: TaskRow, now: float) -> bool:
        if not self._refusals:  # the usual case: no string is built on the hot path
            return False
        return any(self._refusals.get(k, 0.0) > now for k in (f"agent:{task.agent}", f"user:{task.user}"))

    def _refuse(self, task: TaskRow, now: float) -> None:
        # Both keys: a refusal does not say whose budget or lock it was, and a needless check costs one read.
        if len(self._refusals) >= _TASK_CACHE_MAX:
            self._refusals = {k: v for k, v in self._refusals.items() if v > now}
            if len(self._refusals) >= _TASK_CACHE_MAX:
                self._refusals.clear()
        until = now + _REFUSAL_MEMORY
        self._refusals[f"agent:{task.agent}"] = self._refusals[f"user:{task.user}"] = until

    async def _issue_approved(self, caller: AgentIdentity, task: TaskRow, grant: Grant, task_token: Sensitive,
                              intent: Intent, lease_ttl: int, approval_id: str, inputs: AgentInputs) -> Issued:
        """A journaled issuance whose intent, spending its approval, commits before the read."""
        try:
            await self._store.begin_issuance(intent, user=task.user, user_email=task.user_email, agent=task.agent,
                                             tenant=task.tenant, limits=self._limits, approval_id=approval_id)
        except (Denied, Gone, RateLimited, Conflict) as exc:
            # Nothing was asked of Vault yet: nothing to undo.
            if isinstance(exc, Gone):
                self._task_cache.pop(task.id, None)
            await self._denied(caller, task, task.id, f"grant:{grant.name}", "issue", exc)
            raise
        except BaseException:
            await self._settler.abandon(intent.id, accessor=None)
            raise
        self._crash("issue.after_intent")
        secret: VaultSecret | None = None
        try:
            secret = await self._vault.read_credential(grant.path, token=task_token, method=grant.method,
                                                       data=self._params(grant, task, lease_ttl, inputs),
                                                       intent=intent.id)
            self._crash("issue.after_vault")
            return await self._record(caller, task, grant, secret, intent.id, lease_ttl, task_token, approval_id,
                                      inputs)
        except BaseException as exc:
            # The journal finds what Vault issued when no answer came; an answer names it itself.
            await self._settler.abandon(intent.id, accessor=None, vault_ref=_ref_of(secret))
            if isinstance(exc, VaultDenied | VaultBadResponse):
                raise await self._gone_or(exc, caller, task, grant.path) from exc
            raise

    async def _gone_or(self, exc: BrokerError, caller: AgentIdentity, task: TaskRow, resource: str) -> BrokerError:
        """Vault refusing the task token (403, or 400 "parent token not found") is the task ending under us."""
        fresh, _ = await self._task(task.id, self._clock(), fresh=True)
        if fresh is None or fresh.state != TaskState.ACTIVE:
            gone = Gone("the task is no longer active", reason=f"task {task.id} ended during issuance")
            await self._denied(caller, task, task.id, resource, "issue", gone)
            return gone
        return exc

    async def _record(self, caller: AgentIdentity, task: TaskRow, grant: Grant, secret: VaultSecret, lease_id: str,
                      lease_ttl: int, token: Sensitive, approval_id: str | None, inputs: AgentInputs, *,
                      issuance_accessor: str | None = None, intent: Intent | None = None) -> Issued:
        """Record what Vault issued with its ``lease.issued`` record; ``intent``: the journaled issuance whose
        intent this same transaction writes (broker.journal rule 8), instead of completing one written before."""
        now = self._clock()
        # The grant's engine adapter reads the answer (broker.engines): raises VaultBadResponse if unusable.
        got = grant.engine.read(secret, grant.path, now)
        kind, vault_id, renewable, data = got.kind, got.vault_id, got.renewable, got.data
        # A value Vault gives no lifetime (KV) is tracked to its task's end, when the end releases it: never
        # a lease the expiry sweep would have to look at again and again.
        duration = max(1, math.floor(task.expires_at - now)) if got.duration is None else got.duration
        if duration > lease_ttl and renewable:
            # Some engines (database/creds) take no TTL on read: shorten the lease to the cap.
            info = await self._vault.renew_lease(vault_id, increment=lease_ttl, token=token)
            duration = info.ttl
        lease = LeaseRow(
            id=lease_id, task_id=task.id, grant=grant.name, path=grant.path, kind=kind, vault_lease_id=vault_id,
            issued_at=now, expires_at=min(now + duration, task.expires_at), renewable=renewable,
            state=LeaseState.ACTIVE.value, revoked_at=None, issuance_accessor=issuance_accessor,
        )
        record = AuditRecord.for_task(task, now, "lease.issued", "success", resource=grant.path, action="issue",
                                      lease=lease.id, vault_request_id=secret.request_id,
                                      revocation=grant.revocation, key_fingerprint=inputs.key_fingerprint,
                                      reason=f"grant {grant.name}, ttl {lease_ttl}s"
                                             + (f", unlocked by approval {approval_id}" if approval_id else ""))
        if intent is not None:
            recorded = await self._store.record_issuance(
                intent, lease, record, user=task.user, user_email=task.user_email, agent=task.agent,
                tenant=task.tenant, limits=self._limits)
        else:
            recorded = await self._store.complete_issuance(lease, record)
        fresh = (await self._task(task.id, now, fresh=True))[0] if not recorded and intent is not None else None
        if fresh is not None and fresh.state == TaskState.ACTIVE:
            # The task is still active: the orphan sweep claimed this intent's id first (broker.journal rule 8).
            raise StoreUnavailable("the credential could not be recorded; retry",
                                   reason=f"intent {lease_id} was claimed by the journal's orphan sweep")
        if not recorded:
            self._task_cache.pop(task.id, None)
            gone = Gone("the task is no longer active", reason=f"task {task.id} ended during issuance")
            await self._denied(caller, task, task.id, grant.path, "issue", gone)
            raise gone
        self._crash("issue.after_record")
        return Issued(lease, data)

    async def _revoke_token(self, accessor: str) -> None:
        """Revoke an issuance token that no intent holds (its intent could not be written): best effort.

        Nothing was read with it, and it dies with its task token anyway (rule 2).
        """
        try:
            await asyncio.shield(self._vault.revoke_accessor(accessor))
        except Exception:  # noqa: BLE001 -- the reconciler and the task token's end still get it
            log.warning("could not revoke an issuance token now; it dies with its task token")

    async def renew(self, caller: AgentIdentity, lease_id: str, increment: int | None) -> LeaseRow:
        """Extend a lease, never past its grant's max TTL from now nor its task's end.

        Raises:
            RateLimited: the agent renews faster than ``limits.renew_rate_per_agent``.
            NotFound: no such lease, or not the caller's (one answer for both).
            Gone: the task ended. Conflict: the lease is not active or not renewable.
        """
        if self._renew_rate is not None:
            self._renew_rate.take(str(caller.spiffe_id), what="agent")
        now = self._clock()
        lease = await self._store.get_lease(lease_id)
        task = await self._store.get_task(lease.task_id) if lease else None
        if lease is None or task is None or task.agent != str(caller.spiffe_id):
            raise NotFound("no such lease")
        grant = check_grant(self._catalog, view(task), caller, lease.grant, now=now)
        try:
            LEASES.next_state(LeaseState(lease.state), LeaseEvent.RENEWED)
        except TransitionError as exc:
            msg = f"the lease is {lease.state}"
            raise Conflict(msg) from exc
        if not lease.renewable:
            raise Conflict("this credential cannot be renewed; request a new one")
        ttl = cap_ttl(grant, view(task), increment, now=now)
        token = self._sealer.open(task.sealed_token, task_id=task.id)
        # The task token may renew any lease of its own tree; the lease's own child token holds the same policy.
        info = await self._vault.renew_lease(lease.vault_lease_id, increment=ttl, token=token)
        expires_at = min(now + info.ttl, task.expires_at)
        record = AuditRecord.for_task(task, now, "lease.renewed", "success", resource=lease.path, action="renew",
                                      lease=lease.id, reason=f"ttl {info.ttl}s")
        await self._store.renew_lease(lease.id, expires_at=expires_at, record=record)
        return LeaseRow(**{**lease.__dict__, "expires_at": expires_at})
