"""Preparing Vault's audit lines for the chain, and a worker process that does it beside the tailer.

Everything a chunk of OpenBao's file audit device needs before it can be appended is pure work on its
bytes: parse the response lines, look up the tasks and learned tokens they name, classify them into
records (learning the tokens they create), redact those and write out their canonical bytes around the
seq (``broker.audit.canonical.RenderedRecord``). Only numbering, hashing and inserting them needs the
chain's head, inside the store's transaction. :func:`prepare_chunk` is the first part.

While the tailer catches up (a backlog of whole chunks) the first part runs in a worker process,
``python -m broker.audit.ingest``, ahead of the store: it prepares chunks k+1 and k+2 while the broker's
store commits chunk k. Threads cannot share this work (the parse and the classification hold the GIL, and a
thread that parses ahead slowed the store's own thread more than it saved: docs/architecture.md), a
process can. The worker reads the store with its own read-only connection (``Store.ingest_source``), and
writes nothing: the merge stays one transaction in the broker (``Store.merge_vault_audit``), so a crash of
either process loses nothing and repeats nothing, as before.

The one thing the worker's connection cannot see is what the broker has not committed yet: the tokens
learned from the chunks ahead of the store's commit. The worker keeps the tokens it learned from its
last few chunks (``_RECENT``, more than the tailer keeps in flight) and adds them to what it looks up;
tokens are only ever added and the first learning stands, so that is what the store will hold once the
chunks before are in. When the tailer drops chunks it had sent (a commit failed, a file was truncated or
rotated under it), its next job says ``reset`` and the worker forgets them.

Like the parallel verifier's workers (``broker.audit.parallel``), the worker is a new interpreter started
with ``-m`` (never a fork of a process with threads), talking over its stdin and stdout: each job is a
chunk's bytes as they are behind a small header (length, ``reset``), each answer a msgpack message behind
its length, in order. It ends when its stdin closes, so it cannot outlive the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib
import json
import logging
import os
import queue
import struct
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

import msgspec

from broker.audit.canonical import RenderedRecord, render_record
from broker.audit.parallel import worker_env
from broker.audit.vaultlog import TokenOrigin, VaultAuditEntry, classify_batch, parse_responses
from broker.journal import entries_of as journal_entries
from broker.journal import issued_entries_of as issued_entries
from broker.rows import JournalEntry, LookupSource, TaskRow

__all__ = ["IngestWorker", "ParsedChunk", "PreparedChunk", "parse_chunk", "prepare_chunk"]

log = logging.getLogger(__name__)

Learned = dict[str, tuple[str, str | None]]  # HMAC'd accessor -> (task, lease)
# (task ids, accessors) -> (the tasks named, directly or by a learned token; the learned tokens among the accessors)
Lookup = Callable[[Sequence[str], Sequence[str]], tuple[dict[str, TaskRow], Learned]]


class ParsedChunk(msgspec.Struct, frozen=True, gc=False):
    """A chunk of complete lines, parsed: its response entries and what must be looked up for them."""

    lines: int
    invalid: int
    responses: list[VaultAuditEntry]
    task_ids: list[str]
    accessors: list[str]
    journal: list[JournalEntry]
    last_entry_at: float | None  # Vault's time of the newest journal entry parsed (broker.journal rule 2)


def parse_chunk(data: bytes) -> ParsedChunk:
    """Parse the complete lines of a chunk: request entries are skipped unparsed.

    Bytes after the last newline (a line OpenBao is still writing) are no line and are left out.
    """
    lines = data.split(b"\n")[:-1]
    responses, invalid = parse_responses(lines)
    task_ids = [t for e in responses if e.auth is not None and (t := e.auth.metadata.get("task"))]
    accessors = [e.auth.accessor for e in responses
                 if e.auth is not None and e.auth.accessor and "task" not in e.auth.metadata]
    journal = journal_entries(responses)
    # Only entries that carry the journal's header move its mark (broker.journal rule 2): if Vault stopped
    # recording the header, the mark stops, and no absence is concluded from a log that no longer says.
    last = max((e.at for e in journal), default=None)
    journal += issued_entries(responses)  # for the late-answer sweep only (broker.journal rule 7)
    return ParsedChunk(len(lines), invalid, responses, task_ids, accessors, journal, last)


class PreparedChunk(msgspec.Struct, frozen=True, gc=False):
    """A chunk ready for the chain: its records rendered, the tokens it taught, its journal entries."""

    lines: int
    invalid: int
    records: list[RenderedRecord]
    tokens: Learned  # learned from this chunk (not known before it)
    journal: list[JournalEntry]
    last_entry_at: float | None
    requests: int  # records that are ``vault.request``
    unexplained: int  # records that are ``vault.unexplained``


def prepare_chunk(data: bytes, *, lookup: Lookup, pending: Mapping[str, tuple[str, str | None]],
                  broker_paths: Iterable[str], skew: float) -> PreparedChunk:
    """Parse, look up, classify and render a chunk, as the tailer's in-process merge does.

    ``pending`` holds tokens learned from earlier chunks that the store may not hold yet.
    """
    chunk = parse_chunk(data)
    # The tasks of tokens learned ahead of the store are looked up too: the store cannot name them yet.
    tasks, learned = lookup(chunk.task_ids + [pending[a][0] for a in chunk.accessors if a in pending],
                            [a for a in chunk.accessors if a not in pending])
    known = {**pending, **learned}  # the same origins: the first learning of a token stands
    records, fresh = classify_batch(
        chunk.responses, known_tasks=tasks.get, broker_paths=broker_paths,
        tokens={a: TokenOrigin(t, lease) for a, (t, lease) in known.items()}, skew=skew)
    events = [r.event for r in records]
    return PreparedChunk(chunk.lines, chunk.invalid, [render_record(r) for r in records],
                         {a: (o.task, o.lease) for a, o in fresh.items()}, chunk.journal, chunk.last_entry_at,
                         events.count("vault.request"), events.count("vault.unexplained"))


# -- the worker process -------------------------------------------------------------------------------

_LENGTH = struct.Struct("<I")
# A job: the chunk's length and whether to forget the tokens learned from earlier jobs (the tailer dropped
# them), then the chunk's bytes as read: not wrapped in msgpack, which would copy megabytes to say nothing.
_JOB = struct.Struct("<IB")


class _Answer(msgspec.Struct, frozen=True, array_like=True):
    error: str | None  # the DB-API's exception class when the look-up failed
    chunk: PreparedChunk | None


class _Lookups:
    """The store's look-ups (``Store.vault_audit_context``) on the worker's own read-only connection."""

    def __init__(self, source: LookupSource) -> None:
        self._source = source
        dbapi = importlib.import_module(source.module)
        self.error: type[Exception] = dbapi.Error
        self._conn = dbapi.connect(*source.args, **source.kwargs)
        if source.module != "sqlite3":
            # Each query sees what is committed now; no transaction is left open between chunks.
            self._conn.autocommit = True

    @staticmethod
    def _params(order: tuple[str, ...] | None, values: dict[str, Any]) -> Any:
        return tuple(values[k] for k in order) if order is not None else values

    def __call__(self, task_ids: Sequence[str], accessors: Sequence[str]) -> tuple[dict[str, TaskRow], Learned]:
        s = self._source
        cur = self._conn.cursor()
        learned: Learned = {}
        for accessor in set(accessors):
            cur.execute(s.token_sql, self._params(s.token_order, {"accessor": accessor}))
            hit = cur.fetchone()
            if hit is not None:
                learned[hit[0]] = (hit[1], hit[2])
        found: dict[str, TaskRow] = {}
        for task_id in set(task_ids) | {t for t, _ in learned.values()}:
            cur.execute(s.task_sql, self._params(s.task_order, {"id": task_id}))
            row = cur.fetchone()
            if row is not None:
                found[task_id] = TaskRow(**dict(zip((d[0] for d in cur.description), row, strict=True)))
        return found, learned


def _read_message(stream: IO[bytes]) -> bytes | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    (n,) = _LENGTH.unpack(head)
    body = stream.read(n)
    return body if len(body) == n else None


def _read_job(stream: IO[bytes]) -> tuple[bytes, bool] | None:
    """The next job's (chunk, reset); None when the broker closed the pipe (or died mid-job)."""
    head = stream.read(_JOB.size)
    if len(head) < _JOB.size:
        return None
    n, reset = _JOB.unpack(head)
    data = stream.read(n)
    return (data, bool(reset)) if len(data) == n else None


