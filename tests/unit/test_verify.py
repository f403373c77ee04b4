"""The auditor's verifier: every class of tampering named with the first sequence number it breaks."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import (
    GENESIS,
    AuditRecord,
    ChainLink,
    canonical_bytes,
    chain_hash,
    verify_chain,
)
from broker.audit.canonical import canonical_record
from broker.audit.signing import Checkpoint, sign_checkpoint
from broker.audit.stretches import plan_stretches, verify_stretch_rows
from broker.audit.verify import (
    LogVerifier,
    _verify_stretch,
    verify_log,
    verify_row_stretch,
)
from broker.errors import AuditChainBroken
from tests.support.stretched import as_stored, verify_in_stretches

KEY = Ed25519PrivateKey.generate()


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield

PUB = KEY.public_key()
ORIGIN = "test-broker"


def make_chain(n: int, *, salt: str = "") -> list[ChainLink]:
    links, prev = [], GENESIS
    for seq in range(1, n + 1):
        rec = AuditRecord(1795877399.0 + seq / 7, "lease.issued", "success", user=f"u{seq % 5}{salt}",
                          task=f"tsk_{seq // 3}", reason="ok")
        h = chain_hash(prev, canonical_bytes(rec, seq))
        links.append(ChainLink(seq, rec, prev.hex(), h.hex()))
        prev = h
    return links


def checkpoints(links: list[ChainLink], sizes: list[int], key: Ed25519PrivateKey = KEY) -> list[Checkpoint]:
    out = []
    for size in sizes:
        head = bytes.fromhex(links[size - 1].hash or "") if size else GENESIS
        out.append(sign_checkpoint(Checkpoint(ORIGIN, size, head, 1795877399 + size), key))
    return out


def rechain(links: list[ChainLink], start: int) -> list[ChainLink]:
    """Recompute every hash from index ``start`` on: what an attacker with the database does."""
    out = links[:start]
    prev = bytes.fromhex(out[-1].hash or "") if out else GENESIS
    for link in links[start:]:
        h = chain_hash(prev, canonical_bytes(link.record, link.seq))
        out.append(ChainLink(link.seq, link.record, prev.hex(), h.hex()))
        prev = h
    return out


LINKS = make_chain(500)
CPS = checkpoints(LINKS, [100, 200, 300, 400])


class TestClean:
    def test_clean_log(self) -> None:
        """A clean log verifies: every record and every checkpoint counted."""
        r = verify_log(LINKS, CPS, PUB, witness=CPS, origin=ORIGIN)
        assert (r.ok, r.records, r.checkpoints, r.witnessed, r.first_bad_seq) == (True, 500, 4, 4, None)

    def test_empty_log(self) -> None:
        """No records and no checkpoints is a valid (empty) log."""
        assert verify_log([], [], PUB).ok

    def test_checkpoint_at_the_end(self) -> None:
        """A checkpoint of the whole log verifies."""
        assert verify_log(LINKS, checkpoints(LINKS, [500]), PUB).ok

    @pytest.mark.parametrize("batch", [1, 7, 99, 100, 101, 1000])
    def test_batches_do_not_matter(self, batch: int) -> None:
        """Feeding the links in batches of any size gives the same report as one pass."""
        v = LogVerifier(CPS, PUB, CPS)
        for i in range(0, len(LINKS), batch):
            v.feed(LINKS[i:i + batch])
        assert v.finish() == verify_log(LINKS, CPS, PUB, witness=CPS)

    def test_no_public_key(self) -> None:
        """Without a key the chain is still checked, and the report says checkpoints were not."""
        r = verify_log(LINKS, CPS, None)
        assert r.ok and r.checkpoints == 0 and r.reason and "not checked" in r.reason
        assert verify_log(LINKS[:10] + LINKS[11:], CPS, None).first_bad_seq == 11


class TestChainMutations:
    def test_edit(self) -> None:
        """An edited field: the edited record."""
        bad = list(LINKS)
        bad[249] = dataclasses.replace(bad[249], record=dataclasses.replace(bad[249].record, user="mallory"))
        r = verify_log(bad, CPS, PUB)
        assert (r.ok, r.first_bad_seq, r.records, r.checkpoints) == (False, 250, 249, 2)

    def test_delete(self) -> None:
        """A deleted record: its sequence number (the gap)."""
        assert verify_log(LINKS[:41] + LINKS[42:], CPS, PUB).first_bad_seq == 42

    def test_insert(self) -> None:
        """A record inserted (later ones renumbered): the inserted position."""
        fake = ChainLink(77, LINKS[3].record, LINKS[3].prev_hash, LINKS[3].hash)
        bad = LINKS[:76] + [fake] + [dataclasses.replace(x, seq=x.seq + 1) for x in LINKS[76:]]
        assert verify_log(bad, CPS, PUB).first_bad_seq == 77

    def test_swap(self) -> None:
        """Two records swapped: the earlier position."""
        bad = list(LINKS)
        bad[10], bad[20] = dataclasses.replace(bad[20], seq=11), dataclasses.replace(bad[10], seq=21)
        assert verify_log(bad, CPS, PUB).first_bad_seq == 11


class TestCheckpointMutations:
    def test_truncate_before_last_checkpoint(self) -> None:
        """Records cut below a checkpoint's size: the first missing record."""
        r = verify_log(LINKS[:350], CPS, PUB)
        assert (r.ok, r.first_bad_seq, r.records, r.checkpoints) == (False, 351, 350, 3)

    def test_truncate_after_last_checkpoint_is_the_blind_spot(self) -> None:
        """Truncation after the last checkpoint cannot be seen: the documented tail."""
        assert verify_log(LINKS[:450], CPS, PUB).ok

    def test_fork(self) -> None:
        """A consistent rewrite from 250: the record after the last checkpoint that still matches."""
        bad = list(LINKS)
        bad[249] = dataclasses.replace(bad[249], record=dataclasses.replace(bad[249].record, user="mallory"))
        r = verify_log(rechain(bad, 249), CPS, PUB)
        assert (r.ok, r.first_bad_seq, r.records, r.checkpoints) == (False, 201, 300, 2)  # stops at 300

    def test_fork_at_a_checkpoint(self) -> None:
        """A rewrite starting exactly at a checkpoint's record is caught by that checkpoint."""
        bad = list(LINKS)
        bad[199] = dataclasses.replace(bad[199], record=dataclasses.replace(bad[199].record, reason="x"))
        assert verify_log(rechain(bad, 199), CPS, PUB).first_bad_seq == 101

    def test_wrong_key(self) -> None:
        """A checkpoint re-signed with another key: after the last good checkpoint."""
        bad = list(CPS)
        bad[2] = checkpoints(LINKS, [300], Ed25519PrivateKey.generate())[0]
        r = verify_log(LINKS, bad, PUB)
        assert (r.first_bad_seq, r.checkpoints) == (201, 2)

    def test_replayed_note_in_another_row(self) -> None:
        """An old signed note under a newer row's size and head: after the last good checkpoint."""
        bad = list(CPS)
        bad[3] = dataclasses.replace(CPS[3], note=CPS[0].note)
        assert verify_log(LINKS, bad, PUB).first_bad_seq == 301

    def test_valid_checkpoint_of_another_history(self) -> None:
        """A correctly signed checkpoint whose head is another chain's: after the last good checkpoint."""
        bad = list(CPS)
        bad[1] = checkpoints(make_chain(500, salt="old"), [200])[0]
        assert verify_log(LINKS, bad, PUB).first_bad_seq == 101

    def test_duplicate_size_both_checked(self) -> None:
        """A forged checkpoint next to a good one of the same size still fails, whatever the order."""
        other = checkpoints(make_chain(500, salt="old"), [200])[0]
        for cps in ([*CPS, other], [other, *CPS]):
            assert verify_log(LINKS, sorted(cps, key=lambda c: c.size), PUB).first_bad_seq == 101


