"""Every state machine of the broker, each a table, all with one signature. Pure: no I/O.

Rules this file keeps (h11's ``_state.py`` is the model):
1. A state changes only by an event, through its table's ``next_state(state, event)``, which raises
   ``TransitionError`` when the event does not apply. Nothing else computes a new state.
2. The store never writes a state it was handed as a string: it takes an event, asks the table for
   the states the event applies in (``sources``) and the state it leads to (``target``), and moves the
   rows with one compare-and-set, ``UPDATE ... SET state = target WHERE state IN sources``. A row that
   moved meanwhile is simply not matched: the first writer wins, the second learns it lost.
3. The tables: a **task** (its delegation), its **task token** in Vault, a **lease** (one credential),
   an **approval** (people deciding a high-risk grant) and an **intent** (``broker.intents``: what the
   broker writes before a Vault call that creates something).

``tests/unit/test_states.py`` drives every (state, event) pair of every table through the store on
SQLite and checks it answers as the table does.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

S = TypeVar("S", bound=enum.StrEnum)
E = TypeVar("E", bound=enum.StrEnum)

__all__ = [
    "APPROVALS", "LEASES", "TASKS", "TOKENS", "ApprovalEvent", "ApprovalState", "LeaseEvent", "LeaseState",
    "StateTable", "TaskEvent", "TaskState", "TokenEvent", "TokenState", "TransitionError",
]


class TransitionError(ValueError):
    """An event that does not apply in a state: a caller's bug, or a race the caller must treat as lost."""


@dataclass(frozen=True)
class StateTable(Generic[S, E]):
    """One state machine: ``transitions[state][event]`` is the state ``event`` leads to from ``state``."""

    name: str
    transitions: Mapping[S, Mapping[E, S]]

    def next_state(self, state: S, event: E) -> S:
        """The state after ``event``.

        Raises:
            TransitionError: ``event`` does not apply in ``state``.
        """
        target = self.transitions[state].get(event)
        if target is None:
            msg = f"a {self.name} that is {state} cannot take {event}"
            raise TransitionError(msg)
        return target

    def allows(self, state: S, event: E) -> bool:
        return event in self.transitions[state]

    def sources(self, event: E) -> tuple[S, ...]:
        """The states ``event`` applies in: a compare-and-set's ``WHERE state IN (...)``."""
        return tuple(s for s, exits in self.transitions.items() if event in exits)

    def target(self, event: E) -> S:
        """The one state ``event`` leads to from every state it applies in (a single UPDATE's ``SET``).

        Raises:
            TransitionError: ``event`` applies nowhere, or leads to different states from different ones.
        """
        targets = {exits[event] for exits in self.transitions.values() if event in exits}
        if len(targets) != 1:
            msg = f"{self.name} event {event} has no single target ({sorted(targets)})"
            raise TransitionError(msg)
        return targets.pop()

    @property
    def final(self) -> frozenset[S]:
        return frozenset(s for s, exits in self.transitions.items() if not exits)


# -- tasks ----------------------------------------------------------------------------------------------


class TaskState(enum.StrEnum):
    ACTIVE = "active"
    ENDED = "ended"
    EXPIRED = "expired"
    REVOKED = "revoked"


class TaskEvent(enum.StrEnum):
    END = "end"  # its user or agent ended it
    EXPIRE = "expire"  # its deadline passed
    REVOKE = "revoke"  # an operator revoked it (or its start could not complete)


TASKS: StateTable[TaskState, TaskEvent] = StateTable("task", {
    TaskState.ACTIVE: {TaskEvent.END: TaskState.ENDED, TaskEvent.EXPIRE: TaskState.EXPIRED,
                       TaskEvent.REVOKE: TaskState.REVOKED},
    TaskState.ENDED: {},
    TaskState.EXPIRED: {},
    TaskState.REVOKED: {},
})


# -- task tokens ----------------------------------------------------------------------------------------


class TokenState(enum.StrEnum):
    BOOTSTRAP = "bootstrap"  # created with the short bootstrap TTL, not yet extended to the task's end
    LIVE = "live"
    REVOKE_PENDING = "revoke_pending"  # the task left active; revoked in Vault, not yet confirmed gone
    REVOKED = "revoked"  # Vault confirmed the token and every lease it held are gone


