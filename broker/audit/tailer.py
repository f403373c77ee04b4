"""The Vault audit tailer: OpenBao's file audit device, merged into the broker's chain, exactly once.

What it keeps:

1. **A persisted position.** ``vault_audit_position`` holds the file (device, inode) and the offset just
   after the last merged line. The records merged from a batch of lines, the tokens learned from
   them and the new position commit in ONE store transaction (``Store.merge_vault_audit``), so a crash
   at any point either merged the whole batch and moved past it, or did neither: no entry is lost,
   none is merged twice. The move is a compare-and-set: a second tailer fails instead of duplicating.
2. **Complete lines only.** Bytes after the last ``\\n`` are left for the next poll (OpenBao may be
   in the middle of writing them). The position is therefore always at a line boundary.
3. **Rotation (rename + reopen).** OpenBao keeps writing to the renamed file until it reopens the path
   (SIGHUP) and creates a new file there. The tailer knows every file of the log by (device, inode),
   one position each: the file at the path and the rotated ones beside it (names starting with the
   path's name: ``audit.log.1``, ``audit.log-20261128``...). Each poll reads the oldest file that has
   unread complete lines, so a rotated file is finished (even while OpenBao still appends to it before
   the SIGHUP, and even after several rotations while the tailer was down) and a new file is read
   from 0. Files are kept open, so a rotated file renamed again or deleted can still be finished by
   a running tailer; a file that vanished before it was read to its last seen size is a gap.
4. **Truncation** (size below the offset: ``copytruncate``) restarts that file at 0. Gaps write a
   ``vault.audit_gap`` record, since entries may be missing, and count in metrics.
5. **First start.** With no stored position the tailer starts every existing file at its end (default,
   ``start="end"``: only what Vault writes from now on; the start of a line OpenBao is still writing is
   kept) or at its beginning (``start="beginning"``: everything the files still hold).
6. **Never blocks the loop.** File reads, parsing and classification happen in worker threads
   (``asyncio.to_thread``), at most ``chunk_bytes`` per poll; the store works on its own threads. The
   loop only awaits them. While catching up (a poll filled its chunk) they happen in a worker process
   instead, one chunk ahead of the store's commit (``broker.audit.ingest``); the store still numbers,
   hashes and commits every record, in the same one transaction per chunk. ``request`` entries (half
   the lines, dropped by the merge) are recognised by their opening bytes and never parsed
   (``vaultlog.is_request_line``). Polls run back to back
   only while a poll fills its chunk (catching up); otherwise the tailer waits ``poll_interval``, so
   a trickle of lines (a few per issuance) is merged in batches, not one poll per few lines.

With several broker replicas on one PostgreSQL store only one tails the files: the one holding the
``vault-audit-tailer`` singleton lease (broker.singletons). Without it a second tailer would not
duplicate anything (the position's compare-and-set refuses it) but would waste work and log conflicts.
A cluster's nodes each write their own file: ``broker.audit.tailers`` runs one tailer per file and
merges a Vault request once (``dedupe``).

Tokens with no metadata of their own (the agent's child token from a token-role grant) are attributed
through the HMAC'd accessor that their creating response names (``broker.vaultaudit.created_token``);
with ``hasher`` (``sys/audit-hash/<device>``, capability ``update``), the accessors of live token
leases are also hashed at start, for tokens created while no tailer was reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from broker.audit import AuditRecord
from broker.audit.canonical import RenderedRecord
from broker.audit.ingest import IngestWorker, PreparedChunk, WorkerFailed, parse_chunk
from broker.audit.vaultlog import DEFAULT_SKEW, TokenOrigin, classify_batch
from broker.errors import BrokerError
from broker.metrics import Metrics
from broker.rows import JournalEntry
from broker.store import Store, VaultAuditPosition

log = logging.getLogger(__name__)

StartAt = Literal["end", "beginning"]
Hasher = Callable[[str], Awaitable[str]]
_SEARCH_LIMIT = 1000  # directory entries looked at when listing rotated files
_MAX_FDS = 32  # files kept open (the current one and rotated ones not yet read to the end)

FileId = tuple[int, int]  # (device, inode)


@dataclass(frozen=True)
class _File:
    """One file of the audit log as a scan saw it: the current file at the path, or a rotated one."""

    id: FileId
    size: int
    mtime_ns: int
    current: bool  # it is the file at the configured path now
    named: bool  # still has a name in the directory (else only a file descriptor kept open reaches it)


class _FileReader:
    """Synchronous file work, run in a worker thread. Keeps files open so a rotated file can be finished
    even after it is renamed again or deleted."""

    def __init__(self, path: Path, chunk_bytes: int) -> None:
        self.path = path
        self.chunk = chunk_bytes
        self._fds: dict[FileId, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def forget(self, file_id: FileId) -> None:
        fd = self._fds.pop(file_id, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _names(self) -> list[Path]:
        """The path, then the rotated files beside it (``audit.log.1``, ``audit.log-2026...``)."""
        names = [self.path]
        with contextlib.suppress(OSError), os.scandir(self.path.parent) as it:
            for i, e in enumerate(it):
                if i >= _SEARCH_LIMIT:
                    break
                if e.name != self.path.name and e.name.startswith(self.path.name) and e.is_file(follow_symlinks=False):
                    names.append(Path(e.path))
        return names

    def scan(self) -> list[_File]:
        """Every file of the log: by name, then those only an open descriptor still reaches."""
        seen: dict[FileId, _File] = {}
        for name in self._names():
            try:
                st = os.stat(name)
            except OSError:
                continue
            fid = (st.st_dev, st.st_ino)
            if fid not in seen:
                seen[fid] = _File(fid, st.st_size, st.st_mtime_ns, current=name == self.path, named=True)
        for fid, fd in list(self._fds.items()):
            if fid not in seen:
                try:
                    st = os.fstat(fd)
                except OSError:
                    self.forget(fid)
                    continue
                seen[fid] = _File(fid, st.st_size, st.st_mtime_ns, current=False, named=False)
        return list(seen.values())

    def _fd(self, file_id: FileId) -> int | None:
        fd = self._fds.get(file_id)
        if fd is not None:
            return fd
        for name in self._names():
            try:
                st = os.stat(name)
                if (st.st_dev, st.st_ino) != file_id:
                    continue
                fd = os.open(name, os.O_RDONLY)
            except OSError:
                continue
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != file_id:  # renamed between stat and open
                os.close(fd)
                continue
            if len(self._fds) >= _MAX_FDS:
                self.forget(next(iter(self._fds)))
            self._fds[file_id] = fd
            return fd
        return None

    def read(self, file_id: FileId, offset: int) -> bytes | None:
        """Up to a chunk from ``offset``; None when the file cannot be reached. Raises: OSError."""
        fd = self._fd(file_id)
        return None if fd is None else os.pread(fd, self.chunk, offset)

    def line_start_before(self, file_id: FileId, size: int) -> int:
        """The start of the last (possibly unfinished) line before ``size``: where "start at the end" begins."""
        fd = self._fd(file_id)
        if fd is None or size == 0:
            return 0
        base = max(0, size - self.chunk)
        tail = os.pread(fd, size - base, base)
        cut = tail.rfind(b"\n")
        return base + cut + 1 if cut >= 0 else base

    def skip_line(self, file_id: FileId, offset: int) -> int:
        """The offset after the next newline at or beyond ``offset`` (or the end). Raises: OSError."""
        fd = self._fd(file_id)
        if fd is None:
            return offset
        for _ in range(1024):  # bounded: at most 1024 chunks
            data = os.pread(fd, self.chunk, offset)
            if not data:
                return offset
            cut = data.find(b"\n")
            if cut >= 0:
                return offset + cut + 1
            offset += len(data)
        return offset


@dataclass(frozen=True)
class _Sent:
    """A chunk sent to the ingest worker, ahead of the store's commit."""

    file_id: FileId
    offset: int
    size: int  # bytes read
    end: int  # bytes of complete lines
    answer: asyncio.Future[bytes]