class TestWitness:
    def test_store_truncated_with_its_checkpoints(self) -> None:
        """Records and the store's checkpoints cut at 250; the witness still has 300 and 400."""
        r = verify_log(LINKS[:250], CPS[:2], PUB, witness=CPS)
        assert (r.ok, r.first_bad_seq) == (False, 251)

    def test_witnessed_checkpoint_missing_from_store(self) -> None:
        """A witnessed checkpoint deleted from the store: after the last good checkpoint."""
        r = verify_log(LINKS, [CPS[0], CPS[2], CPS[3]], PUB, witness=CPS)
        assert (r.ok, r.first_bad_seq) == (False, 101)
        assert r.reason and "missing from the store" in r.reason

    def test_fork_with_store_checkpoints_resigned_is_caught_by_witness(self) -> None:
        """An attacker holding the key re-signs the store's checkpoints after a fork; the witness disagrees."""
        bad = list(LINKS)
        bad[249] = dataclasses.replace(bad[249], record=dataclasses.replace(bad[249].record, user="mallory"))
        forked = rechain(bad, 249)
        resigned = checkpoints(forked, [100, 200, 300, 400])
        assert verify_log(forked, resigned, PUB).ok  # the store alone cannot tell
        r = verify_log(forked, resigned, PUB, witness=CPS)
        assert (r.ok, r.first_bad_seq) == (False, 201)

    def test_witness_with_wrong_key(self) -> None:
        """A witness entry that does not verify is reported."""
        r = verify_log(LINKS, CPS, PUB, witness=checkpoints(LINKS, [100], Ed25519PrivateKey.generate()))
        assert (r.ok, r.first_bad_seq) == (False, 1)


