"""The intent state table (broker/intents.py), exhaustively, and through the store's compare-and-set."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import delete, insert

from broker.errors import VaultDenied
from broker.intents import (
    FINAL,
    TRANSITIONS,
    IntentEvent,
    IntentState,
    IntentTransitionError,
    backoff,
    next_state,
)
from broker.journal import ISSUED, JournalMode, new_probe_id
from broker.revocations import IntentSettler
from broker.rows import JournalEntry, TaskRow, VaultAuditPosition
from broker.store import Intent, Person, Store, open_store
from broker.store.schema import leases, tasks, vault_journal

ALLOWED = {
    (IntentState.OPEN, IntentEvent.RECORDED): IntentState.DONE,
    (IntentState.OPEN, IntentEvent.ABANDONED): IntentState.ABORTING,
    (IntentState.ABORTING, IntentEvent.CLEANUP_FAILED): IntentState.ABORTING,
    (IntentState.ABORTING, IntentEvent.VAULT_CONFIRMED): IntentState.ABORTED,
    (IntentState.ABORTING, IntentEvent.BOOTSTRAP_ELAPSED): IntentState.ABORTED,
    (IntentState.ABORTING, IntentEvent.TASK_BOUND): IntentState.ABORTED,
}
PAIRS = list(itertools.product(IntentState, IntentEvent))


class TestTable:
    @pytest.mark.parametrize(("state", "event"), PAIRS)
    def test_every_pair(self, state: IntentState, event: IntentEvent) -> None:
        """Each (state, event) pair either moves as listed or is refused."""
        if (state, event) in ALLOWED:
            assert next_state(state, event) == ALLOWED[(state, event)]
        else:
            with pytest.raises(IntentTransitionError):
                next_state(state, event)

    def test_final_states_have_no_way_out(self) -> None:
        """done and aborted are final: no event leaves them."""
        assert {IntentState.DONE, IntentState.ABORTED} == FINAL
        assert all(not TRANSITIONS[s] for s in FINAL)

    def test_aborted_only_after_vault_or_the_bootstrap_ttl(self) -> None:
        """Nothing reaches aborted from open directly, and only a Vault confirmation (or an accessor-less
        token's expiry) gets there: a failed cleanup keeps the intent retryable."""
        into_aborted = {(s, e) for (s, e), t in ALLOWED.items() if t == IntentState.ABORTED}
        assert into_aborted == {(IntentState.ABORTING, IntentEvent.VAULT_CONFIRMED),
                                (IntentState.ABORTING, IntentEvent.BOOTSTRAP_ELAPSED),
                                (IntentState.ABORTING, IntentEvent.TASK_BOUND)}
        assert next_state(IntentState.ABORTING, IntentEvent.CLEANUP_FAILED) == IntentState.ABORTING


def _const(value: float) -> Callable[[], float]:
    return lambda: value


class TestBackoff:
    def test_exponential_capped_and_jittered(self) -> None:
        """From 0.5-1 s after the first failure, doubling, never above the cap, never below half of it."""
        for attempts in range(0, 40):
            for r in (0.0, 0.5, 0.999):
                d = backoff(attempts, cap=8.0, rand=_const(r))
                base = min(8.0, 2.0 ** min(attempts, 16) / 2)
                assert base / 2 <= d < base + 1e-9
        assert backoff(1, cap=60, rand=lambda: 0.0) == 0.5
        assert backoff(30, cap=60, rand=lambda: 0.999) < 60
        rng = random.Random(1)
        assert len({backoff(5, cap=60, rand=rng.random) for _ in range(20)}) > 1


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_store(f"sqlite:///{tmp_path / 'i.db'}")
    yield s
    await s.close()


class _ListingVault:
    """The two calls search_failed_reads makes of Vault when nothing is left: a listing (refused while
    ``refuse``) that names no lease, and the probe."""

    def __init__(self) -> None:
        self.refuse = True
        self.listed: list[str] = []

    async def list_leases(self, prefix: str) -> list[str]:
        self.listed.append(prefix)
        if self.refuse:
            raise VaultDenied("permission denied")
        return []

    async def lookup_self(self, **_: object) -> None:
        return None


async def _intent(store: Store, state: IntentState) -> str:
    """An intent brought to ``state`` through the table."""
    iid = f"lse_{state}"
    await store.begin_task(Intent(id=iid, kind="lease", task_id="tsk_x", grant="g", accessor="acc", created_at=1.0),
                           user=Person(id="https://idp#u", name="u", trusted_email=None), agent="a", tenant="t")
    path = {IntentState.OPEN: [], IntentState.ABORTING: [IntentEvent.ABANDONED],
            IntentState.DONE: [IntentEvent.RECORDED],
            IntentState.ABORTED: [IntentEvent.ABANDONED, IntentEvent.VAULT_CONFIRMED]}[state]
    current = IntentState.OPEN
    for event in path:
        assert await store.move_intent(iid, from_state=current, event=event, now=2.0)
        current = next_state(current, event)
    return iid


class TestStoreTransitions:
    @pytest.mark.parametrize(("state", "event"), PAIRS)
    async def test_every_pair_through_the_store(self, store: Store, state: IntentState, event: IntentEvent) -> None:
        """The store applies exactly the table's transitions, and refuses the others without writing."""
        iid = await _intent(store, state)
        if (state, event) in ALLOWED:
            assert await store.move_intent(iid, from_state=state, event=event, now=3.0, attempts=1,
                                           next_attempt_at=9.0)
            row = await store.get_intent(iid)
            assert row is not None and row.state == ALLOWED[(state, event)]
            if row.state in FINAL:
                assert row.resolved_at == 3.0 and row.next_attempt_at is None
            else:
                assert row.next_attempt_at == 9.0 and row.attempts == 1
        else:
            with pytest.raises(IntentTransitionError):
                await store.move_intent(iid, from_state=state, event=event, now=3.0)
            row = await store.get_intent(iid)
            assert row is not None and row.state == state

    async def test_compare_and_set_first_writer_wins(self, store: Store) -> None:
        """A transition from a state the intent has left writes nothing: a completed issuance cannot be aborted."""
        iid = await _intent(store, IntentState.DONE)
        assert not await store.move_intent(iid, from_state=IntentState.OPEN, event=IntentEvent.ABANDONED, now=3.0)
        row = await store.get_intent(iid)
        assert row is not None and row.state == IntentState.DONE

    async def test_due_intents_are_stale_open_ones_and_aborting_ones_whose_retry_is_due(self, store: Store) -> None:
        """intents_due: open before the cutoff, aborting with next_attempt_at passed; never done, aborted or later."""
        await _intent(store, IntentState.OPEN)
        await _intent(store, IntentState.DONE)
        await _intent(store, IntentState.ABORTED)
        later = await _intent(store, IntentState.ABORTING)
        assert await store.move_intent(later, from_state=IntentState.ABORTING, event=IntentEvent.CLEANUP_FAILED,
                                       now=3.0, attempts=1, next_attempt_at=50.0)
        assert {i.state for i in await store.intents_due(now=10.0, open_before=0.5)} == set()
        assert {i.state for i in await store.intents_due(now=10.0, open_before=5.0)} == {"open"}
        assert {i.state for i in await store.intents_due(now=60.0, open_before=5.0)} == {"open", "aborting"}


class TestForgetting:
    """Settled intents are bookkeeping (broker.intents rule 6): forgotten a retention after they settled."""

    @staticmethod
    async def _journal(store: Store, intent_id: str, *, at: float, lease: str | None = "db/creds/x/1",
                       swept: bool = False) -> None:
        entry = JournalEntry(intent_id=intent_id, kind="response", task_id="tsk_x", request_id="r-" + intent_id,
                             at=at, failed=False, lease_id=lease)
        await store.merge_vault_audit(moves=[], records=[], tokens={}, now=at, journal=[entry])
        if swept:
            await store.journal_swept(intent_id)

    async def test_final_ones_go_with_their_journal_and_the_rest_stay(self, store: Store) -> None:
        """done and aborted intents settled before the cutoff go, their journal entries with them; open and
        aborting ones, ones settled later, and an aborted one whose late answer is unswept stay."""
        done, aborted, open_, aborting = [await _intent(store, s) for s in
                                          (IntentState.DONE, IntentState.ABORTED, IntentState.OPEN,
                                           IntentState.ABORTING)]
        await self._journal(store, done, at=2.0)
        await self._journal(store, aborted, at=2.0, swept=True)
        assert await store.forget_settled_intents(settled_before=2.0) == 0  # settled at 2.0: not before it
        assert await store.forget_settled_intents(settled_before=3.0) == 2
        assert [await store.get_intent(i) for i in (done, aborted)] == [None, None]
        assert await store.journal_for(done) == [] and await store.journal_for(aborted) == []
        assert {(await store.get_intent(i)).state for i in (open_, aborting)} == {"open", "aborting"}  # type: ignore[union-attr]

    async def test_an_unswept_late_answer_keeps_its_intent(self, store: Store) -> None:
        """The late-answer sweep joins the answer to its aborted intent: forgetting it would strand the lease."""
        iid = await _intent(store, IntentState.ABORTED)
        await self._journal(store, iid, at=5.0)
        assert await store.forget_settled_intents(settled_before=100.0) == 0
        assert [e.lease_id for e in await store.journal_unswept()] == ["db/creds/x/1"]
        await store.journal_swept(iid)
        assert await store.forget_settled_intents(settled_before=100.0) == 1
        assert await store.journal_unswept() == []

    async def test_a_failed_read_not_searched_yet_keeps_its_intent(self, store: Store) -> None:
        """A backend error answered to an issuance token (broker.journal rule 9) is searched once its intent
        is aborted, from the intent's creation; until that search is done, the intent is not forgotten."""
        open_, aborted = await _intent(store, IntentState.OPEN), await _intent(store, IntentState.ABORTED)
        for iid in (open_, aborted):
            await store.merge_vault_audit(moves=[], records=[], tokens={}, now=5.0, journal=[JournalEntry(
                intent_id=iid, kind=ISSUED, task_id="tsk_x", request_id="r-" + iid, at=5.0, failed=False,
                vault_error=True, path="db/creds/x")])
        [(entry, created)] = await store.journal_unsearched()
        assert (entry.intent_id, entry.path, entry.vault_error, created) == (aborted, "db/creds/x", True, 1.0)
        assert await store.journal_unswept() == []  # names nothing: not the late-answer sweep's
        assert await store.forget_settled_intents(settled_before=100.0) == 0
        await store.journal_swept(aborted)
        assert await store.journal_unsearched() == []
        assert await store.forget_settled_intents(settled_before=100.0) == 1

    async def test_only_the_intents_own_task_and_paths_not_waiting_are_searched(self, store: Store) -> None:
        """An error answer made in another task never speaks for the intent (broker.journal rule 1), and a
        path whose search backs off is left out, so a stuck path cannot hold the newer answers back."""
        own = await _intent(store, IntentState.ABORTED)  # of task tsk_x
        await store.merge_vault_audit(moves=[], records=[], tokens={}, now=5.0, journal=[
            JournalEntry(intent_id=own, kind=ISSUED, task_id="tsk_other", request_id="r1",
                         at=5.0, failed=False, vault_error=True, path="db/creds/x")])
        assert await store.journal_unsearched() == []

        def wipe() -> None:
            with store._tx() as conn:
                conn.execute(delete(vault_journal))
        await store._run(wipe)
        await store.merge_vault_audit(moves=[], records=[], tokens={}, now=5.0, journal=[JournalEntry(
            intent_id=own, kind=ISSUED, task_id="tsk_x", request_id="r2", at=5.0, failed=False,
            vault_error=True, path="db/creds/x")])
        assert [e.request_id for e, _ in await store.journal_unsearched()] == ["r2"]
        assert await store.journal_unsearched(skip_paths=["db/creds/x"]) == []
        assert len(await store.journal_unsearched(skip_paths=["db/creds/y"])) == 1

    async def test_a_search_vault_refuses_backs_off_and_is_kept(self, store: Store) -> None:
        """The settler's side, with a Vault that refuses the listing (a policy without it): nothing is searched
        before the journal is known to work; then the answer stays unsearched (nothing is marked done that
        was not searched), and the path is not listed again on the next ticks but after a backoff; once
        Vault lists it, it is searched and done."""
        aborted = await _intent(store, IntentState.ABORTED)
        await store.merge_vault_audit(
            moves=[(None, VaultAuditPosition(path="/a.log", device=1, inode=1, offset=10, last_entry_at=30.0))],
            records=[], tokens={}, now=5.0, journal=[JournalEntry(
                intent_id=aborted, kind=ISSUED, task_id="tsk_x", request_id="r1", at=5.0, failed=False,
                vault_error=True, path="db/creds/x")])
        now = [40.0]
        vault = _ListingVault()
        mode = JournalMode()
        settler = IntentSettler(store=store, vault=vault, clock=lambda: now[0], bootstrap_ttl=5, vault_timeout=5,
                                max_backoff=60, journal=mode)  # type: ignore[arg-type]
        assert await settler.search_failed_reads() == 0
        assert vault.listed == []  # the journal is not known to work yet: its mark vouches for nothing
        mode.ready = True
        assert await settler.search_failed_reads() == 0
        assert vault.listed == ["db/creds/x"] and len(await store.journal_unsearched()) == 1
        now[0] += 0.5
        assert await settler.search_failed_reads() == 0
        assert vault.listed == ["db/creds/x"]  # backing off: not listed again at once
        now[0] += 120
        vault.refuse = False
        assert await settler.search_failed_reads() == 1
        assert vault.listed == ["db/creds/x", "db/creds/x"] and await store.journal_unsearched() == []

    async def test_what_names_a_listed_lease_is_read_by_index_live_leases_and_recent_answers(
            self, store: Store) -> None:
        """The leftover search's store side (broker.journal rule 9): a listed lease is named by a live lease
        (whatever its grant's path says), or by a journal answer from the window's start on; a revoked lease
        and an answer older than the window name nothing (those leases are looked up in Vault, whose issue
        time then decides)."""
        rows = [("a", "p/issue/x", "active"), ("b", "p/issue/x", "revoke_pending"), ("c", "p/issue/x", "revoked"),
                ("d", "p/issue/y", "active"), ("e", "p/issue/x", "released")]

        def put() -> None:
            with store._tx() as conn:
                conn.execute(insert(tasks).values(dataclasses.asdict(TaskRow(
                    id="tsk_x", user="https://idp#u", agent="a", role="r", tenant="t", reason="x", created_at=1.0,
                    expires_at=9.0, state="active", ended_at=None, token_accessor="acc", sealed_token=b"\0"))))
                for name, path, state in rows:
                    conn.execute(insert(leases).values(
                        id=f"lse_{name}", task_id="tsk_x", grant="g", path=path, kind="lease",
                        vault_lease_id=f"p/issue/x/{name}", issued_at=1.0, expires_at=9.0, renewable=False,
                        state=state))
        await store._run(put)
        await store.merge_vault_audit(moves=[], records=[], tokens={}, now=20.0, journal=[
            JournalEntry(intent_id=f"lse_j{i}", kind=kind, task_id="tsk_x", request_id=f"r{i}", at=at, failed=False,
                         lease_id=f"p/issue/x/j{i}", checked=checked)
            for i, (kind, at, checked) in enumerate([("response", 10.0, True), ("issued", 12.0, False),
                                                     ("response", 4.0, False)])])
        listed = [f"p/issue/x/{n}" for n in ("a", "b", "c", "d", "e", "j0", "j1", "j2", "z")]
        got = await store.unnamed_vault_leases(listed, since=5.0)
        assert got == ["p/issue/x/c", "p/issue/x/j2", "p/issue/x/z"]

    async def test_old_probe_entries_go(self, store: Store) -> None:
        """The start-up probe's entries name no intent: they go once older than the cutoff, and only they."""
        probe = new_probe_id()
        await self._journal(store, probe, at=1.0, lease=None)
        await self._journal(store, "lse_orphan_entry", at=1.0, lease=None)
        await store.forget_settled_intents(settled_before=0.5)
        assert len(await store.journal_for(probe)) == 1
        await store.forget_settled_intents(settled_before=3.0)
        assert await store.journal_for(probe) == []
        assert len(await store.journal_for("lse_orphan_entry")) == 1
