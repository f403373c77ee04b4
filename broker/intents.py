"""Intents: what the broker writes before a Vault call that creates something, and the rules of their life.

Rules this file keeps:
1. The state machine is the table below; the store changes an intent's state only through
   ``next_state`` (compare-and-set from the state it read), never by writing a string.
2. An intent reaches a final state only once nothing it may have created in Vault is left:
   ``done`` when what it created is recorded (a task or a lease the broker lists), ``aborted`` only
   when Vault confirmed that its token is gone (``lookup-accessor`` answers "invalid accessor").
   ``revoke-accessor`` proves nothing: it answers 200 for an unknown accessor and returns before the
   token's leases are revoked; a 403 on lookup is a token Vault is still revoking.
3. Giving up (an error, a timeout, a crash found by the reconciler, the task ending under an
   issuance) moves an ``open`` intent to ``aborting``; a cleanup that Vault does not confirm leaves it
   ``aborting`` with a later ``next_attempt_at`` (``backoff``), and the maintenance loop retries it
   until Vault confirms. Never ``open`` straight to ``aborted``: a network partition makes the first
   revoke fail exactly when it matters (threat TH-15).
4. One exception: a task intent whose token accessor the broker never learned (the token create
   itself failed or timed out, or the broker died before it could record the accessor) cannot be
   looked up. Its token, if Vault created one, was born with the bootstrap TTL and nothing renews it
   (the start renews only after the intent is ``done``), so Vault itself expires it: such an intent
   becomes ``aborted`` (``BOOTSTRAP_ELAPSED``) only after the bootstrap TTL plus one Vault timeout has
   passed since the intent was fenced.
5. A journaled issuance (``broker.journal``) holds no token of its own: it is ``aborted`` once the
   journal shows that Vault issued nothing for it (``VAULT_CONFIRMED``), or once what Vault issued is
   revoked and confirmed gone (``VAULT_CONFIRMED``), or, where Vault's log cannot name what it issued
   (an answer it never wrote, a token whose accessor it HMACs), as ``TASK_BOUND``: made by the task
   token, it dies with the task, and the record says so.
6. A final intent is bookkeeping, not history (the audit log keeps its ``lease.issued`` or
   ``*.aborted`` record): it is forgotten, with its journal entries, ``SETTLED_RETENTION`` after it
   settled, so neither table grows with every credential ever issued. An ``aborted`` one whose late
   answer (broker.journal rule 6) has not been swept stays until it is: forgetting it would leave that
   answer with nothing to join. A day is far past any late answer (Vault's own request deadline is 90 s).

This module is pure: no I/O. ``broker.revocations.IntentSettler`` performs the Vault calls.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable

from broker.states import StateTable, TransitionError


class IntentState(enum.StrEnum):
    OPEN = "open"
    DONE = "done"
    ABORTING = "aborting"
    ABORTED = "aborted"


class IntentEvent(enum.StrEnum):
    RECORDED = "recorded"  # the task or lease was recorded, with its audit record, in the same transaction
    ABANDONED = "abandoned"  # the broker gave up on the operation: whatever Vault created must be revoked
    CLEANUP_FAILED = "cleanup_failed"  # the revoke or its confirmation did not succeed: retry later
    VAULT_CONFIRMED = "vault_confirmed"  # Vault says the intent's token is gone
    BOOTSTRAP_ELAPSED = "bootstrap_elapsed"  # an accessor-less task intent: its token expired by itself (rule 4)
    TASK_BOUND = "task_bound"  # a journaled issuance whose credential Vault cannot name: it dies with its task (rule 5)


INTENTS: StateTable[IntentState, IntentEvent] = StateTable("intent", {
    IntentState.OPEN: {
        IntentEvent.RECORDED: IntentState.DONE,
        IntentEvent.ABANDONED: IntentState.ABORTING,
    },
    IntentState.ABORTING: {
        IntentEvent.CLEANUP_FAILED: IntentState.ABORTING,
        IntentEvent.VAULT_CONFIRMED: IntentState.ABORTED,
        IntentEvent.BOOTSTRAP_ELAPSED: IntentState.ABORTED,
        IntentEvent.TASK_BOUND: IntentState.ABORTED,
    },
    IntentState.DONE: {},
    IntentState.ABORTED: {},
})
TRANSITIONS = INTENTS.transitions
FINAL: frozenset[IntentState] = INTENTS.final
# How long a final intent is kept after it settled (rule 6).
SETTLED_RETENTION = 24 * 3600.0
# The table's error, under the name this module's callers know.
IntentTransitionError = TransitionError


def next_state(state: IntentState, event: IntentEvent) -> IntentState:
    """The state after ``event`` (``INTENTS.next_state``).

    Raises:
        TransitionError: the event does not apply in this state.
    """
    return INTENTS.next_state(state, event)


def backoff(attempts: int, *, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds until the next attempt after ``attempts`` failed ones: exponential from 1 s, capped, jittered.

    The jitter (a factor in [0.5, 1)) keeps a crowd of retries that failed together (one partition)
    from hitting Vault together when it heals.
    """
    base = min(cap, 2.0 ** min(max(attempts, 0), 16) / 2.0)
    return base * (0.5 + rand() / 2.0)