def serve(stdin: IO[bytes] | None = None, stdout: IO[bytes] | None = None) -> None:
    """A worker's loop: its settings as a JSON line, then one job per message, one answer each, in order."""
    stdin, stdout = stdin or sys.stdin.buffer, stdout or sys.stdout.buffer
    settings = json.loads(stdin.readline())
    d = settings["source"]
    source = LookupSource(d["module"], tuple(d["args"]), d["kwargs"], d["token_sql"],
                          tuple(d["token_order"]) if d["token_order"] is not None else None, d["task_sql"],
                          tuple(d["task_order"]) if d["task_order"] is not None else None)
    paths = frozenset(settings["broker_paths"])
    skew = float(settings["skew"])
    try:
        lookups = _Lookups(source)
    except Exception as exc:  # noqa: BLE001 -- any DB-API's error; the broker sees the pipe close
        # One line, no traceback: a connection error's text is the driver's, and only its name is needed.
        sys.exit(f"broker.audit.ingest: cannot open the store ({type(exc).__name__})")
    encoder = msgspec.msgpack.Encoder()
    recent: deque[Learned] = deque(maxlen=_RECENT)
    while (job := _read_job(stdin)) is not None:
        data, reset = job
        if reset:
            recent.clear()
        pending = {a: o for learned in recent for a, o in learned.items()}
        try:
            chunk = prepare_chunk(data, lookup=lookups, pending=pending, broker_paths=paths, skew=skew)
        except lookups.error as exc:
            answer = _Answer(type(exc).__name__, None)
        else:
            recent.append(chunk.tokens)
            answer = _Answer(None, chunk)
        out = encoder.encode(answer)
        stdout.write(_LENGTH.pack(len(out)))
        stdout.write(out)
        stdout.flush()


