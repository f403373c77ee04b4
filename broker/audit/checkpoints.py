"""Checkpointing the audit chain, and verifying a store: the I/O around ``audit.signing`` and ``audit.verify``.

The ``Checkpointer`` runs in the maintenance loop: every ``checkpoint_every`` records or
``checkpoint_interval`` seconds, whichever comes first, it signs the chain's head, stores the
checkpoint, then appends it to the witness file. Store first, witness second: a crash in between
leaves a checkpoint the witness lacks (harmless; the witness is a subset), never a witnessed one the
store lacks (which the verifier reports as tampering). The maintenance tick sets the granularity: a
checkpoint covers the head at the tick, so checkpoints are at least ``checkpoint_every`` records apart,
not exactly.

The witness is a file outside the store (another disk, host or account is the point): an attacker who
rewrites the database cannot rewrite what the witness already holds, so truncation or a consistent
rewrite is detectable up to the last witnessed checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from broker.audit.parallel import usable_cores, verify_in_processes
from broker.audit.signing import (
    Checkpoint,
    key_id,
    parse_checkpoint,
    parse_notes,
    sign_checkpoint,
)
from broker.audit.verify import LogVerifier, VerifyReport
from broker.errors import CheckpointInvalid
from broker.store import CheckpointRow, Store

__all__ = ["Checkpointer", "StoreVerifier", "append_witness", "checkpoint_of", "read_witness"]

log = logging.getLogger(__name__)

_PAGE = 10_000
# From this many records on, the log is verified by worker processes (broker.audit.parallel): starting
# them costs ~0.3-1 s (docs/architecture.md, "The verifier on every core").
PARALLEL_FROM = 200_000
_STRETCH_LEAST = 50_000
_MAX_WORKERS = 8  # each holds a connection to the store


def checkpoint_of(row: CheckpointRow, origin: str) -> Checkpoint:
    """A stored checkpoint as the verifier takes it: the row's claims plus its signed note."""
    return Checkpoint(origin, row.seq, bytes.fromhex(row.head_hash), int(row.time), row.note)


def append_witness(path: Path, note: str) -> None:
    """Append one signed note and a blank line to the witness file, and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (note + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_witness(path: Path) -> list[Checkpoint]:
    """The checkpoints in a witness file (signatures not checked here; the verifier checks them).

    Raises:
        CheckpointInvalid: the file cannot be read, or is not a sequence of complete checkpoints.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"cannot read the witness file {path}"
        raise CheckpointInvalid(msg) from exc
    return [parse_checkpoint(note) for note in parse_notes(text)]


class Checkpointer:
    """Signs the chain's head now and then; see the module docstring."""

    def __init__(self, *, store: Store, key: Ed25519PrivateKey, origin: str, every: int, interval: float,
                 witness_file: Path | None, clock: Callable[[], float]) -> None:
        self._store = store
        self._key = key
        self._kid = key_id(key.public_key()).hex()
        self._origin = origin
        self._every = every
        self._interval = interval
        self._witness = witness_file
        self._clock = clock
        self._last: tuple[int, float] | None = None  # (seq, time) of the last checkpoint, once read

    async def maybe_checkpoint(self) -> Checkpoint | None:
        """Sign and store a checkpoint if ``every`` records or ``interval`` seconds have passed since the last.

        Raises:
            StoreUnavailable: the store cannot be read or written.
        """
        if self._last is None:
            row = await self._store.last_checkpoint()
            self._last = (row.seq, row.time) if row is not None else (0, 0.0)
        seq, head = await self._store.chain_head()
        last_seq, last_time = self._last
        now = self._clock()
        if seq <= last_seq or (seq - last_seq < self._every and now - last_time < self._interval):
            return None
        return await self._checkpoint(seq, head, now)

    async def _checkpoint(self, seq: int, head: str, now: float) -> Checkpoint:
        cp = sign_checkpoint(Checkpoint(self._origin, seq, bytes.fromhex(head), int(now)), self._key)
        stored = await self._store.add_checkpoint(CheckpointRow(seq, head, float(int(now)), cp.note, self._kid))
        self._last = (seq, now)
        if stored and self._witness is not None:
            # A witness that cannot be written is logged, not fatal: the chain and the stored checkpoint
            # still stand, and the next checkpoint tries again.
            try:
                await asyncio.to_thread(append_witness, self._witness, cp.note)
            except OSError as exc:
                log.error("could not append checkpoint %d to the witness %s: %s", seq, self._witness, exc.strerror)
        return cp


@dataclass(frozen=True)
class StoreVerifier:
    """Verifies a store's chain and checkpoints (and a witness file), page by page, off the event loop; a large
    log in worker processes, one per core (``broker.audit.parallel``), with the same report."""

    store: Store
    public_key: Ed25519PublicKey | None
    origin: str | None = None
    witness_file: Path | None = None
    # Logs of at least this many records are verified by ``workers`` processes (None: one per usable core,
    # parallel only with two or more), in stretches of at least ``stretch`` records.
    parallel_from: int = PARALLEL_FROM
    workers: int | None = None
    stretch: int = _STRETCH_LEAST
    # One parallel verification at a time: auditors asking together (GET /v1/audit/verify) wait their turn
    # instead of starting workers by the dozen, each with a store connection, beside the serving broker.
    _workers_gate: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False, compare=False)

    async def verify(self, *, witness_file: Path | None = None) -> VerifyReport:
        """Read everything and verify it. A witness that cannot be read is a failed verification, not an error.

        Raises:
            StoreUnavailable: the store cannot be read.
        """
        path = witness_file or self.witness_file
        witness: list[Checkpoint] = []
        if path is not None:
            try:
                witness = await asyncio.to_thread(read_witness, path)
            except CheckpointInvalid as exc:
                return VerifyReport(False, 0, 0, None, f"witness: {exc}")
        origin = self.origin or ""
        rows = await self.store.list_checkpoints()

        def fresh() -> LogVerifier:
            return LogVerifier([checkpoint_of(r, origin) for r in rows], self.public_key, witness, self.origin)
        verifier = fresh()
        workers = self.workers if self.workers is not None else min(usable_cores(), _MAX_WORKERS)
        if workers >= 2:
            last = await self.store.chain_end()
            source = await self.store.chain_source() if last >= self.parallel_from else None
            if source is not None:
                try:
                    async with self._workers_gate:
                        await verify_in_processes(source, verifier, last_seq=last, workers=workers,
                                                  least=self.stretch)
                    return verifier.finish()
                except OSError as exc:
                    # Still an answer, only slower: the same verification in this process.
                    log.warning("verifier workers failed (%s); verifying in this process", type(exc).__name__)
                    verifier = fresh()
        # Read the next page while this one is checked: SQLite reads largely outside the GIL.
        page = await self.store.chain_rows(after_seq=0, limit=_PAGE)
        while page and not verifier.failed:
            following = asyncio.ensure_future(self.store.chain_rows(after_seq=page[-1][0], limit=_PAGE))
            try:
                await asyncio.to_thread(verifier.feed_rows, page)
            finally:
                page = await following
        return verifier.finish()
