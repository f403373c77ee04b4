"""Revocation that Vault confirms, operator revocations and locks, and the maintenance loop.

Rules this file keeps:
1. A task is fenced in the store first (it leaves ``active``; its token and leases become
   ``revoke_pending``); only then is its token revoked by accessor. Nothing new commits after the fence.
2. "Revoked" means Vault confirmed it: the task token's accessor no longer resolves and every lease
   (or child token) it held is gone. Until then the lease stays ``revoke_pending`` and is retried with
   exponential backoff and jitter, by the maintenance loop, without an operator.
3. A revocation by user, agent or tenant is also a lock, written in the same transaction as the fence,
   that every later task start and issuance checks in the transaction that records its intent.
4. An intent the broker gives up on (a failed or ambiguous Vault call in a task start or an issuance,
   or one still open after a crash) is marked ``aborting`` first, so a slow issuance can no longer
   complete it; then its token is revoked, and it is ``aborted`` only when Vault confirms the token is
   gone (``IntentSettler``; the state table is ``broker.intents``). What Vault issued under it dies with
   that token. A cleanup Vault does not confirm (a partition, a sealed Vault) leaves it ``aborting``,
   retried with backoff by the maintenance loop until Vault confirms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from broker import journal
from broker.audit import AuditRecord
from broker.audit.vaultlog import parse_time
from broker.engines import engine_for_kind
from broker.errors import (
    AuditLineInvalid,
    BadRequest,
    NotFound,
    StoreUnavailable,
    VaultBadResponse,
    VaultDenied,
    VaultError,
    VaultUnavailable,
)
from broker.identity import UserIdentity, is_person_id, normalize_email
from broker.intents import FINAL, SETTLED_RETENTION, IntentEvent, IntentState, backoff
from broker.journal import JournalMode
from broker.states import LeaseEvent, LeaseState, TaskEvent, TaskState, TokenState
from broker.store import Intent, JournalEntry, LeaseRow, RevocationRow, Store, TaskRow
from broker.store.tasks import FENCE_CLAIM
from broker.vault import VaultClient

if TYPE_CHECKING:
    from broker.audit.checkpoints import Checkpointer

log = logging.getLogger(__name__)

Selector = Literal["user", "agent", "task", "tenant"]
_LOCKING: frozenset[str] = frozenset({"user", "agent", "tenant"})
# Leases a task's revocation must still see gone in Vault.
_UNSETTLED = (LeaseState.REVOKE_PENDING, LeaseState.ACTIVE)
_FORGET_EVERY = 60.0  # seconds between two passes that forget settled intents
_DUE_PER_TICK = 500  # task revocations one maintenance tick settles


@dataclass(frozen=True)
class Settled:
    """What one settling round achieved: leases Vault confirmed gone, leases still pending, and tasks whose
    revocation Vault did not answer at all (``failed``: down, sealed, unreachable) as opposed to answered
    but not yet finished (only ``pending``)."""

    revoked: int
    pending: int
    failed: int = 0


class Revoker:
    """Revokes fenced tasks' tokens in Vault and records only what Vault confirms."""

    def __init__(self, *, store: Store, vault: VaultClient, clock: Callable[[], float],
                 confirm_timeout: float = 5.0, max_backoff: float = 60.0, concurrency: int = 16) -> None:
        self._store = store
        self._vault = vault
        self._clock = clock
        self._confirm_timeout = confirm_timeout
        self._max_backoff = max_backoff
        self._slots = asyncio.Semaphore(concurrency)
        # Revocations and confirmation lookups are bounded broker-wide: a flood of them slows Vault itself.
        self._lookups = asyncio.Semaphore(32)

    async def settle(self, tasks: Sequence[TaskRow], *, timeout: float | None = None) -> Settled:
        """Revoke and confirm each task; a task Vault does not confirm in time is retried later."""
        results = await asyncio.gather(*(self._one(t, timeout or self._confirm_timeout) for t in tasks))
        return Settled(revoked=sum(r.revoked for r in results), pending=sum(r.pending for r in results),
                       failed=sum(r.failed for r in results))

    async def _one(self, task: TaskRow, timeout: float) -> Settled:
        async with self._slots:
            found = await self._store.list_leases(task_id=task.id, states=_UNSETTLED)
            # Only what Vault can revoke is waited for; the rest (broker.engines) is released, never "revoked".
            leases = [x for x in found if engine_for_kind(x.kind).revocation == "revocable"]
            kept = [x for x in found if engine_for_kind(x.kind).revocation != "revocable"]
            failed = 0
            try:
                # The token first: it answers at once, and its tree takes the agent's child tokens and
                # anything issued since the list was read. Then each Vault lease by id, confirmed by Vault's own
                # answer (``sys/leases/revoke`` is synchronous: when it answers, the lease is gone) instead of
                # polling lookups while Vault's expiration manager works through the tree. Only tokens, and
                # leases whose revoke did not finish in time, are polled.
                await self._revoke_token(task, task.token_accessor)
                if task.revoke_attempts > 0:
                    # A retry: the token's tree did not take everything last time. A revocation cut short
                    # (the active node killed while it ran) can leave the task token tainted and some of
                    # its child tokens out of any tree Vault still walks, alive until their TTL. Each child
                    # token is revoked by its own accessor too (an unknown accessor answers 200).
                    await asyncio.gather(*(self._revoke_child(task, x) for x in leases if x.kind == "token"))
                others = [x for x in leases if x.kind != "token"]
                answers = await asyncio.gather(*(self._revoke_one(x, timeout) for x in others))
                refused = [why for ok, why in answers if why is not None]
                if refused:
                    # One line per attempt, not one per lease: a database that cannot drop its logins refuses
                    # every lease of the task, on every retry.
                    log.warning("revoking task %s: Vault refused %d of %d lease revocations (%s); confirming by "
                                "lookup", task.id, len(refused), len(others), refused[0])
                polled = [x for x in leases if x.kind == "token"] + [
                    x for x, (ok, _) in zip(others, answers, strict=True) if not ok]
                confirmed = await self._confirm(task, polled, timeout)
            except VaultError as exc:
                log.warning("revoking task %s: Vault did not answer (%s: %s); will retry", task.id, exc.code,
                            exc.reason)
                confirmed, failed = False, 1
            now = self._clock()
            if not confirmed:
                attempts = task.revoke_attempts + 1
                # From 1-2 s after the first failure, doubling, up to maintenance.max_backoff.
                delay = backoff(attempts + 1, cap=self._max_backoff)
                await self._store.retry_later(task.id, attempts=attempts, next_attempt_at=now + delay)
                return Settled(0, len(leases), failed)
            expired = task.state == TaskState.EXPIRED
            records = [
                AuditRecord.for_task(task, now, "lease.expired" if expired else "lease.revoked", "success",
                                     resource=lease.path, action="expire" if expired else "revoke", lease=lease.id,
                                     reason=f"task {task.state}; confirmed gone in Vault")
                for lease in leases
            ] + [_released(task, lease, now) for lease in kept]
            event = LeaseEvent.VAULT_EXPIRED if expired else LeaseEvent.VAULT_REVOKED
            if not await self._store.confirm_revoked(task.id, lease_ids=[x.id for x in leases], lease_event=event,
                                                     now=now, records=records, released_ids=[x.id for x in kept]):
                return Settled(0, 0)  # another settler confirmed it (and recorded it) first
            return Settled(len(leases), 0)

    async def _confirm(self, task: TaskRow, leases: list[LeaseRow], timeout: float) -> bool:
        """Poll until the task token and every lease are gone (revoke-accessor answers before they are)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        remaining = list(leases)
        token_gone = False
        delay = 0.02
        while True:
            try:
                if not token_gone:
                    token_gone = await self._vault.lookup_accessor(task.token_accessor) is None
                if token_gone and remaining:
                    alive = await asyncio.gather(*(self._bounded_alive(x) for x in remaining))
                    remaining = [x for x, a in zip(remaining, alive, strict=True) if a]
            except VaultDenied:
                # A token Vault is still revoking answers 403 (it is tainted): not gone yet, look again.
                pass
            if token_gone and not remaining:
                return True
            if loop.time() + delay > deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)


    async def _revoke_one(self, lease: LeaseRow, timeout: float) -> tuple[bool, str | None]:
        """Revoke one Vault lease: (done, Vault's reason if it refused). Not done when it is not done within
        ``timeout`` (Vault is busy revoking it: a database that holds the role's locks, say), when the
        broker's policy does not cover its path (a grant since removed from the catalog), or when Vault
        refused. Either way the token's tree takes it, and a lookup confirms that.

        Raises: VaultError when Vault did not answer at all (the task is retried; revoking twice is harmless).
        """
        async with self._lookups:
            try:
                await asyncio.wait_for(self._vault.revoke_lease(lease.vault_lease_id), timeout=timeout)
            except (VaultDenied, TimeoutError):
                return False, None
            except VaultBadResponse as exc:
                # Vault answered, and refused: a revocation its backend failed (a database that cannot drop
                # the login), a lease it is revoking already. The lookup decides, and the task stays pending.
                return False, exc.reason
            except VaultUnavailable as exc:
                if isinstance(exc.__cause__, TimeoutError):
                    return False, None  # it answered nothing in time, but it is up: pending, not down
                raise
            return True, None

    async def _revoke_token(self, task: TaskRow, accessor: str) -> None:
        """Revoke a token by accessor. Its answer proves nothing either way (200 for an unknown accessor,
        and it answers before the leases go), so a refusal (a token Vault is still revoking, tainted, may
        answer 400) only goes to the log: the lookups that follow decide. Raises VaultUnavailable."""
        try:
            await self._vault.revoke_accessor(accessor)
        except (VaultDenied, VaultBadResponse) as exc:
            log.warning("revoking task %s: Vault refused the revocation of a token (%s); confirming by lookup",
                        task.id, exc.reason)

    async def _revoke_child(self, task: TaskRow, lease: LeaseRow) -> None:
        async with self._lookups:
            await self._revoke_token(task, lease.vault_lease_id)

    async def _bounded_alive(self, lease: LeaseRow) -> bool:
        async with self._lookups:
            return await _alive(self._vault, lease, self._clock())


async def _alive(vault: VaultClient, lease: LeaseRow, now: float) -> bool:
    """Whether the credential still lives, asked the way its engine's adapter says (broker.engines)."""
    confirm = engine_for_kind(lease.kind).confirm
    if confirm == "accessor":
        return await vault.lookup_accessor(lease.vault_lease_id) is not None
    if confirm == "lease":
        return await vault.lookup_lease(lease.vault_lease_id) is not None
    if confirm == "expiry":
        return now < lease.expires_at
    # A static value lives until someone rotates it: only its task's end lets go of it (its lease row's
    # expiry is that end, so the expiry sweep never holds it past the task's fence).
    return True


def _released(task: TaskRow, lease: LeaseRow, now: float) -> AuditRecord:
    """The record of a credential its task's end cannot revoke: said as it is (TH-29)."""
    revocation = engine_for_kind(lease.kind).revocation
    lives = ("it stays valid until rotated" if revocation == "static"
             else f"it stays valid until it expires ({max(0, round(lease.expires_at - now))}s from now)")
    return AuditRecord.for_task(task, now, "lease.released", "success", resource=lease.path, action="release",
                                lease=lease.id, revocation=revocation,
                                reason=f"task {task.state}; {revocation}: cannot be revoked, {lives}")


class IntentSettler:
    """Cleans up intents the broker gave up on; calls one ``aborted`` only when Vault confirms its token is gone.

    Used by the request paths (a task start or an issuance that failed after Vault may have created
    something) and by the maintenance loop (intents left open by a crash, or whose cleanup failed).
    Neither a store nor a Vault failure escapes: what cannot be confirmed now stays ``aborting`` (or
    ``open``, if even the store is down) and is retried.
    """

    def __init__(self, *, store: Store, vault: VaultClient, clock: Callable[[], float], bootstrap_ttl: float,
                 vault_timeout: float, attempt_timeout: float = 5.0, max_backoff: float = 60.0,
                 concurrency: int = 16, journal: JournalMode | None = None) -> None:
        self._store = store
        self._vault = vault
        self._clock = clock
        self._journal = journal
        self._bootstrap_ttl = bootstrap_ttl
        self._vault_timeout = vault_timeout
        self._attempt_timeout = attempt_timeout
        self._max_backoff = max_backoff
        self._slots = asyncio.Semaphore(concurrency)
        # search_failed_reads: per path, when its next search is due and how many failed in a row.
        self._search_backoff: dict[str, tuple[float, int]] = {}
        self._next_search_probe = 0.0

    def _unknown_token_expiry(self, now: float) -> float:
        """When a token created by a call still in flight at ``now`` has died at its bootstrap TTL (rule 4
        of broker.intents): the call reaches Vault within one Vault timeout, the token lives its TTL."""
        return now + self._vault_timeout + self._bootstrap_ttl + 1.0

    async def abandon(self, intent_id: str, *, accessor: str | None,
                      vault_ref: tuple[str, str] | None = None) -> None:
        """A request path gives up on an open intent: fence it (``aborting``), then try the cleanup once now.

        ``accessor`` is the token to revoke when the intent does not hold it yet (a task start that
        created its token but could not record the task). ``vault_ref`` is what Vault's answer to a
        journaled issuance named (kind, id), when the broker got the answer but could not record it.
        Shielded: a cancelled request still cleans up.
        """
        await asyncio.shield(self._abandon(intent_id, accessor, vault_ref))

    async def give_up(self, intent: Intent, *, vault_ref: tuple[str, str] | None = None) -> None:
        """A journaled issuance that recorded nothing (broker.journal rule 8): write its intent ``aborting``,
        then try the cleanup once now. Shielded, like ``abandon``.

        Unless the orphan sweep claimed the id first, the intent is written here; when the store cannot
        take it, the sweep later finds Vault's answer in the journal, if Vault made anything.
        """
        await asyncio.shield(self._give_up(intent, vault_ref))

    async def _give_up(self, intent: Intent, vault_ref: tuple[str, str] | None) -> None:
        hold = self._clock() + self._attempt_timeout + 1.0  # the reconciler waits while this attempt runs
        try:
            await self._store.give_up_issuance(intent, retry_at=hold, vault_ref=vault_ref)
        except StoreUnavailable:
            log.warning("intent %s: could not record that the issuance was given up; the journal's orphan sweep "
                        "revokes what Vault made", intent.id)
            return
        await self._abandon(intent.id, None, vault_ref)

    async def _abandon(self, intent_id: str, accessor: str | None, vault_ref: tuple[str, str] | None = None) -> None:
        now = self._clock()
        try:
            intent = await self._store.get_intent(intent_id)
            if intent is None:
                if accessor is not None:  # no intent holds this token: best effort, it dies at its bootstrap TTL
                    await self._revoke_confirmed_within(accessor)
                return
            if intent.state in FINAL:
                return  # done: recorded, nothing to undo; aborted: Vault confirmed already
            token = intent.accessor or accessor
            # The reconciler leaves it alone while this attempt runs, and takes over if this process dies.
            hold = (now + self._attempt_timeout + 1.0 if token or intent.journaled
                    else self._unknown_token_expiry(now))
            if intent.state == IntentState.OPEN:
                if not await self._store.move_intent(intent_id, from_state=IntentState.OPEN,
                                                     event=IntentEvent.ABANDONED, now=now, accessor=accessor,
                                                     next_attempt_at=hold, vault_ref=vault_ref):
                    intent = await self._store.get_intent(intent_id)
                    if intent is None or intent.state in FINAL:
                        return
            elif intent.accessor is None and accessor is not None:
                # The reconciler fenced this start before the start learned its token: hand it the accessor.
                await self._store.move_intent(intent_id, from_state=IntentState.ABORTING,
                                              event=IntentEvent.CLEANUP_FAILED, now=now, accessor=accessor,
                                              attempts=intent.attempts, next_attempt_at=hold)
            intent = replace(intent, state=IntentState.ABORTING, accessor=token, next_attempt_at=hold)
            if vault_ref is not None and intent.vault_ref is None:
                intent = replace(intent, vault_ref_kind=vault_ref[0], vault_ref=vault_ref[1])
        except StoreUnavailable:
            # The store is down too: revoke now if Vault answers. The intent stays open; the reconciler
            # resolves it after its grace, and revoking an accessor twice is harmless.
            if accessor is not None:
                await self._revoke_confirmed_within(accessor)
            return
        await self.attempt(intent)

    async def reconcile(self, intent: Intent) -> bool:
        """The maintenance loop's turn at one due intent: fence it if it is still open, then one cleanup attempt.

        Returns True when it reached ``aborted``.
        """
        now = self._clock()
        if intent.state == IntentState.OPEN:
            hold = now if intent.accessor or intent.journaled else self._unknown_token_expiry(now)
            try:
                if not await self._store.move_intent(intent.id, from_state=IntentState.OPEN,
                                                     event=IntentEvent.ABANDONED, now=now, next_attempt_at=hold):
                    return False  # completed (or taken) meanwhile
            except StoreUnavailable:
                return False
            intent = replace(intent, state=IntentState.ABORTING, next_attempt_at=hold)
        return await self.attempt(intent)

    async def attempt(self, intent: Intent) -> bool:
        """One cleanup of an ``aborting`` intent: revoke its token and wait (bounded) for Vault to confirm.

        Confirmed: ``aborted``, with its record. Not confirmed: still ``aborting``, one attempt more, the
        next one after ``backoff``. Returns True when it reached ``aborted``; never raises a store or
        Vault error.
        """
        async with self._slots:
            now = self._clock()
            if intent.journaled:
                return await self._attempt_journaled(intent, now)
            if intent.accessor is None:
                # Nothing to look up (rule 4): final once its token, if any, is past its bootstrap TTL.
                if intent.next_attempt_at is not None and intent.next_attempt_at > now:
                    return False
                return await self._finish(intent, IntentEvent.BOOTSTRAP_ELAPSED, now)
            confirmed = await self._revoke_confirmed_within(intent.accessor)
            why = None
            if confirmed and intent.vault_ref is not None:
                # An answer came back and named what Vault created: revoking the token does not reach a
                # lease the read registered after its token was revoked (broker.leases rule 6).
                confirmed = await self._revoke_ref_confirmed_within(intent.vault_ref_kind, intent.vault_ref)
                why = "Vault confirmed that its token and what its answer named are gone"
            now = self._clock()
            if confirmed:
                return await self._finish(intent, IntentEvent.VAULT_CONFIRMED, now, why=why)
            attempts = intent.attempts + 1
            delay = backoff(attempts, cap=self._max_backoff)
            log.warning("intent %s: Vault has not confirmed that its token is gone (attempt %d); retry in %.1fs",
                        intent.id, attempts, delay)
            with contextlib.suppress(StoreUnavailable):  # it stays due: the next tick tries again
                await self._store.move_intent(intent.id, from_state=IntentState.ABORTING,
                                              event=IntentEvent.CLEANUP_FAILED, now=now, attempts=attempts,
                                              next_attempt_at=now + delay)
            return False

    async def _attempt_journaled(self, intent: Intent, now: float) -> bool:
        """One cleanup of a journaled issuance: what the journal says Vault issued (broker.journal)."""
        try:
            entries = [] if intent.vault_ref else await self._store.journal_for(intent.id)
            read_until = None if intent.vault_ref else await self._store.journal_read_until()
        except StoreUnavailable:
            return False
        decision = journal.decide(intent, entries, read_until=read_until, now=now, vault_timeout=self._vault_timeout)
        if decision.action == "nothing":
            return await self._finish(intent, IntentEvent.VAULT_CONFIRMED, now, why=decision.reason)
        if decision.action == "task_bound":
            log.warning("intent %s: %s", intent.id, decision.reason)
            return await self._finish(intent, IntentEvent.TASK_BOUND, now, why=decision.reason)
        if decision.action == "search" and decision.ref is not None and decision.since is not None \
                and decision.until is not None:
            left = await self._revoke_leftovers(decision.ref, [(decision.since, decision.until)])
            if left is not None:
                if left:
                    log.warning("intent %s: %s; found and revoked %s", intent.id, decision.reason, ", ".join(left))
                found = (f"found {len(left)} under {decision.ref}, revoked, and Vault confirmed it is gone" if left
                         else f"Vault lists none under {decision.ref} from that moment")
                return await self._finish(intent, IntentEvent.VAULT_CONFIRMED, self._clock(),
                                          why=f"{decision.reason}; {found}", vault_path=decision.ref)
            attempts = intent.attempts + 1
            delay = backoff(attempts, cap=self._max_backoff)
        elif decision.action == "revoke" and decision.ref is not None:
            confirmed = await self._revoke_ref_confirmed_within(decision.ref_kind, decision.ref)
            if confirmed:
                with contextlib.suppress(StoreUnavailable):  # else the late-answer sweep revokes it once more
                    await self._store.journal_swept(intent.id)
                where = decision.ref.rpartition("/")[0] if decision.ref_kind == "lease" else None
                return await self._finish(intent, IntentEvent.VAULT_CONFIRMED, self._clock(),
                                          why=f"{decision.reason}; revoked, and Vault confirmed it is gone",
                                          vault_path=where or None)
            attempts = intent.attempts + 1
            delay = backoff(attempts, cap=self._max_backoff)
        else:
            # Waiting for the log: soon, and nudge it when Vault may be idle (nothing else writes entries).
            if decision.probe:
                await self._probe()
            attempts, delay = intent.attempts, 1.0
        with contextlib.suppress(StoreUnavailable):
            await self._store.move_intent(intent.id, from_state=IntentState.ABORTING,
                                          event=IntentEvent.CLEANUP_FAILED, now=self._clock(), attempts=attempts,
                                          next_attempt_at=self._clock() + delay)
        return False

    async def _revoke_leftovers(self, path: str, windows: Sequence[tuple[float, float]]) -> list[str] | None:
        """Revoke the leases Vault lists under ``path``, issued in one of ``windows`` ([since, until], Vault's
        clock, a second's slack), that neither the store nor the journal names (broker.journal rule 9). The
        revoked ids, or None when Vault or the store did not answer (the next attempt searches again).

        One listing for every window: a burst of failed reads on one path (Vault timing out under load)
        costs one LIST, not one each."""
        since = min(w[0] for w in windows) - 1.0
        try:
            unnamed = await self._store.unnamed_vault_leases(await self._vault.list_leases(path), since=since)
            left = []
            for lease_id in unnamed:
                info = await self._vault.lookup_lease(lease_id)
                if info is None or info.issue_time is None:
                    continue
                issued = parse_time(info.issue_time)
                if any(a - 1.0 <= issued <= b + 1.0 for a, b in windows):
                    left.append(lease_id)
        except VaultDenied:
            log.error("cannot list the leases under %s: the broker's policy needs list and sudo on "
                      "sys/leases/lookup/%s/ (run `broker vault sync`)", path, path)
            return None
        except (VaultError, StoreUnavailable, AuditLineInvalid):
            return None
        for lease_id in left:
            if await self._revoke_lease_confirmed_within(lease_id):
                continue
            # Its backend object may never have been made (the read failed: a database role that does not
            # exist makes every revocation fail). Nobody ever received it: Vault drops the lease as it is.
            log.warning("lease %s, left by a read Vault's backend failed, cannot be revoked; force-revoking it",
                        lease_id)
            try:
                await self._vault.force_revoke_lease(lease_id)
                if await self._vault.lookup_lease(lease_id) is not None:
                    return None
            except VaultError:
                return None
        return left

    async def sweep_late_answers(self) -> int:
        """Revoke what Vault created for journaled intents already given up on (broker.journal rule 6).

        Returns how many were revoked and confirmed gone. Never raises a store or Vault error.
        """
        try:
            late = await self._store.journal_unswept()
        except StoreUnavailable:
            return 0
        swept = 0
        for entry in late:
            if entry.lease_id:
                gone = await self._revoke_lease_confirmed_within(entry.lease_id)
            elif entry.accessor and not journal.hmacd(entry.accessor):
                gone = await self._revoke_confirmed_within(entry.accessor)
            else:
                gone = True  # a token the log names only by its HMAC: it dies with its task (rule 3)
            if not gone:
                continue  # the next tick tries again
            log.warning("intent %s: Vault answered after the broker gave up on it (request %s); revoked what it "
                        "created", entry.intent_id, entry.request_id)
            try:
                await self._store.journal_swept(entry.intent_id)
            except StoreUnavailable:
                return swept
            swept += 1
        return swept

    async def search_failed_reads(self) -> int:
        """Revoke what reads made with an issuance token may have left behind a backend error (broker.journal
        rule 9): revoking that token, which aborted their intent, does not reach a lease whose index under it
        Vault failed to write.

        Each is searched once the journal is read past its answer (a probe, at most one per margin, moves
        the journal when nothing else does), from its intent's creation, which precedes the read (less the
        margin the two clocks get, and never more than Vault's own request limit before the answer), to its
        answer; those of one path share one listing. A path whose search Vault does not answer (a refused
        listing, a leftover that will not go) backs off, so it neither retries every tick nor delays the
        others. Nothing is searched while the journal is not known to work (``JournalMode``): its mark is
        what says every answer that could name a lease has been read. Returns how many such answers were
        searched to the end. Never raises a store or Vault error.
        """
        if self._journal is None or not self._journal.ready:
            return 0
        now = self._clock()
        waiting = [path for path, (due_at, _) in self._search_backoff.items() if due_at > now]
        try:
            due = await self._store.journal_unsearched(skip_paths=waiting)
            read_until = await self._store.journal_read_until() if due else None
        except StoreUnavailable:
            return 0
        by_path: dict[str, list[tuple[JournalEntry, tuple[float, float]]]] = {}
        probe = False
        for entry, created_at in due:
            if entry.path is None:
                continue
            if read_until is None or read_until <= entry.at + journal.MARGIN:
                probe = probe or now > entry.at + journal.MARGIN
                continue
            by_path.setdefault(entry.path, []).append((entry, journal.failed_read_window(created_at, entry.at)))
        searched = 0
        for path, found in by_path.items():
            left = await self._revoke_leftovers(path, [w for _, w in found])
            if left is None:
                failures = self._search_backoff.get(path, (0.0, 0))[1] + 1
                self._search_backoff[path] = (self._clock() + backoff(failures, cap=self._max_backoff), failures)
                continue
            self._search_backoff.pop(path, None)
            if left:
                log.warning("Vault's backend failed %d read(s) under %s (requests %s) and left %s; revoked",
                            len(found), path, ", ".join(e.request_id for e, _ in found), ", ".join(left))
            try:
                for entry, _ in found:
                    await self._store.journal_swept(entry.intent_id)
                    searched += 1
            except StoreUnavailable:
                return searched
        if probe and now >= self._next_search_probe:
            self._next_search_probe = now + journal.MARGIN
            await self._probe()
        return searched

    async def _probe(self) -> None:
        """One cheap request carrying a probe id, to move the journal's mark (broker.journal rule 2)."""
        with contextlib.suppress(VaultError, TimeoutError):
            await asyncio.wait_for(self._vault.lookup_self(intent=journal.new_probe_id()),
                                   timeout=self._attempt_timeout)

    async def _revoke_ref_confirmed_within(self, kind: str | None, ref: str) -> bool:
        """Revoke what an answer (or the journal) named: a token by its accessor, else a lease by its id."""
        if kind == "token":
            return await self._revoke_confirmed_within(ref)
        return await self._revoke_lease_confirmed_within(ref)

    async def _revoke_lease_confirmed_within(self, lease_id: str) -> bool:
        """Revoke one lease by id (synchronous in Vault) and confirm that a lookup no longer finds it."""
        async def run() -> bool:
            try:
                await self._vault.revoke_lease(lease_id)
            except (VaultDenied, VaultBadResponse) as exc:
                # Refused (a lease Vault is revoking already, a backend that failed): the lookup decides.
                log.info("revoking lease %s: Vault refused (%s); confirming by lookup", lease_id, exc.reason)
            return await self._vault.lookup_lease(lease_id) is None
        try:
            return await asyncio.wait_for(run(), timeout=self._attempt_timeout)
        except (VaultError, TimeoutError):
            return False

    async def _revoke_confirmed_within(self, accessor: str) -> bool:
        try:
            return await asyncio.wait_for(self._revoke_confirmed(accessor), timeout=self._attempt_timeout)
        except (VaultError, TimeoutError):
            return False

    async def _revoke_confirmed(self, accessor: str) -> bool:
        """Revoke by accessor, then poll until ``lookup-accessor`` says the token is gone.

        The revoke's answer proves nothing (200 for an unknown accessor; the leases go after it answers),
        and a token Vault is still revoking answers 403 (tainted): only "invalid accessor" is gone.
        A lost revoke shows as a token that stays alive: the caller's bound ends this attempt.

        Raises:
            VaultError: Vault did not answer.
        """
        try:
            await self._vault.revoke_accessor(accessor)
        except (VaultDenied, VaultBadResponse) as exc:
            # A token Vault is revoking already may answer 400 or 403: the lookups decide, as in Revoker.
            log.info("revoking a token by accessor: Vault refused (%s); confirming by lookup", exc.reason)
        delay = 0.02
        while True:
            try:
                if await self._vault.lookup_accessor(accessor) is None:
                    return True
            except VaultDenied:
                pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def _finish(self, intent: Intent, event: IntentEvent, now: float, *, why: str | None = None,
                      vault_path: str | None = None) -> bool:
        try:
            record = await self._final_record(intent, event, now, why=why, vault_path=vault_path)
            return await self._store.move_intent(intent.id, from_state=IntentState.ABORTING, event=event, now=now,
                                                 record=record)
        except StoreUnavailable:
            return False

    async def _final_record(self, intent: Intent, event: IntentEvent, now: float, *,
                            why: str | None = None, vault_path: str | None = None) -> AuditRecord:
        gone = why or ("Vault confirmed its token is gone" if event == IntentEvent.VAULT_CONFIRMED
                       else "its token, if Vault created one, expired unused at its bootstrap TTL")
        if intent.kind == "task":
            return AuditRecord(now, "task.aborted", "failure", task=intent.task_id, action="task.start",
                               reason=f"the task could not be recorded; {gone}")
        task = await self._store.get_task(intent.task_id)
        # Where Vault was asked, named as a ``lease.issued`` record names it, when the lease its answer named
        # (or the path a search listed) says so; else the grant (an intent the orphan sweep claimed has
        # none: Vault's log does not name one, broker.journal rule 8).
        resource = vault_path or (f"grant:{intent.grant}" if intent.grant else "grant:unrecorded")
        fields = {"resource": resource, "action": "issue", "lease": intent.id,
                  "reason": f"the issuance was given up; {gone}"}
        if task is not None:
            return AuditRecord.for_task(task, now, "lease.aborted", "failure", **fields)
        return AuditRecord(now, "lease.aborted", "failure", task=intent.task_id, **fields)


@dataclass(frozen=True)
class RevocationStatus:
    revocation: RevocationRow
    revoked: int
    pending: int

    @property
    def done(self) -> bool:
        return self.pending == 0


class Revocations:
    """Operator revocations by user, agent, task or tenant, and their locks."""

    def __init__(self, *, store: Store, revoker: Revoker, clock: Callable[[], float]) -> None:
        self._store = store
        self._revoker = revoker
        self._clock = clock

    async def revoke(self, operator: UserIdentity, *, kind: Selector, value: str, reason: str,
                     wait: float) -> RevocationStatus:
        """Fence every live task matching the selector (and lock it), then revoke in Vault for up to ``wait`` s.

        Raises:
            BadRequest: an empty selector value.
        """
        if not value:
            raise BadRequest(f"{kind} must not be empty")
        if kind == "user" and not is_person_id(value):
            # An email address: it names every person whose tokens claim or claimed it, now and later.
            value = normalize_email(value)
            if "@" not in value:
                msg = "user must be a person id ('<issuer>#<subject>') or an email address"
                raise BadRequest(msg)
        now = self._clock()
        rev = RevocationRow(id="rvk_" + secrets.token_urlsafe(12), kind=kind, value=value, reason=reason,
                            created_by=operator.id, created_at=now, lock=kind in _LOCKING, lifted_at=None,
                            lifted_by=None, tasks=0, leases=0,  # counted by the fence's own transaction
                            created_by_name=operator.name)
        created = AuditRecord(now, "revocation.created", "success", user=operator.id, user_name=operator.name,
                              resource=f"{kind}:{value}", action="revoke",
                              reason=f"{reason} ({rev.id}{', locked' if rev.lock else ''})")

        fenced = await self._store.fence_selected(
            rev, now=now, created=created, retry_after=wait + 5,
            reason=f"by {operator.name} ({operator.id}): {reason} ({rev.id})")
        await self._revoker.settle(fenced, timeout=max(wait, 0.1))
        return await self.status(rev.id)

    async def status(self, revocation_id: str) -> RevocationStatus:
        """Raises: NotFound."""
        rev = await self._store.get_revocation(revocation_id)
        if rev is None:
            raise NotFound("no such revocation")
        counts = await self._store.lease_counts(revocation_id=revocation_id)
        return RevocationStatus(rev, revoked=counts.get(LeaseState.REVOKED, 0) + counts.get(LeaseState.EXPIRED, 0),
                                pending=counts.get(LeaseState.REVOKE_PENDING, 0) + counts.get(LeaseState.ACTIVE, 0))

    async def lift(self, operator: UserIdentity, revocation_id: str, *, reason: str) -> RevocationStatus:
        """Lift a lock. Lifting one that is not locked is harmless. Raises: NotFound."""
        rev = await self._store.get_revocation(revocation_id)
        if rev is None:
            raise NotFound("no such revocation")
        now = self._clock()
        await self._store.lift_lock(revocation_id, by=operator.id, by_name=operator.name, now=now, record=AuditRecord(
            now, "lock.lifted", "success", user=operator.id, user_name=operator.name,
            resource=f"{rev.kind}:{rev.value}", action="unlock", reason=f"{reason} ({revocation_id})"))
        return await self.status(revocation_id)


class LeaderWatch:
    """After the Vault cluster's active node changes, have Vault tidy its leases, twice.

    A leader killed during a credential read can leave a lease the new leader holds but that revoking
    its issuance token does not reach (shared/openbao-notes.md; tests/integration/test_ha_cluster.py).
    ``sys/leases/tidy`` revokes leases whose token is gone: once soon after the change (the request path
    has revoked the issuance tokens of the reads it gave up), once later (abandons retried with backoff).
    """

    _DELAYS = (5.0, 60.0)

    def __init__(self, vault: VaultClient, clock: Callable[[], float]) -> None:
        self._vault = vault
        self._clock = clock
        self._active: str | None = None
        self._due: list[float] = []

    async def tick(self) -> None:
        if not self._vault.clustered:
            return
        with contextlib.suppress(VaultError):
            await self._vault.health(timeout=2.0)  # the answer moves the client to the active node
        now = self._clock()
        active = self._vault.active_addr
        if self._active is not None and active != self._active:
            log.warning("the active Vault node changed (to %s): leases will be tidied", active)
            self._due = [now + d for d in self._DELAYS]
        self._active = active
        if self._due and self._due[0] <= now:
            try:
                await self._vault.tidy_leases()
            except VaultError as exc:
                log.warning("could not ask Vault to tidy its leases (%s); retrying", exc.code)
                return
            self._due.pop(0)


class Maintenance:
    """The background loop: expire, reconcile intents, retry revocations. Bounded work per tick."""

    def __init__(self, *, store: Store, vault: VaultClient, revoker: Revoker, settler: IntentSettler,
                 clock: Callable[[], float], interval: float, intent_grace: float, bootstrap_ttl: float,
                 sole_writer: bool, checkpointer: Checkpointer | None = None) -> None:
        self._store = store
        self._checkpointer = checkpointer
        self._vault = vault
        self._revoker = revoker
        self._settler = settler
        self._clock = clock
        self._interval = interval
        self._grace = intent_grace
        self._bootstrap_ttl = bootstrap_ttl
        self._started = clock()
        # With SQLite there is one broker: at start-up every open intent is a dead process's.
        self._sole_writer = sole_writer
        # Until one tick has settled them: the revocations a dead process had claimed (see _due_before).
        self._inherited = sole_writer
        self._leader = LeaderWatch(vault, clock)
        self._next_forget = clock()

    async def run_forever(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("maintenance tick failed")
            await asyncio.sleep(self._interval)

    async def tick(self) -> None:
        now = self._clock()
        await self._expire_tasks(now)
        await self._lost_bootstrap_tokens(now)
        await self._store.expire_approvals(now=now)
        await self._store.purge_delegations(now=now)
        await self._store.purge_console_sessions(now=now)
        await self._reconcile(now)
        await self._settler.sweep_late_answers()
        due = await self._store.tasks_due_for_revocation(now=self._due_before(now), limit=_DUE_PER_TICK)
        if due:
            await self._revoker.settle(due)
        if len(due) < _DUE_PER_TICK:
            self._inherited = False
        await self._expire_leases(now)
        # After the revocations: a search may look up many leases Vault lists, and must not delay a task's end.
        await self._settler.search_failed_reads()
        if now >= self._next_forget:  # bookkeeping, not history (broker.intents rule 6): once a minute
            self._next_forget = now + _FORGET_EVERY
            forgotten = await self._store.forget_settled_intents(settled_before=now - SETTLED_RETENTION)
            if forgotten:
                log.info("forgot %d intents settled over a day ago", forgotten)
        await self._leader.tick()
        if self._checkpointer is not None:  # last: the checkpoint covers this tick's records too
            await self._checkpointer.maybe_checkpoint()

    def _due_before(self, now: float) -> float:
        """Revocations due by now, and, on a sole writer's first pass, every one a dead process scheduled.

        A fence leaves the task to its ender for ``FENCE_CLAIM`` seconds, so that another replica does not
        revoke beside it. With SQLite there is one broker: a claim made before this process started is a
        dead one's, and waiting it out would leave the task's leases live for up to a minute after a
        restart. This process's own fences come after its start, so their claims end after
        ``started + FENCE_CLAIM`` and are not taken by this pass.
        """
        if self._inherited:
            return max(now, self._started + FENCE_CLAIM - 1e-3)
        return now

    async def _expire_tasks(self, now: float) -> None:
        due = await self._store.find_tasks(states=(TaskState.ACTIVE,), expires_before=now, limit=500)
        if not due:
            return
        records = [AuditRecord.for_task(t, now, "task.expired", "success", resource=f"role:{t.role}",
                                        action="expire", reason="deadline reached") for t in due]
        await self._store.fence_tasks([t.id for t in due], event=TaskEvent.EXPIRE, now=now, records=records,
                                      retry_after=0)

    async def _lost_bootstrap_tokens(self, now: float) -> None:
        """Tasks whose broker died between recording them and extending their token: the token expired
        at its bootstrap TTL, so the task is over; say so instead of showing it active."""
        stale = await self._store.find_tasks(states=(TaskState.ACTIVE,), token_state=TokenState.BOOTSTRAP,
                                             created_before=now - self._bootstrap_ttl - 1, limit=100)
        lost = []
        for t in stale:
            try:
                if await self._vault.lookup_accessor(t.token_accessor) is None:
                    lost.append(t)
            except VaultError:
                return
        if lost:
            await self._store.fence_tasks([t.id for t in lost], event=TaskEvent.REVOKE, now=now, retry_after=0,
                                          records=[AuditRecord.for_task(
                                              t, now, "task.revoked", "failure", resource=f"role:{t.role}",
                                              action="revoke", reason="the broker stopped before extending the "
                                                                      "task token; it expired unused")
                                              for t in lost])

    async def _claim_orphans(self, cutoff: float, now: float) -> None:
        """Vault's answers to journaled issuances that no intent names: their broker died before recording
        them (broker.journal rule 8). Claimed, they are due now, so this tick's reconciliation revokes them."""
        try:
            claimed = await self._store.claim_orphan_answers(before=cutoff, now=now)
        except StoreUnavailable:
            return
        for e in claimed:
            log.warning("intent %s: Vault answered it (request %s) and no broker recorded it; revoking what it "
                        "created", e.intent_id, e.request_id)

    async def _expire_leases(self, now: float) -> None:
        """Leases past their own expiry, in tasks still running: marked once Vault no longer has them."""
        due = await self._store.find_leases(states=(LeaseState.ACTIVE,), expires_before=now, limit=500)
        gone: list[tuple[LeaseRow, TaskRow]] = []
        for lease, task in due:
            try:
                if not await _alive(self._vault, lease, now):
                    gone.append((lease, task))
            except VaultError:
                return
        if gone:
            await self._store.expire_leases([x.id for x, _ in gone], now=now, records=[
                AuditRecord.for_task(t, now, "lease.expired", "success",
                            resource=x.path, action="expire", lease=x.id, reason="TTL elapsed; gone in Vault")
                for x, t in gone])

    async def _reconcile(self, now: float) -> None:
        """Intents left open by a dead issuer, and ``aborting`` ones whose next cleanup is due (broker.intents)."""
        cutoff = max(self._started, now - self._grace) if self._sole_writer else now - self._grace
        await self._claim_orphans(cutoff, now)
        due = await self._store.intents_due(now=now, open_before=cutoff)
        if due:
            await asyncio.gather(*(self._settler.reconcile(i) for i in due))