class TokenEvent(enum.StrEnum):
    EXTENDED = "extended"  # renewed from its bootstrap TTL to the task's end
    FENCED = "fenced"  # its task left active: it must go
    RETRY_SCHEDULED = "retry_scheduled"  # Vault did not confirm: try again later (with backoff)
    VAULT_CONFIRMED = "vault_confirmed"


TOKENS: StateTable[TokenState, TokenEvent] = StateTable("task token", {
    TokenState.BOOTSTRAP: {TokenEvent.EXTENDED: TokenState.LIVE, TokenEvent.FENCED: TokenState.REVOKE_PENDING},
    TokenState.LIVE: {TokenEvent.FENCED: TokenState.REVOKE_PENDING},
    TokenState.REVOKE_PENDING: {TokenEvent.RETRY_SCHEDULED: TokenState.REVOKE_PENDING,
                                TokenEvent.VAULT_CONFIRMED: TokenState.REVOKED},
    TokenState.REVOKED: {},
})


# -- leases ---------------------------------------------------------------------------------------------


class LeaseState(enum.StrEnum):
    ACTIVE = "active"
    REVOKE_PENDING = "revoke_pending"
    REVOKED = "revoked"
    EXPIRED = "expired"
    # Its task ended, but nothing can pull it back (an expiry-only certificate, a static KV value):
    # the broker let go of it; it lives until its own end (broker.engines). Never called "revoked".
    RELEASED = "released"


class LeaseEvent(enum.StrEnum):
    RENEWED = "renewed"
    FENCED = "fenced"  # its task left active: it must go (revoked with the task token)
    VAULT_REVOKED = "vault_revoked"  # Vault confirmed it gone after the broker revoked it
    VAULT_EXPIRED = "vault_expired"  # Vault confirmed it gone by its own TTL or its task's deadline
    RELEASED = "released"  # its task ended and it cannot be revoked: recorded as let go, not as revoked


LEASES: StateTable[LeaseState, LeaseEvent] = StateTable("lease", {
    LeaseState.ACTIVE: {LeaseEvent.RENEWED: LeaseState.ACTIVE, LeaseEvent.FENCED: LeaseState.REVOKE_PENDING,
                        LeaseEvent.VAULT_EXPIRED: LeaseState.EXPIRED},
    # Vault may expire it before confirming the revocation: gone either way, and said truthfully.
    LeaseState.REVOKE_PENDING: {LeaseEvent.VAULT_REVOKED: LeaseState.REVOKED,
                                LeaseEvent.VAULT_EXPIRED: LeaseState.EXPIRED,
                                LeaseEvent.RELEASED: LeaseState.RELEASED},
    LeaseState.REVOKED: {},
    LeaseState.EXPIRED: {},
    LeaseState.RELEASED: {},
})


# -- approvals ------------------------------------------------------------------------------------------


class ApprovalState(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    CONSUMED = "consumed"  # spent by the one issuance it unlocked


class ApprovalEvent(enum.StrEnum):
    VOTED = "voted"  # a vote that does not decide yet (fewer approvals than required)
    APPROVED = "approved"  # the required number of people approved
    DENIED = "denied"  # one person denied
    LAPSED = "lapsed"  # its expiry passed unused
    CONSUMED = "consumed"


APPROVALS: StateTable[ApprovalState, ApprovalEvent] = StateTable("approval", {
    ApprovalState.PENDING: {ApprovalEvent.VOTED: ApprovalState.PENDING, ApprovalEvent.APPROVED: ApprovalState.APPROVED,
                            ApprovalEvent.DENIED: ApprovalState.DENIED, ApprovalEvent.LAPSED: ApprovalState.EXPIRED},
    ApprovalState.APPROVED: {ApprovalEvent.CONSUMED: ApprovalState.CONSUMED,
                             ApprovalEvent.LAPSED: ApprovalState.EXPIRED},
    ApprovalState.DENIED: {},
    ApprovalState.EXPIRED: {},
    ApprovalState.CONSUMED: {},
})