class TestFastPath:
    def test_body_equals_canonical_bytes(self) -> None:
        """The fast canonical form is byte for byte audit.canonical_bytes, on awkward strings too."""
        rng = random.Random(7)
        alphabet = ['"', "\\", "\n", "\x00", "\x1f", "\u2028", "é", "漢", "😀", "a", " ", "/", "\t", "\x7f"]
        names = [f.name for f in dataclasses.fields(AuditRecord)]
        for i in range(3000):
            kw: dict[str, object] = {}
            for name in names[3:]:
                kw[name] = None if rng.random() < 0.3 else "".join(rng.choices(alphabet, k=rng.randint(0, 12)))
            rec = AuditRecord(rng.uniform(0, 2e9), "".join(rng.choices(alphabet, k=5)), "success", **kw)  # type: ignore[arg-type]
            assert canonical_record(rec, i) == canonical_bytes(rec, i)

    def test_unusual_types_fall_back(self) -> None:
        """A field that is not a str goes through canonical_bytes itself."""
        rec = AuditRecord(5, "e", "success", user=42)  # type: ignore[arg-type]
        assert canonical_record(rec, 1) == canonical_bytes(rec, 1)

    @pytest.mark.parametrize("mutate", ["edit", "delete", "prev", "hash", "seq"])
    def test_same_answer_as_verify_chain(self, mutate: str) -> None:
        """The fast stretch check breaks where audit.verify_chain breaks."""
        bad = list(LINKS[:60])
        x = bad[30]
        bad[30] = {"edit": dataclasses.replace(x, record=dataclasses.replace(x.record, task="t")),
                   "prev": dataclasses.replace(x, prev_hash="00" * 32),
                   "hash": dataclasses.replace(x, hash="00" * 32),
                   "seq": dataclasses.replace(x, seq=99), "delete": bad[31]}[mutate]
        with pytest.raises(AuditChainBroken) as slow:
            verify_chain(bad)
        with pytest.raises(AuditChainBroken) as fast:
            _verify_stretch(bad, first_seq=1, prev=GENESIS)
        assert fast.value.first_bad_seq == slow.value.first_bad_seq

    @pytest.mark.parametrize("mutate", ["clean", "edit", "delete", "prev", "hash", "seq"])
    def test_rows_same_answer_as_links(self, mutate: str) -> None:
        """Store rows (plain tuples) verify exactly as the same links do."""
        bad = list(LINKS[:60])
        x = bad[30]
        bad[30] = {"clean": x, "edit": dataclasses.replace(x, record=dataclasses.replace(x.record, task="t")),
                   "prev": dataclasses.replace(x, prev_hash="00" * 32),
                   "hash": dataclasses.replace(x, hash="00" * 32),
                   "seq": dataclasses.replace(x, seq=99), "delete": bad[31]}[mutate]
        rows = [(k.seq, *(getattr(k.record, f.name) for f in dataclasses.fields(AuditRecord)), k.prev_hash, k.hash)
                for k in bad]
        by_links, by_rows = LogVerifier(CPS, PUB), LogVerifier(CPS, PUB)
        by_links.feed(bad)
        for i in range(0, len(rows), 7):
            by_rows.feed_rows(rows[i:i + 7])
        assert by_rows.finish() == by_links.finish()
        with pytest.raises(AuditChainBroken) if mutate != "clean" else _nothing():
            verify_row_stretch(rows, first_seq=1, prev=GENESIS)