class WorkerFailed(OSError):
    """The ingest worker could not be started, or stopped answering."""


class IngestWorker:
    """The broker's side of one worker process: :meth:`submit` sends a chunk, :meth:`result` awaits it.

    Jobs may be several in flight, so the worker always has the next chunk to hand. One thread writes
    them, in the order submitted, with blocking writes; another reads the answers the same way and hands
    each to the oldest job waiting. Not asyncio's pipes: a chunk larger than the pipe's free space was
    buffered and written from the loop piece by piece, each piece moving the rest of the buffer along
    (a 4 MiB chunk on a 1 MiB pipe, the limit without privilege: 13% of the broker's GIL-held samples
    while catching up, docs/architecture.md), and its
    reads came back to the loop 64-256 KiB at a time, each waiting for the GIL behind the store thread's
    commit. :meth:`close` ends the process; a job then in flight fails.
    """

    def __init__(self, source: LookupSource, *, broker_paths: Iterable[str], skew: float) -> None:
        self._settings = json.dumps({"source": asdict(source), "broker_paths": sorted(broker_paths),
                                     "skew": skew}).encode() + b"\n"
        self._proc: asyncio.subprocess.Process | None = None
        self._waiting: deque[asyncio.Future[bytes]] = deque()
        self._jobs: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._answers = msgspec.msgpack.Decoder(_Answer)

    @property
    def pid(self) -> int | None:
        """The worker process's id while it runs."""
        return self._proc.pid if self._proc is not None else None

    async def _started(self) -> asyncio.subprocess.Process:
        if self._proc is None:
            loop = asyncio.get_running_loop()
            job_read, job_write = os.pipe()  # blocking, both: each is used by one thread only
            read_fd, write_fd = os.pipe()
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "broker.audit.ingest", stdin=job_read, stdout=write_fd,
                    env=worker_env())
            except BaseException:
                os.close(read_fd)
                os.close(job_write)
                raise
            finally:
                os.close(write_fd)
                os.close(job_read)
            for fd in (read_fd, job_write):
                with contextlib.suppress(OSError):  # a narrower pipe only means more round trips
                    fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
            self._proc = proc
            waiting = self._waiting = deque()
            jobs = self._jobs = queue.SimpleQueue()
            jobs.put(_Write((self._settings,), None))
            threading.Thread(target=_write_jobs, args=(loop, job_write, jobs),
                             name="broker-ingest-jobs", daemon=True).start()
            threading.Thread(target=self._read_answers, args=(loop, read_fd, waiting),
                             name="broker-ingest-answers", daemon=True).start()
        return self._proc

    def _read_answers(self, loop: asyncio.AbstractEventLoop, fd: int,
                      waiting: deque[asyncio.Future[bytes]]) -> None:
        """The reader thread: each answer to the oldest job waiting, in order; at the end, fail the rest."""
        with open(fd, "rb") as stream:  # buffered: read(n) returns n bytes unless the pipe closed
            try:
                while (body := _read_message(stream)) is not None:
                    loop.call_soon_threadsafe(_deliver, waiting, body)
            except OSError:
                pass
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                    loop.call_soon_threadsafe(_fail_all, waiting)

    async def submit(self, data: bytes, *, reset: bool = False) -> asyncio.Future[bytes]:
        """Send a chunk to be prepared; the future holds the answer's bytes (for :meth:`result`).

        Raises:
            WorkerFailed: the worker could not be started, its pipe is closed, or it took no job for
                ``_ANSWER_TIMEOUT`` (stopped: the tailer then merges in its own process).
        """
        try:
            await self._started()
        except OSError as exc:
            self.kill()
            raise WorkerFailed(f"the Vault audit ingest worker did not start ({type(exc).__name__})") from exc
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        written: asyncio.Future[None] = loop.create_future()
        written.add_done_callback(lambda f: f.cancelled() or f.exception())  # told even after a timeout
        # Queued in the same step of the loop as its answer is: the jobs are written in the order their
        # answers are awaited. A submit cancelled meanwhile still has its job written whole, and answered.
        self._waiting.append(fut)
        self._jobs.put(_Write((_JOB.pack(len(data), reset), data), written))
        try:
            # The pipe took it. A worker that stopped reading would otherwise hold the tailer here for good.
            await asyncio.wait_for(asyncio.shield(written), _ANSWER_TIMEOUT)
        except TimeoutError:
            self.kill()
            raise WorkerFailed(f"the Vault audit ingest worker took no job within {_ANSWER_TIMEOUT:g} s") from None
        except OSError as exc:
            self.kill()
            raise WorkerFailed(f"the Vault audit ingest worker stopped ({type(exc).__name__})") from exc
        return fut

    async def result(self, fut: asyncio.Future[bytes]) -> PreparedChunk:
        """The chunk prepared for a job :meth:`submit` sent.

        Raises:
            WorkerFailed: the worker died before it answered, did not answer within ``_ANSWER_TIMEOUT``
                (stopped, or stuck on the store: the tailer then merges in its own process), or could not
                read the store.
        """
        try:
            body = await asyncio.wait_for(fut, _ANSWER_TIMEOUT)
        except TimeoutError:
            raise WorkerFailed(f"the Vault audit ingest worker did not answer within {_ANSWER_TIMEOUT:g} s") from None
        # Decoding a chunk's records is ~1 ms of CPU: in a thread, not on the loop.
        answer = await asyncio.to_thread(self._answers.decode, body)
        if answer.error is not None or answer.chunk is None:
            # Not retried here: the broker's own connection may still read the store, and a worker that
            # cannot would otherwise stall the merge at this chunk.
            raise WorkerFailed(f"the Vault audit ingest worker could not read the store ({answer.error})")
        return answer.chunk

    async def prepare(self, data: bytes) -> PreparedChunk:
        """:meth:`submit` and :meth:`result` in one."""
        return await self.result(await self.submit(data))

    async def close(self) -> None:
        """End the worker: its stdin closes and it exits; killed if it does not within a second."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._jobs.put(None)  # the writer closes the pipe after the jobs before: the worker's stdin ends
        try:
            await asyncio.wait_for(proc.wait(), 1.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def kill(self) -> None:
        """End the worker now, without waiting (from synchronous code: the tailer's ``close``).

        On a running loop the process is also reaped, so that its transport closes while the loop is
        there to close it (else it is finalized after the loop closed, and warns).
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._jobs.put(None)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        try:
            reap = asyncio.get_running_loop().create_task(proc.wait())
        except RuntimeError:
            return  # no loop: the process is killed, and nothing can reap it here
        _REAPING.add(reap)
        reap.add_done_callback(_REAPING.discard)


# Reaps of killed workers in flight: a task the loop holds only weakly would be collected unfinished.
_REAPING: set[asyncio.Task[int]] = set()
_PIPE_BYTES = 4 << 20  # a few chunks and their answers; Linux caps it at fs.pipe-max-size without privilege
_RECENT = 8  # jobs whose tokens the worker keeps: more than the tailer keeps in flight
# A chunk takes the worker milliseconds; a worker silent this long is wedged, and nothing else would end the wait.
_ANSWER_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class _Write:
    """Bytes for the worker's stdin, and the future told when the pipe has taken them (None: nobody asks)."""

    parts: tuple[bytes, ...]
    done: asyncio.Future[None] | None


def _write_jobs(loop: asyncio.AbstractEventLoop, fd: int, jobs: queue.SimpleQueue[_Write | None]) -> None:
    """The writer thread: each job whole, in order, with blocking writes (the GIL is released while the
    kernel copies); ``None`` closes the pipe. After a failed write every later job fails the same way."""
    failed: OSError | None = None
    try:
        while (job := jobs.get()) is not None:
            if failed is None:
                try:
                    for part in job.parts:
                        view = memoryview(part)
                        while view:
                            view = view[os.write(fd, view):]
                except OSError as exc:  # the worker is gone (EPIPE): its answers fail too
                    failed = exc
            if job.done is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                    loop.call_soon_threadsafe(_settle, job.done, failed)
    finally:
        os.close(fd)


def _settle(fut: asyncio.Future[None], exc: OSError | None) -> None:
    if not fut.done():
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


def _deliver(waiting: deque[asyncio.Future[bytes]], body: bytes) -> None:
    if waiting:
        fut = waiting.popleft()
        if not fut.done():  # a job whose awaiter gave up: its answer is dropped, the pairing kept
            fut.set_result(body)


def _fail_all(waiting: deque[asyncio.Future[bytes]]) -> None:
    while waiting:
        fut = waiting.popleft()
        if not fut.done():
            fut.set_exception(WorkerFailed("the Vault audit ingest worker stopped before it answered"))


if __name__ == "__main__":
    serve()
