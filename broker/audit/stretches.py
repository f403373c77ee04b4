"""A log verified in stretches, each on its own, so that several processes can share the work. Pure.

A stretch is a run of sequence numbers ``first_seq..last_seq`` (the last stretch of a plan is open: it
takes every record after its start). Checking one needs no earlier record: it starts from the
``prev_hash`` its first row stores, recomputes the chain from there, and reports what the sequential
check needs to go on -- the hash after each checkpoint size inside it, the hash after its last record,
and where it broke (``verify_stretch_rows``). Nothing it reports is trusted yet: a stretch whose first
row stores a forged ``prev_hash`` verifies against the forgery. ``LogVerifier.feed_stretch`` takes the
results in sequence order and holds each stretch's stored starting ``prev_hash`` against the hash the
stretch before it recomputed, and every checkpoint against the head at its size, so the report is
exactly the one the sequential check gives.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.audit.canonical import RECORD_WIDTH
from broker.audit.verify import verify_row_stretch
from broker.errors import AuditChainBroken

__all__ = ["StretchResult", "plan_stretches", "verify_stretch_rows"]

_PREV = RECORD_WIDTH + 1  # a store row's prev_hash, after its seq and its record's fields


@dataclass(frozen=True)
class StretchResult:
    """What one stretch's rows say, computed from the ``prev_hash`` its first row stores.

    ``count`` records verified in order from ``first_seq``; ``last`` is the hash after them; ``heads``
    the hash after each checkpoint size asked for that was reached; ``broken`` the ``(seq, reason)``
    where the chain broke (``count`` records before it verified). ``first_row`` is the sequence number
    of the first row found at or after ``first_seq`` (None: none), ``start_prev`` the ``prev_hash`` it
    stores when it is ``first_seq`` itself.
    """

    first_seq: int
    last_seq: int | None
    first_row: int | None
    start_prev: str | None
    count: int
    last: bytes
    heads: dict[int, bytes] = field(default_factory=dict)
    broken: tuple[int, str] | None = None

    @property
    def ended(self) -> bool:
        """The rows ran out before the stretch's end, without a break: the log ends inside it."""
        return self.broken is None and (self.last_seq is None or self.first_seq + self.count <= self.last_seq)


def plan_stretches(last_seq: int, *, parts: int, least: int) -> list[tuple[int, int | None]]:
    """Cut ``1..last_seq`` into at most ``parts`` stretches of at least ``least`` records; the last is open
    (records appended meanwhile, or stored above ``last_seq``, belong to it)."""
    size = max(least, -(-last_seq // max(1, parts)))
    starts = list(range(1, max(1, last_seq) + 1, size))
    return [(start, nxt - 1) for start, nxt in itertools.pairwise(starts)] + [(starts[-1], None)]


def verify_stretch_rows(rows: Iterable[Sequence[Any]], *, first_seq: int, last_seq: int | None,
                        sizes: Iterable[int] = ()) -> StretchResult:
    """Verify store rows ``(seq, *AuditRecord fields, prev_hash, hash)`` from ``first_seq`` (read in order, from
    the first row at or after it) up to ``last_seq``, keeping the hash after each of ``sizes`` inside."""
    it = iter(rows)
    first = next(it, None)
    if first is None:
        return StretchResult(first_seq, last_seq, None, None, 0, b"")
    seq, start_prev = first[0], first[_PREV]
    if seq != first_seq:
        return StretchResult(first_seq, last_seq, seq, None, 0, b"",
                             broken=(first_seq, f"expected record {first_seq}, found {seq}"))
    try:
        prev = bytes.fromhex(start_prev)
    except (TypeError, ValueError):
        # Not a hash at all: whatever the stretch before ends with, this record's link to it is broken.
        return StretchResult(first_seq, last_seq, seq, start_prev, 0, b"",
                             broken=(first_seq, "prev_hash is not the previous record's hash"))
    rows_it = itertools.chain((first,), it)
    heads: dict[int, bytes] = {}
    seen = first_seq - 1
    wanted = sorted({s for s in sizes if s >= first_seq and (last_seq is None or s <= last_seq)})
    try:
        for size in wanted:
            n, prev = verify_row_stretch(itertools.islice(rows_it, size - seen), first_seq=seen + 1, prev=prev)
            seen += n
            if seen < size:
                return StretchResult(first_seq, last_seq, seq, start_prev, seen - first_seq + 1, prev, heads)
            heads[size] = prev
        rest = rows_it if last_seq is None else itertools.islice(rows_it, last_seq - seen)
        n, prev = verify_row_stretch(rest, first_seq=seen + 1, prev=prev)
    except AuditChainBroken as exc:
        return StretchResult(first_seq, last_seq, seq, start_prev, exc.first_bad_seq - first_seq, b"", heads,
                             (exc.first_bad_seq, exc.reason))
    return StretchResult(first_seq, last_seq, seq, start_prev, seen + n - first_seq + 1, prev, heads)