_AHEAD = 2  # chunks in the worker's hands while the store commits one: it always has the next to prepare
# One poll's read, and so one merge transaction, while catching up. Since the ingest worker took the parsing
# away, the broker's share of a backlog is the chain's append, and that is per commit as much as per record:
# each transaction rewrites every page of the three random-keyed indexes (user, agent, task) it touched. Four
# times the lines per commit dirties far fewer than four times the pages (scripts/bench_audit.py: broker CPU
# per line 20-25 us against 25-30 at 1 MiB; docs/benchmarks.md, results P). A trickle never fills a chunk,
# so only a backlog's transactions grow: ~1,700 records, tens of ms of the store's writer.
CATCH_UP_CHUNK = 4 << 20
# After the worker fails, the merge stays in this process for a minute, then tries a new worker; each
# failure in a row doubles the wait, up to an hour (a worker that never works costs one start per hour).
_WORKER_RETRY = 60.0
_WORKER_RETRY_MAX = 3600.0


@dataclass(frozen=True)
class MergeResult:
    """What one poll did."""

    lines: int = 0
    invalid: int = 0
    requests: int = 0
    unexplained: int = 0
    switched: str | None = None
    more: bool = False  # complete lines may be left (the chunk was full, or another file has unread bytes)


class VaultAuditTailer:
    """Merges OpenBao's file audit device into the store's chain (see the module docstring)."""

    def __init__(
        self,
        *,
        store: Store,
        path: Path | str,
        broker_paths: Iterable[str],
        metrics: Metrics | None = None,
        start: StartAt = "end",
        poll_interval: float = 0.25,
        chunk_bytes: int = CATCH_UP_CHUNK,
        skew: float = DEFAULT_SKEW,
        hasher: Hasher | None = None,
        clock: Callable[[], float] = time.time,
        dedupe: bool = False,
        ingest_worker: bool = True,
    ) -> None:
        self._store = store
        self._path = Path(path)
        self._key = str(self._path)
        self._paths = frozenset(p.strip("/") for p in broker_paths)
        self._metrics = metrics or Metrics()
        self._start = start
        self._interval = poll_interval
        self._skew = skew
        self._hasher = hasher
        self._clock = clock
        self._reader = _FileReader(self._path, chunk_bytes)
        self._pos: dict[FileId, VaultAuditPosition] = {}
        self._sizes: dict[FileId, int] = {}
        self._current: FileId | None = None
        self._loaded = False
        # One of several nodes' files (broker.audit.tailers): merge a Vault request once across them.
        self._dedupe = dedupe
        # A worker process prepares whole chunks while catching up (broker.audit.ingest); off when no other
        # process can open the store (SQLite in memory), and for a while after it fails.
        self._use_worker = ingest_worker
        self._worker_retry_at = 0.0  # loop time before which a failed worker is not started again
        self._worker_backoff = _WORKER_RETRY
        self._worker: IngestWorker | None = None
        self._sent: deque[_Sent] = deque()
        self._reset = False  # the worker must forget what it learned from chunks dropped since the last job

    @property
    def path(self) -> Path:
        return self._path

    def reload(self) -> None:
        """Read the positions from the store again at the next step (another tailer may have moved them)."""
        self._loaded = False

    @property
    def ingest_worker(self) -> IngestWorker | None:
        """The worker process preparing chunks while this tailer catches up (None: not started, or off)."""
        return self._worker

    @property
    def position(self) -> VaultAuditPosition | None:
        """The position in the file now at the path (None before the first start)."""
        return self._pos.get(self._current) if self._current is not None else None

    async def run_forever(self) -> None:
        """Poll until cancelled. Failures (store down, file unreadable, a conflict) are logged and retried."""
        await self.seed_tokens()
        backoff = self._interval
        try:
            while True:
                try:
                    result = await self.step()
                    backoff = self._interval
                except asyncio.CancelledError:
                    raise
                except (BrokerError, OSError) as exc:
                    self._metrics.inc("broker_vault_audit_errors_total")
                    log.warning("vault audit tailer: %s; retrying", getattr(exc, "reason", type(exc).__name__))
                    self._loaded = False  # reload the position: another tailer may have moved it
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
                    continue
                # Back to back only while catching up. A trickle (a few lines per issuance) waits the
                # interval and is merged in one batch: each poll costs two store transactions.
                if not result.more and result.switched is None:
                    await asyncio.sleep(self._interval)
        finally:
            await self.aclose()

    async def seed_tokens(self) -> int:
        """Hash the accessors of live token leases with ``hasher`` (``sys/audit-hash``) and remember them.

        Returns how many tokens were learned; 0 without a hasher or when Vault refuses (logged once).
        """
        if self._hasher is None:
            return 0
        learned: dict[str, tuple[str, str | None]] = {}
        tokens = 0
        try:
            for lease, _task in await self._store.find_leases(states=("active",), limit=10_000):
                if lease.kind == "token":
                    tokens += 1
                    # Under both names a device may write it: HMAC'd (Vault's default) and, with
                    # hmac_accessor = false, the accessor itself (which the lease row holds already).
                    learned[await self._hasher(lease.vault_lease_id)] = (lease.task_id, lease.id)
                    learned[lease.vault_lease_id] = (lease.task_id, lease.id)
        except BrokerError as exc:
            log.warning("vault audit tailer: cannot hash live tokens' accessors (%s): tokens created while no "
                        "tailer ran are not attributed", exc.code)
            return 0
        await self._store.remember_vault_tokens(learned, now=self._clock())
        return tokens

    async def step(self) -> MergeResult:
        """One poll: merge at most one chunk of complete lines from the oldest file that has some.

        Raises:
            OSError: a file cannot be read.
            StoreUnavailable: the store cannot be written.
            Conflict: another tailer moved a position.
        """
        if not self._loaded:
            self._pos = {(p.device, p.inode): p for p in await self._store.vault_audit_positions(self._key)}
            self._loaded = True
        files = await asyncio.to_thread(self._reader.scan)
        self._current = next((f.id for f in files if f.current), None)
        if not self._pos:
            return await self._first_start(files)
        lag = sum(max(0, f.size - self._pos[f.id].offset) if f.id in self._pos else f.size for f in files)
        self._metrics.set("broker_vault_audit_lag_bytes", float(lag))
        ids = {f.id for f in files}
        gone = [p for fid, p in self._pos.items() if fid not in ids]
        # Oldest first (a rotated file stops growing before the next one starts); the current file last.
        for f in sorted(files, key=lambda f: (f.mtime_ns, f.current)):
            self._sizes[f.id] = f.size
            known = self._pos.get(f.id)
            offset = known.offset if known is not None else 0
            if f.size < offset:
                return await self._restart(f, known, "truncated", gone)
            if f.size == offset:
                if not f.current and known is not None:
                    self._reader.forget(f.id)  # read to the end; reopened by name if it grows again
                continue
            sent = self._sent_for(f.id, offset)
            if sent is not None and (prepared := await self._answer(sent)) is not None:
                more = sent.size >= self._reader.chunk or self._others_unread(f, files)
                return await self._merge_prepared(f, known, offset, sent.size, sent.end, prepared, gone, more)
            data = await asyncio.to_thread(self._reader.read, f.id, offset)
            if data is None:
                continue
            cut = data.rfind(b"\n")
            if cut >= 0:
                more = len(data) >= self._reader.chunk or self._others_unread(f, files)
                # Not cut to its complete lines (a megabyte copied): the parse leaves the unfinished one out.
                return await self._merge(f, known, offset, data, cut + 1, gone, more)
            if len(data) >= self._reader.chunk:
                # A "line" longer than a chunk is no audit entry: skip it rather than stall.
                end = await asyncio.to_thread(self._reader.skip_line, f.id, offset)
                new = VaultAuditPosition(self._key, f.id[0], f.id[1], end, known.lines if known else 0,
                                         known.last_entry_at if known else None)
                await self._commit([(known, new)], [], {}, gone)
                self._metrics.inc("broker_vault_audit_invalid_lines_total")
                return MergeResult(switched="skipped")
            # Only an unfinished line here (OpenBao is writing it): look at the other files.
        return MergeResult()

    def _others_unread(self, f: _File, files: list[_File]) -> bool:
        return any(g.id != f.id and g.size > (self._pos[g.id].offset if g.id in self._pos else 0) for g in files)

    async def _first_start(self, files: list[_File]) -> MergeResult:
        """No stored position: every file of the log starts at its end (or its beginning)."""
        if not files:
            # The file is created after this tailer first looked (a cluster node's device writes its file
            # when that node first serves): all it will hold is new, so it is read from its beginning.
            self._start = "beginning"
            return MergeResult()
        moves: list[tuple[VaultAuditPosition | None, VaultAuditPosition]] = []
        for f in files:
            offset = 0
            if self._start == "end":
                offset = await asyncio.to_thread(self._reader.line_start_before, f.id, f.size)
            moves.append((None, VaultAuditPosition(self._key, f.id[0], f.id[1], offset, 0)))
        await self._commit(moves, [], {}, [])
        return MergeResult(switched="start")

    async def _restart(self, f: _File, known: VaultAuditPosition | None, why: str,
                       gone: list[VaultAuditPosition]) -> MergeResult:
        offset = known.offset if known is not None else 0
        record = AuditRecord(self._clock(), "vault.audit_gap", "failure", resource=self._key, action="tail",
                             reason=f"Vault audit file {why} below offset {offset}: entries may be missing")
        new = VaultAuditPosition(self._key, f.id[0], f.id[1], 0, known.lines if known else 0,
                                 known.last_entry_at if known else None)
        await self._commit([(known, new)], [record], {}, gone)
        self._metrics.inc("broker_vault_audit_gaps_total")
        log.warning("vault audit tailer: %s was %s; restarted it at 0", self._key, why)
        return MergeResult(switched=why)

    async def _commit(self, moves: list[tuple[VaultAuditPosition | None, VaultAuditPosition]],
                      records: list[AuditRecord | RenderedRecord], tokens: dict[str, tuple[str, str | None]],
                      gone: list[VaultAuditPosition], journal: list[JournalEntry] | None = None) -> None:
        """One transaction: records, tokens, positions; files that no longer exist are forgotten with it.

        A vanished file that had not been read to its last known size is a gap, recorded as such.
        """
        records = list(records)
        for p in gone:
            seen = self._sizes.pop((p.device, p.inode), 0)
            if p.offset < seen:
                records.append(AuditRecord(self._clock(), "vault.audit_gap", "failure", resource=self._key,
                                           action="tail", reason=f"a rotated Vault audit file vanished "
                                                                 f"{seen - p.offset} bytes before its end"))
                self._metrics.inc("broker_vault_audit_gaps_total")
        await self._store.merge_vault_audit(moves=moves, records=records, tokens=tokens, now=self._clock(),
                                            drop=gone, journal=journal or [], dedupe=self._dedupe)
        for old, new in moves:
            fid = (new.device, new.inode)
            if old is None and self._pos:
                self._metrics.inc("broker_vault_audit_rotations_total")
            self._pos[fid] = new
        for p in gone:
            self._pos.pop((p.device, p.inode), None)

    async def _merge(self, f: _File, known: VaultAuditPosition | None, offset: int, data: bytes, end: int,
                     gone: list[VaultAuditPosition], more: bool) -> MergeResult:
        """Merge the complete lines of ``data`` (its first ``end`` bytes), read at ``offset``."""
        if len(data) >= self._reader.chunk and (worker := await self._worker_ready()) is not None:
            try:
                sent = await self._send(worker, f.id, offset, data, end)
                prepared = await worker.result(sent.answer)
            except WorkerFailed as exc:
                await self._worker_failed(exc)
            else:
                return await self._merge_prepared(f, known, offset, len(data), end, prepared, gone, more)
        # Parsing and classifying are CPU work: a worker thread does them, the loop only awaits the
        # results and the store (which has its own thread).
        chunk = await asyncio.to_thread(parse_chunk, data)
        tasks, learned = await self._store.vault_audit_context(chunk.task_ids, chunk.accessors)
        records, fresh = await asyncio.to_thread(
            classify_batch, chunk.responses, known_tasks=tasks.get, broker_paths=self._paths,
            tokens={a: TokenOrigin(t, lease) for a, (t, lease) in learned.items()}, skew=self._skew)
        new = self._moved(f, known, offset, end, chunk.lines, chunk.last_entry_at)
        await self._commit([(known, new)], list(records), {a: (o.task, o.lease) for a, o in fresh.items()}, gone,
                           chunk.journal)
        requests = sum(r.event == "vault.request" for r in records)
        unexplained = sum(r.event == "vault.unexplained" for r in records)
        return self._merged(chunk.lines, chunk.invalid, requests, unexplained, more)

    async def _merge_prepared(self, f: _File, known: VaultAuditPosition | None, offset: int, size: int, end: int,
                              prepared: PreparedChunk, gone: list[VaultAuditPosition], more: bool) -> MergeResult:
        """Commit a chunk the worker prepared; while catching up, the next ones go to the worker first."""
        new = self._moved(f, known, offset, end, prepared.lines, prepared.last_entry_at)
        # Beside the commit, not before it: the store's thread and the worker both have work meanwhile.
        fill = (asyncio.create_task(self._fill(self._worker, f.id, new.offset))
                if size >= self._reader.chunk and self._worker is not None else None)
        try:
            await self._commit([(known, new)], list(prepared.records), prepared.tokens, gone, prepared.journal)
        except BaseException:
            if fill is not None:
                await asyncio.wait([fill])  # never cancelled halfway through a job
            self._discard_sent()  # prepared after a commit that did not happen
            raise
        if fill is not None:
            await fill
        self._worker_backoff = _WORKER_RETRY  # the worker works: a later failure waits the least again
        return self._merged(prepared.lines, prepared.invalid, prepared.requests, prepared.unexplained, more)

    def _moved(self, f: _File, known: VaultAuditPosition | None, offset: int, end: int, lines: int,
               last_entry_at: float | None) -> VaultAuditPosition:
        seen = [t for t in (known.last_entry_at if known else None, last_entry_at) if t is not None]
        return VaultAuditPosition(self._key, f.id[0], f.id[1], offset + end, (known.lines if known else 0) + lines,
                                  max(seen) if seen else None)

    def _merged(self, lines: int, invalid: int, requests: int, unexplained: int, more: bool) -> MergeResult:
        m = self._metrics
        m.inc("broker_vault_audit_lines_total", lines)
        m.inc("broker_vault_audit_invalid_lines_total", invalid)
        m.inc("broker_vault_audit_requests_total", requests)
        m.inc("broker_vault_audit_unexplained_total", unexplained)
        if unexplained:
            log.warning("vault audit: %d request(s) the broker cannot explain", unexplained)
        return MergeResult(lines=lines, invalid=invalid, requests=requests, unexplained=unexplained, more=more)

    # -- the ingest worker (broker.audit.ingest) ---------------------------------------------------------

    async def _worker_ready(self) -> IngestWorker | None:
        """The ingest worker, started on first use; None when it is off or waiting after a failure."""
        if self._worker is None and self._use_worker and asyncio.get_running_loop().time() >= self._worker_retry_at:
            source = await self._store.ingest_source()
            if source is None:
                self._use_worker = False
                return None
            self._worker = IngestWorker(source, broker_paths=self._paths, skew=self._skew)
        return self._worker

    async def _worker_failed(self, exc: WorkerFailed) -> None:
        """Merge in this process for a while: the chunk is not lost, only slower to merge."""
        log.warning("vault audit tailer: %s; merging in the broker's process for %.0f s", exc, self._worker_backoff)
        self._metrics.inc("broker_vault_audit_worker_failures_total")
        self._discard_sent()
        self._worker_retry_at = asyncio.get_running_loop().time() + self._worker_backoff
        self._worker_backoff = min(self._worker_backoff * 2, _WORKER_RETRY_MAX)
        worker, self._worker = self._worker, None
        if worker is not None:
            await worker.close()

    async def _send(self, worker: IngestWorker, file_id: FileId, offset: int, data: bytes, end: int) -> _Sent:
        answer = await worker.submit(data, reset=self._reset)
        self._reset = False
        return _Sent(file_id, offset, len(data), end, answer)

    async def _fill(self, worker: IngestWorker, file_id: FileId, offset: int) -> None:
        """Send the chunks after ``offset`` (where this commit leaves the file) until ``_AHEAD`` are out."""
        at = self._sent[-1].offset + self._sent[-1].end if self._sent else offset
        try:
            while len(self._sent) < _AHEAD:
                data = await asyncio.to_thread(self._reader.read, file_id, at)
                if data is None or (cut := data.rfind(b"\n")) < 0:
                    return
                self._sent.append(await self._send(worker, file_id, at, data, cut + 1))
                if len(data) < self._reader.chunk:
                    return  # the end of what is written: the next poll sees whether more came
                at += cut + 1
        except WorkerFailed as exc:
            await self._worker_failed(exc)

    def _sent_for(self, file_id: FileId, offset: int) -> _Sent | None:
        """The chunk sent for where this file's position is now; if the next one sent is another, all are
        dropped (a rotation, a truncation or a failed commit came between)."""
        if self._sent and (self._sent[0].file_id, self._sent[0].offset) == (file_id, offset):
            return self._sent.popleft()
        self._discard_sent()
        return None

    async def _answer(self, sent: _Sent) -> PreparedChunk | None:
        """The worker's answer for a chunk sent; None to merge it here instead (the worker failed)."""
        assert self._worker is not None
        try:
            return await self._worker.result(sent.answer)
        except WorkerFailed as exc:
            await self._worker_failed(exc)
            return None
        except BaseException:
            self._discard_sent()
            raise

    def _discard_sent(self) -> None:
        """Drop the chunks sent: preparing writes nothing, so they are only work lost. The worker forgets
        the tokens it learned from them at its next job; their answers are collected and ignored."""
        self._reset = True  # none in flight: nothing the worker remembers is needed any more
        while self._sent:
            self._sent.popleft().answer.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def catch_up(self, *, max_polls: int = 10_000) -> int:
        """Poll until nothing is left to merge (for tests and one-shot runs); the lines merged.

        Raises: OSError, StoreUnavailable, Conflict.
        """
        total = 0
        for _ in range(max_polls):
            r = await self.step()
            total += r.lines
            if not r.lines and r.switched is None:
                return total
        return total

    async def aclose(self) -> None:
        """Close the files, and end the ingest worker (its stdin closes and it exits)."""
        self._discard_sent()
        worker, self._worker = self._worker, None
        if worker is not None:
            await worker.close()
        self._reader.close()

    def close(self) -> None:
        """Close the files, and kill the ingest worker (from code that cannot await: :meth:`aclose`)."""
        self._discard_sent()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill()
        self._reader.close()


__all__ = ["CATCH_UP_CHUNK", "MergeResult", "VaultAuditTailer"]
