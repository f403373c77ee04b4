"""The auditor's check of a whole log: the hash chain, every checkpoint, and the witness. Pure.

``verify_log`` recomputes the chain (``broker.audit.verify_chain``'s checks), one stretch between two
checkpoints at a time, and compares each checkpoint with the hash the chain has at the checkpoint's
size. It streams: links are read once, in order, and never held; ``LogVerifier`` takes them in
batches for a caller that reads the store page by page.

What ``first_bad_seq`` means (the first record the log no longer proves):

* The chain itself breaks (a record edited, deleted, inserted or swapped without recomputing the
  hashes): the exact sequence number where the recomputation first fails, as ``verify_chain``
  reports it (a gap: the first missing number; a wrong ``prev_hash`` or ``hash``: that record).
* A checkpoint fails -- its signature is not by the key, its store columns differ from its signed
  note (a replayed checkpoint), its head is not the chain's hash at its size (a fork: the hashes after
  some record were all recomputed; or a valid old checkpoint of another history), or a witnessed
  checkpoint is missing from the store or differs from it: ``L + 1``, where ``L`` is the size of the
  last checkpoint *below* the failing one's size that verified (0 when none did). Records up to ``L``
  are proven by a signature; nothing after it is.
* Truncation: a valid checkpoint (in the store or at the witness) claims more records than there
  are: the first missing sequence number (records + 1).
* Checks run in sequence order and the first failure wins; at one size, every checkpoint is checked
  before that size counts as proven.

What no verifier can see: records after the last checkpoint the attacker cannot remove (the last
witnessed one, or the store's last one without a witness) can be truncated or rewritten
consistently. That tail is at most one checkpoint interval.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit import (
    CHAIN_DOMAIN,
    GENESIS,
    ChainLink,
)
from broker.audit.canonical import RECORD_WIDTH, canonical_record, canonical_row
from broker.audit.signing import Checkpoint, verify_checkpoint
from broker.errors import AuditChainBroken, CheckpointInvalid

if TYPE_CHECKING:
    from broker.audit.stretches import StretchResult

__all__ = ["LogVerifier", "VerifyReport", "verify_log", "verify_row_stretch"]


# -- the chain, fast -------------------------------------------------------------------------------
#
# broker.audit.verify_chain spends ~12 us a record; the checks below are the same with the canonical form
# written out field by field (broker.audit.canonical, ~4 us).

# SQLite keeps any type in any column: a BLOB where the broker writes text is a broken record, reported as
# one at its seq, never an error of the verifier.
_WRONG_TYPE = "the record holds a value of a type the broker never writes"
# Positions in a store row (seq, *AuditRecord fields, prev_hash, hash).
_N = RECORD_WIDTH
_PREV, _HASH = _N + 1, _N + 2


def _verify_stretch(links: Iterable[ChainLink], *, first_seq: int, prev: bytes) -> tuple[int, bytes]:
    """:func:`broker.audit.verify_chain`, same checks, same answers, faster.

    Raises:
        AuditChainBroken: a gap or repeat in the sequence, a wrong ``prev_hash``, or a wrong ``hash``.
    """
    sha256, body = hashlib.sha256, canonical_record
    expected = first_seq
    prev_hex = prev.hex()
    try:
        for link in links:
            if link.seq != expected:
                raise AuditChainBroken(expected, f"expected record {expected}, found {link.seq}")
            if link.prev_hash != prev_hex:
                raise AuditChainBroken(link.seq, "prev_hash is not the previous record's hash")
            prev = sha256(CHAIN_DOMAIN + prev + body(link.record, expected)).digest()
            prev_hex = prev.hex()
            if link.hash != prev_hex:
                raise AuditChainBroken(link.seq, "the record does not match its hash")
            expected += 1
    except (TypeError, ValueError, OverflowError) as exc:
        raise AuditChainBroken(expected, _WRONG_TYPE) from exc
    return expected - first_seq, prev


def verify_row_stretch(rows: Iterable[Sequence[Any]], *, first_seq: int, prev: bytes) -> tuple[int, bytes]:
    """:func:`_verify_stretch` over store rows ``(seq, *AuditRecord fields, prev_hash, hash)``, skipping the
    objects: a million of them cost more than the hashing.

    Raises:
        AuditChainBroken: a gap or repeat in the sequence, a wrong ``prev_hash``, or a wrong ``hash``.
    """
    sha256, body = hashlib.sha256, canonical_row
    expected = first_seq
    prev_hex = prev.hex()
    try:
        for row in rows:
            if row[0] != expected:
                raise AuditChainBroken(expected, f"expected record {expected}, found {row[0]}")
            if row[_PREV] != prev_hex:
                raise AuditChainBroken(expected, "prev_hash is not the previous record's hash")
            prev = sha256(CHAIN_DOMAIN + prev + body(row)).digest()
            prev_hex = prev.hex()
            if row[_HASH] != prev_hex:
                raise AuditChainBroken(expected, "the record does not match its hash")
            expected += 1
    except (TypeError, ValueError, OverflowError) as exc:
        raise AuditChainBroken(expected, _WRONG_TYPE) from exc
    return expected - first_seq, prev


@dataclass(frozen=True)
class VerifyReport:
    """The verdict. Verification stops at the first failure, so the counts are of what was checked by then:
    ``records`` whose chain verified, store ``checkpoints`` that verified (signature and head), and
    ``witnessed`` checkpoints that did."""

    ok: bool
    records: int
    checkpoints: int
    first_bad_seq: int | None = None
    reason: str | None = None
    witnessed: int = 0


@dataclass
class _Claim:
    """One checkpoint to hold against the chain at ``size``; ``problem`` is set when it is already bad."""

    size: int
    head: bytes
    witness: bool
    problem: str | None = None
    # The claim itself is not what the key signed (bad signature, replayed note): it proves nothing, so
    # it cannot prove a truncation either.
    forged: bool = False


@dataclass
class _Failure:
    seq: int
    reason: str


@dataclass
class LogVerifier:
    """Incremental :func:`verify_log`: ``feed`` links in order, in any batches, then ``finish``.

    ``public_key`` None checks the chain only (the report says checkpoints were not checked).
    """

    checkpoints: Sequence[Checkpoint]
    public_key: Ed25519PublicKey | None
    witness: Sequence[Checkpoint] = ()
    origin: str | None = None
    _claims: list[list[_Claim]] = field(init=False, default_factory=list)
    _next: int = field(init=False, default=0)
    _seen: int = field(init=False, default=0)
    _prev: bytes = field(init=False, default=GENESIS)
    _last_good: int = field(init=False, default=0)
    _good: int = field(init=False, default=0)
    _witnessed: int = field(init=False, default=0)
    _failure: _Failure | None = field(init=False, default=None)
    _verified: dict[str, Checkpoint] = field(init=False, default_factory=dict)
    _ended: bool = field(init=False, default=False)  # a stretch came up short: the log ends at _seen

    def __post_init__(self) -> None:
        by_size: dict[int, list[_Claim]] = defaultdict(list)
        if self.public_key is not None:
            for claim in self._store_claims(self.public_key):
                by_size[claim.size].append(claim)
            for claim in self._witness_claims(self.public_key, by_size):
                by_size[claim.size].append(claim)
            self._verified.clear()
        self._claims = [by_size[size] for size in sorted(by_size)]

    def _store_claims(self, key: Ed25519PublicKey) -> Iterator[_Claim]:
        for cp in self.checkpoints:
            claim = _Claim(cp.size, cp.head, witness=False)
            try:
                signed = self._verify_note(cp.note, key)
            except CheckpointInvalid as exc:
                claim.problem, claim.forged = f"checkpoint {cp.size}: {exc}", True
            else:
                if (signed.size, signed.head) != (cp.size, cp.head):
                    # A signed note moved to another row: a replayed checkpoint.
                    claim.forged = True
                    claim.problem = (f"checkpoint {cp.size}: its row claims another size or head than its "
                                     f"signed note ({signed.size}): a replayed checkpoint")
            yield claim

    def _witness_claims(self, key: Ed25519PublicKey, store: dict[int, list[_Claim]]) -> Iterator[_Claim]:
        for cp in self.witness:
            try:
                signed = self._verify_note(cp.note, key)
            except CheckpointInvalid as exc:
                yield _Claim(cp.size, cp.head, witness=True, problem=f"witnessed checkpoint {cp.size}: {exc}",
                             forged=True)
                continue
            claim = _Claim(signed.size, signed.head, witness=True)
            held = [c.head for c in store.get(signed.size, ()) if c.problem is None]
            if not held:
                claim.problem = f"witnessed checkpoint {signed.size} is missing from the store"
            elif signed.head not in held:
                claim.problem = f"witnessed checkpoint {signed.size} differs from the store's"
            yield claim

    def _verify_note(self, note: str, key: Ed25519PublicKey) -> Checkpoint:
        """``verify_checkpoint``, once per distinct note text (the witness repeats the store's notes).

        Raises:
            CheckpointInvalid: see ``verify_checkpoint``.
        """
        if note not in self._verified:
            self._verified[note] = verify_checkpoint(note, key, origin=self.origin)
        return self._verified[note]

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def feed(self, links: Iterable[ChainLink]) -> None:
        """Verify the next links of the chain (seq 1 first). After a failure, further links are ignored."""
        self._feed(iter(links), _verify_stretch)

    def feed_rows(self, rows: Iterable[Sequence[Any]]) -> None:
        """:meth:`feed` for rows as ``Store.chain_rows`` returns them: ``(seq, *AuditRecord fields, prev_hash,
        hash)``."""
        self._feed(iter(rows), verify_row_stretch)

    @property
    def claim_sizes(self) -> list[int]:
        """The sizes at which the chain's head is held against checkpoints, smallest first."""
        return [claims[0].size for claims in self._claims]

    def feed_stretch(self, s: StretchResult) -> None:
        """Take the next stretch's result (``broker.audit.stretches``; stretches in order, none skipped) as
        :meth:`feed` takes its rows: same checks, same report. The stretch verified itself from the
        ``prev_hash`` its first row stores; that is held here against the hash the stretch before ended with.
        """
        if self._failure is not None:
            return
        if self._ended:
            # The log ended inside an earlier stretch, yet this one found rows: a gap, as feed sees it.
            if s.first_row is not None:
                self._failure = _Failure(self._seen + 1, f"expected record {self._seen + 1}, found {s.first_row}")
            return
        if s.first_seq != self._seen + 1:
            msg = f"stretch from {s.first_seq} fed after {self._seen} records"
            raise ValueError(msg)
        if not self._check_heads_up_to(self._seen, s):
            return
        if s.first_row is None:
            self._ended = True
            return
        if s.first_row == s.first_seq and s.start_prev != self._prev.hex():
            self._failure = _Failure(s.first_seq, "prev_hash is not the previous record's hash")
            return
        end = s.first_seq - 1 + s.count
        if not self._check_heads_up_to(end, s):
            return
        if s.count:
            self._seen, self._prev = end, s.last
        if s.broken is not None:
            self._failure = _Failure(*s.broken)
        elif s.ended:
            self._ended = True

    def _check_heads_up_to(self, end: int, s: StretchResult) -> bool:
        """Hold every claim up to size ``end`` against the stretch's heads (the head so far below it)."""
        while self._next < len(self._claims) and (size := self._claims[self._next][0].size) <= end:
            self._seen, self._prev = size, s.heads[size] if size >= s.first_seq else self._prev
            self._check_claims()
            if self._failure is not None:
                return False
        return True

    def _feed(self, it: Iterator[Any], stretch: Callable[..., tuple[int, bytes]]) -> None:
        while self._failure is None:
            want = self._claims[self._next][0].size - self._seen if self._next < len(self._claims) else None
            if want is not None and want <= 0:
                self._check_claims()
                continue
            chunk = it if want is None else islice(it, want)
            try:
                n, self._prev = stretch(chunk, first_seq=self._seen + 1, prev=self._prev)
            except AuditChainBroken as exc:
                self._seen = exc.first_bad_seq - 1
                self._failure = _Failure(exc.first_bad_seq, exc.reason)
                return
            self._seen += n
            if want is None or n < want:
                return  # this batch is used up

    def _check_claims(self) -> None:
        claims = self._claims[self._next]
        for claim in claims:
            if claim.problem is None and claim.head != self._prev:
                what = "witnessed checkpoint" if claim.witness else "checkpoint"
                claim.problem = (f"{what} {claim.size} does not match the chain's hash at {claim.size} "
                                 "(a fork, or a checkpoint of another history)")
            if claim.problem is not None:
                self._failure = _Failure(self._last_good + 1, claim.problem)
                return
        self._last_good = claims[0].size
        self._good += sum(not c.witness for c in claims)
        self._witnessed += sum(c.witness for c in claims)
        self._next += 1

    def finish(self) -> VerifyReport:
        """The report, once every link has been fed."""
        if self._failure is None and self._next < len(self._claims):
            claims = self._claims[self._next]
            bad = next((c for c in claims if c.forged), None)
            if bad is not None:
                self._failure = _Failure(self._last_good + 1, bad.problem or "")
            else:
                self._failure = _Failure(self._seen + 1, f"a checkpoint claims {claims[0].size} records, the log "
                                                         f"holds {self._seen}: truncated")
        unchecked = "" if self.public_key is not None or not self.checkpoints else (
            "checkpoints not checked: no public key")
        if self._failure is None:
            return VerifyReport(True, self._seen, self._good, None, unchecked or None, self._witnessed)
        return VerifyReport(False, self._seen, self._good, self._failure.seq, self._failure.reason, self._witnessed)


def verify_log(links: Iterable[ChainLink], checkpoints: Sequence[Checkpoint], public_key: Ed25519PublicKey | None,
               *, witness: Sequence[Checkpoint] = (), origin: str | None = None) -> VerifyReport:
    """Recompute the chain from ``links`` (ordered by seq, from 1) and hold every checkpoint against it.

    Returns a report rather than raising: a broken log is an answer, not an error of the verifier.
    ``first_bad_seq`` is defined in this module's docstring.
    """
    verifier = LogVerifier(checkpoints, public_key, witness, origin)
    verifier.feed(links)
    return verifier.finish()
