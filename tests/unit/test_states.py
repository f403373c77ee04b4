"""Every (state, event) pair of the task, task-token, lease and approval tables, through the store on SQLite.

h11's ``tests/test_state.py`` is the model: the table is the rule, so each pair is put to the store, which
must move the row exactly as the table says, or leave it where it was and say so. A row is placed in its
starting state directly (a test's set-up, not a transition); everything after goes through the store's
own methods. The intent table has its own such test (``test_intents.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import insert, select

from broker.audit import AuditRecord
from broker.errors import Conflict
from broker.states import (
    APPROVALS,
    LEASES,
    TASKS,
    TOKENS,
    ApprovalEvent,
    ApprovalState,
    LeaseEvent,
    LeaseState,
    StateTable,
    TaskEvent,
    TaskState,
    TokenEvent,
    TokenState,
    TransitionError,
)
from broker.store import Intent, Person, Store, open_store
from broker.store.schema import approvals, leases, tasks

NOW = 1_800_000_000.0
TASK = "tsk_t"
LEASE = "lse_l"
APPROVAL = "apr_a"
PERSON = Person("https://idp#u", "u", None)


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_store(f"sqlite:///{tmp_path / 's.db'}")
    yield s
    await s.close()


def _write(store: Store, statement: Any) -> None:
    with store._engine.begin() as conn:  # test set-up: place a row in its starting state
        conn.execute(statement)


def _read(store: Store, column: Any, key: Any, value: str) -> str:
    with store._engine.connect() as conn:
        return str(conn.execute(select(column).where(key == value)).scalar_one())


def place_task(store: Store, *, state: str = "active", token_state: str = "live") -> None:
    _write(store, insert(tasks).values(
        id=TASK, user=PERSON.id, agent="spiffe://example.org/a", role="r", tenant="t", reason="x", created_at=NOW,
        expires_at=NOW + 600, state=state, ended_at=None, token_accessor="acc", sealed_token=b"\0",
        token_state=token_state))


def place_lease(store: Store, state: str) -> None:
    _write(store, insert(leases).values(
        id=LEASE, task_id=TASK, grant="g", path="database/creds/x", kind="lease", vault_lease_id="v/1",
        issued_at=NOW, expires_at=NOW + 60, renewable=1, state=state, revoked_at=None))


def place_approval(store: Store, state: str, *, required: int = 1, expires_at: float = NOW + 600) -> None:
    _write(store, insert(approvals).values(
        id=APPROVAL, task_id=TASK, grant="g", path="database/creds/x", ttl=60, user=PERSON.id, agent="a",
        tenant="t", digest="d", required=required, state=state, created_at=NOW, expires_at=expires_at))


def rec(event: str = "test") -> AuditRecord:
    return AuditRecord(NOW, event, "success", task=TASK)


class TestTables:
    """The tables themselves: shapes every store compare-and-set relies on."""

    @pytest.mark.parametrize("table", [TASKS, TOKENS, LEASES, APPROVALS], ids=lambda t: t.name)
    def test_next_state_raises_where_the_table_is_silent(self, table: StateTable[Any, Any]) -> None:
        """next_state answers every listed pair and raises TransitionError for every other."""
        events = {e for exits in table.transitions.values() for e in exits}
        for state, event in itertools.product(table.transitions, events):
            if event in table.transitions[state]:
                assert table.next_state(state, event) == table.transitions[state][event]
            else:
                with pytest.raises(TransitionError):
                    table.next_state(state, event)

    @pytest.mark.parametrize("table", [TASKS, TOKENS, LEASES, APPROVALS], ids=lambda t: t.name)
    def test_every_event_has_one_target(self, table: StateTable[Any, Any]) -> None:
        """A single UPDATE can carry any event: it leads to one state from every state it applies in."""
        for event in {e for exits in table.transitions.values() for e in exits}:
            assert table.target(event) in table.transitions

    def test_final_states(self) -> None:
        """Ended, expired and revoked tasks, revoked tokens, gone leases and decided approvals never move."""
        assert TASKS.final == {TaskState.ENDED, TaskState.EXPIRED, TaskState.REVOKED}
        assert TOKENS.final == {TokenState.REVOKED}
        assert LEASES.final == {LeaseState.REVOKED, LeaseState.EXPIRED, LeaseState.RELEASED}
        assert APPROVALS.final == {ApprovalState.DENIED, ApprovalState.EXPIRED, ApprovalState.CONSUMED}


class TestTasksThroughTheStore:
    @pytest.mark.parametrize(("state", "event"), list(itertools.product(TaskState, TaskEvent)))
    async def test_fence(self, store: Store, state: TaskState, event: TaskEvent) -> None:
        """fence_tasks moves an active task along the event, and leaves any other where it is."""
        place_task(store, state=state.value)
        fenced = await store.fence_tasks([TASK], event=event, now=NOW, records=[rec()])
        after = _read(store, tasks.c.state, tasks.c.id, TASK)
        if TASKS.allows(state, event):
            assert [t.id for t in fenced] == [TASK] and after == TASKS.next_state(state, event)
            assert fenced[0].state == after and fenced[0].token_state == TokenState.REVOKE_PENDING
        else:
            assert fenced == [] and after == state


class TestTokensThroughTheStore:
    @pytest.mark.parametrize(("state", "event"), list(itertools.product(TokenState, TokenEvent)))
    async def test_token(self, store: Store, state: TokenState, event: TokenEvent) -> None:
        """Each token event's store method moves the token as TOKENS says, compare-and-set."""
        place_task(store, token_state=state.value)
        moved: bool
        if event is TokenEvent.EXTENDED:
            moved = await store.mark_token_live(TASK)
        elif event is TokenEvent.FENCED:
            moved = bool(await store.fence_tasks([TASK], event=TaskEvent.END, now=NOW, records=[]))
        elif event is TokenEvent.RETRY_SCHEDULED:
            before = _read(store, tasks.c.revoke_attempts, tasks.c.id, TASK)
            await store.retry_later(TASK, attempts=3, next_attempt_at=NOW + 5)
            moved = _read(store, tasks.c.revoke_attempts, tasks.c.id, TASK) != before
        else:
            moved = await store.confirm_revoked(TASK, lease_ids=[], lease_event=LeaseEvent.VAULT_REVOKED, now=NOW,
                                                records=[rec()])
        after = _read(store, tasks.c.token_state, tasks.c.id, TASK)
        assert moved is TOKENS.allows(state, event)
        assert after == (TOKENS.next_state(state, event) if moved else state)


