"""The parallel verifier's pure half run in this process: a log cut into stretches, each verified on its own
(``broker.audit.stretches``) and the results fed in order (``LogVerifier.feed_stretch``), as the workers
and the coordinator of ``broker.audit.parallel`` do over a store."""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit import AuditRecord, ChainLink
from broker.audit.signing import Checkpoint
from broker.audit.stretches import plan_stretches, verify_stretch_rows
from broker.audit.verify import LogVerifier, VerifyReport

_FIELDS = [f.name for f in dataclasses.fields(AuditRecord)]


def as_stored(links: Sequence[ChainLink]) -> list[ChainLink]:
    """The links as a store returns them: by sequence number (which a store holds once each)."""
    return sorted(links, key=lambda k: k.seq)


def verify_in_stretches(links: Sequence[ChainLink], checkpoints: Sequence[Checkpoint], key: Ed25519PublicKey | None,
                        *, stretch: int, witness: Sequence[Checkpoint] = (), origin: str | None = None) -> VerifyReport:
    """``verify_log`` over ``as_stored(links)``, the parallel way, with stretches of ``stretch`` records planned
    from the highest sequence number (the last stretch open, as ``verify_in_processes`` plans them)."""
    rows = [(k.seq, *(getattr(k.record, f) for f in _FIELDS), k.prev_hash, k.hash) for k in as_stored(links)]
    verifier = LogVerifier(checkpoints, key, witness, origin)
    seqs = [r[0] for r in rows]
    last = seqs[-1] if seqs else 0
    for first, end in plan_stretches(last, parts=max(1, -(-last // stretch)), least=stretch):
        # What a worker's page reads return: the rows from ``first`` on, at most as many as the stretch has.
        start = bisect.bisect_left(seqs, first)
        mine = rows[start:] if end is None else rows[start:start + end - first + 1]
        sizes = [s for s in verifier.claim_sizes if s >= first and (end is None or s <= end)]
        verifier.feed_stretch(verify_stretch_rows(mine, first_seq=first, last_seq=end, sizes=sizes))
    return verifier.finish()