def _edited(links: list[ChainLink], seq: int, **changes: str) -> list[ChainLink]:
    out = list(links)
    out[seq - 1] = dataclasses.replace(out[seq - 1], record=dataclasses.replace(out[seq - 1].record, **changes))
    return out


def _tampered() -> dict[str, tuple[list[ChainLink], list[Checkpoint], list[Checkpoint]]]:
    """Every tampering case above, as (links, store checkpoints, witness)."""
    forked = rechain(_edited(LINKS, 250, user="m"), 249)
    other = checkpoints(make_chain(500, salt="old"), [200])[0]
    swapped = list(LINKS)
    swapped[10], swapped[20] = dataclasses.replace(swapped[20], seq=11), dataclasses.replace(swapped[10], seq=21)
    rows_swapped = list(LINKS)
    rows_swapped[10], rows_swapped[20] = rows_swapped[20], rows_swapped[10]
    return {
        "clean": (LINKS, CPS, CPS),
        "edit": (_edited(LINKS, 250, user="mallory"), CPS, []),
        "edit first": (_edited(LINKS, 1, user="mallory"), CPS, []),
        "edit last": (_edited(LINKS, 500, user="mallory"), CPS, []),
        "delete": (LINKS[:41] + LINKS[42:], CPS, []),
        "delete first": (LINKS[1:], CPS, []),
        "insert": (LINKS[:76] + [ChainLink(77, LINKS[3].record, LINKS[3].prev_hash, LINKS[3].hash)]
                   + [dataclasses.replace(x, seq=x.seq + 1) for x in LINKS[76:]], CPS, []),
        "swap contents": (swapped, CPS, []),
        "swap rows": (rows_swapped, CPS, []),
        "prev_hash": ([*LINKS[:120], dataclasses.replace(LINKS[120], prev_hash="00" * 32), *LINKS[121:]], CPS, []),
        "prev_hash not hex": ([*LINKS[:120], dataclasses.replace(LINKS[120], prev_hash="zz"), *LINKS[121:]], CPS, []),
        "prev_hash upper": ([*LINKS[:120], dataclasses.replace(LINKS[120], prev_hash=(LINKS[119].hash or "").upper()),
                             *LINKS[121:]], CPS, []),
        "prev_hash null": ([*LINKS[:120], dataclasses.replace(LINKS[120], prev_hash=None), *LINKS[121:]], CPS, []),
        "hash": ([*LINKS[:120], dataclasses.replace(LINKS[120], hash="00" * 32), *LINKS[121:]], CPS, []),
        "truncate": (LINKS[:350], CPS, []),
        "truncate at a checkpoint": (LINKS[:300], CPS, []),
        "truncate tail": (LINKS[:450], CPS, []),
        "truncate with checkpoints": (LINKS[:250], CPS[:2], CPS),
        "gap then end": (LINKS[:300] + LINKS[310:], CPS, []),
        "fork": (forked, CPS, []),
        "fork at a checkpoint": (rechain(_edited(LINKS, 200, reason="x"), 199), CPS, []),
        "fork re-signed, witness": (forked, checkpoints(forked, [100, 200, 300, 400]), CPS),
        "wrong key": (LINKS, [*CPS[:2], checkpoints(LINKS, [300], Ed25519PrivateKey.generate())[0], CPS[3]], []),
        "replayed note": (LINKS, [*CPS[:3], dataclasses.replace(CPS[3], note=CPS[0].note)], []),
        "another history": (LINKS, [CPS[0], other, *CPS[2:]], []),
        "duplicate size": (LINKS, sorted([*CPS, other], key=lambda c: c.size), []),
        "witnessed missing": (LINKS, [CPS[0], CPS[2], CPS[3]], CPS),
        "checkpoint at 0 and the end": (LINKS, checkpoints(LINKS, [0, 100, 500]), []),
        "empty": ([], [], []),
        "empty with a checkpoint": ([], CPS[:1], []),
    }