class TestLeasesThroughTheStore:
    @pytest.mark.parametrize(("state", "event"), list(itertools.product(LeaseState, LeaseEvent)))
    async def test_lease(self, store: Store, state: LeaseState, event: LeaseEvent) -> None:
        """Each lease event's store method moves the lease as LEASES says, or leaves it and says so."""
        place_task(store, token_state=TokenState.REVOKE_PENDING.value
                   if event in (LeaseEvent.VAULT_REVOKED, LeaseEvent.RELEASED) else TokenState.LIVE.value)
        place_lease(store, state.value)
        moved = True
        if event is LeaseEvent.RENEWED:
            try:
                await store.renew_lease(LEASE, expires_at=NOW + 120, record=rec())
            except Conflict:
                moved = False
        elif event is LeaseEvent.FENCED:
            await store.fence_tasks([TASK], event=TaskEvent.END, now=NOW, records=[])
        elif event is LeaseEvent.VAULT_REVOKED:
            await store.confirm_revoked(TASK, lease_ids=[LEASE], lease_event=event, now=NOW, records=[])
        elif event is LeaseEvent.RELEASED:
            await store.confirm_revoked(TASK, lease_ids=[], lease_event=LeaseEvent.VAULT_REVOKED, now=NOW, records=[],
                                        released_ids=[LEASE])
        else:
            await store.expire_leases([LEASE], now=NOW, records=[])
        after = _read(store, leases.c.state, leases.c.id, LEASE)
        if LEASES.allows(state, event):
            assert moved and after == LEASES.next_state(state, event)
        else:
            assert after == state


class TestApprovalsThroughTheStore:
    @pytest.mark.parametrize(("state", "event"), list(itertools.product(ApprovalState, ApprovalEvent)))
    async def test_approval(self, store: Store, state: ApprovalState, event: ApprovalEvent) -> None:
        """Votes (tallied by approval_rules.tally), expiry and use move an approval as APPROVALS says."""
        place_task(store)
        lapsing = event is ApprovalEvent.LAPSED
        place_approval(store, state.value, required=2 if event is ApprovalEvent.VOTED else 1,
                       expires_at=NOW - 1 if lapsing else NOW + 600)
        moved = True
        try:
            if event in (ApprovalEvent.VOTED, ApprovalEvent.APPROVED, ApprovalEvent.DENIED):
                decision = "deny" if event is ApprovalEvent.DENIED else "approve"
                await store.vote(APPROVAL, approver=Person("https://idp#lead", "lead", None), decision=decision,
                                 reason="r", auth_time=NOW, now=NOW, record=rec())
            elif lapsing:
                moved = [a.id for a in await store.expire_approvals(now=NOW)] == [APPROVAL]
            else:
                intent = Intent(id=LEASE, kind="lease", task_id=TASK, grant="g", accessor="acc", created_at=NOW)
                await store.begin_issuance(intent, user=PERSON.id, user_email=None, agent="a", tenant="t",
                                           approval_id=APPROVAL)
        except Conflict:
            moved = False
        after = _read(store, approvals.c.state, approvals.c.id, APPROVAL)
        if APPROVALS.allows(state, event):
            assert moved and after == APPROVALS.next_state(state, event)
        else:
            assert not moved and after == state


def test_a_row_moved_meanwhile_is_not_overwritten(tmp_path: Path) -> None:
    """Compare-and-set: a task that left active between a reader's look and its fence is not fenced again."""
    import asyncio

    async def run() -> None:
        s = await open_store(f"sqlite:///{tmp_path / 'r.db'}")
        try:
            place_task(s)
            first = await s.fence_tasks([TASK], event=TaskEvent.END, now=NOW, records=[rec("task.ended")])
            second = await s.fence_tasks([TASK], event=TaskEvent.REVOKE, now=NOW, records=[rec("task.revoked")])
            assert [t.state for t in first] == [TaskState.ENDED] and second == []
            assert _read(s, tasks.c.state, tasks.c.id, TASK) == TaskState.ENDED
            events = [r.record.event for r in await s.query_audit(task=TASK)]
            assert events == ["task.ended"]  # the loser's record is not written
        finally:
            await s.close()

    asyncio.run(run())