class TestStretches:
    """The parallel path's pure half (broker.audit.stretches and LogVerifier.feed_stretch): the same report as
    the sequential check for every tampering case, wherever the stretches are cut."""

    @pytest.mark.parametrize("case", list(_tampered()))
    @pytest.mark.parametrize("stretch", [1, 7, 99, 100, 101, 120, 121, 250, 499, 500, 1000])
    def test_same_report_as_sequential(self, case: str, stretch: int) -> None:
        """Cut every 1-1000 records (so at checkpoints, just before and after them, at the tampered record)."""
        links, cps, witness = _tampered()[case]
        expected = verify_log(as_stored(links), cps, PUB, witness=witness)
        assert verify_in_stretches(links, cps, PUB, stretch=stretch, witness=witness) == expected
        assert verify_in_stretches(links, cps, None, stretch=stretch) == verify_log(as_stored(links), cps, None)

    def test_break_in_the_second_stretch(self) -> None:
        """An edited record in the second of four stretches: that record, counts as far as the chain held."""
        r = verify_in_stretches(_edited(LINKS, 170, user="mallory"), CPS, PUB, stretch=125)
        assert (r.ok, r.first_bad_seq, r.records, r.checkpoints) == (False, 170, 169, 1)

    def test_forged_prev_hash_at_a_boundary(self) -> None:
        """A stretch starts from the prev_hash its first row stores; a forged one is caught at that record."""
        bad = [*LINKS[:125], dataclasses.replace(LINKS[125], prev_hash="00" * 32), *LINKS[126:]]
        r = verify_in_stretches(bad, CPS, PUB, stretch=125)
        assert (r.ok, r.first_bad_seq, r.records) == (False, 126, 125)
        assert r.reason == "prev_hash is not the previous record's hash"

    def test_rewrite_from_a_boundary(self) -> None:
        """Every hash recomputed from a stretch's first record on (each stretch verifies alone): the checkpoint
        after it names the fork, as in one pass."""
        forked = rechain(_edited(LINKS, 251, reason="x"), 250)
        r = verify_in_stretches(forked, CPS, PUB, stretch=125)
        assert (r.ok, r.first_bad_seq, r.records, r.checkpoints) == (False, 201, 300, 2)
        assert r.reason and "does not match the chain's hash at 300" in r.reason

    def test_truncated_inside_a_stretch(self) -> None:
        """Records cut in the middle of a stretch, later stretches empty: the first missing record."""
        r = verify_in_stretches(LINKS[:310], CPS, PUB, stretch=125)
        assert (r.ok, r.first_bad_seq, r.records, r.checkpoints) == (False, 311, 310, 3)

    def test_rows_found_after_the_log_ended(self) -> None:
        """A stretch that came up short, then a later one with rows: the gap, as one pass reports it."""
        v = LogVerifier(CPS, PUB)
        rows = [(k.seq, *(getattr(k.record, f.name) for f in dataclasses.fields(AuditRecord)), k.prev_hash, k.hash)
                for k in LINKS]
        v.feed_stretch(verify_stretch_rows(rows[:80], first_seq=1, last_seq=125))
        v.feed_stretch(verify_stretch_rows(rows[130:], first_seq=126, last_seq=None, sizes=[200, 300, 400]))
        assert v.finish() == verify_log(LINKS[:80] + LINKS[130:], CPS, PUB)

    def test_plan(self) -> None:
        """Stretches cover 1..last without overlap, the last open; at least ``least`` records each."""
        assert plan_stretches(0, parts=4, least=10) == [(1, None)]
        assert plan_stretches(25, parts=4, least=10) == [(1, 10), (11, 20), (21, None)]
        assert plan_stretches(1000, parts=4, least=10) == [(1, 250), (251, 500), (501, 750), (751, None)]
