"""The store's engine and its one hop to the store thread: every public method runs one whole transaction there.

**Group commit on SQLite.** SQLite has one writer, so one thread runs every operation. Each used to
commit on its own: with ``synchronous=FULL`` that is a WAL write and an fsync per operation, most of the
store's CPU per credential at concurrency. Operations that arrive while the thread is busy now run as one
group: one ``BEGIN IMMEDIATE``, each operation inside its own ``SAVEPOINT`` (so one that fails rolls back
alone and raises to its own caller), and one ``COMMIT``. No caller learns its result before that commit:
a credential's ``lease.issued`` record is still durable before the credential is returned, and a failed
commit fails every operation of its group. A lone operation runs as before, in its own transaction.
PostgreSQL runs operations on several threads and leaves group commit to the server.

The SQLite thread is the store's own, fed by a ``queue.SimpleQueue``, not a ``ThreadPoolExecutor``: a
submission there built a ``Future`` with its own lock for every operation, and each answer woke the
event loop on its own. Here a group's answers reach each event loop in one wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from sqlalchemy import (
    Connection,
    Engine,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from broker.errors import (
    StoreUnavailable,
)
from broker.store.schema import (
    health_probe,
)
from broker.store.statements import _PROBE
from broker.store.walcheckpoint import WalCheckpointer

__all__ = ["StoreBase"]

log = logging.getLogger("broker.store")
T = TypeVar("T")

# At most this many operations share one commit: a bound on how long the first one waits for the last.
_GROUP_MAX = 64

# (work, its event loop, its future, whether its commit must reach the disk before the answer)
_Job = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]", bool]
_Outcome = tuple[bool, Any]
_STOP = None  # the store thread's last job (``close``)


def _answer(answers: Sequence[tuple[asyncio.Future[Any], _Outcome]]) -> None:
    """On a job's event loop: hand each caller its outcome."""
    for fut, (ok, value) in answers:
        if fut.done():  # its caller was cancelled; the work itself ran, as an executor job's would
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


MIN_FREE_BYTES = 1 << 20  # below a mebibyte free, a SQLite store's disk counts as full (probe_write)


def _free_bytes(database: str) -> int | None:
    """Bytes an unprivileged writer may still use on the file system holding ``database`` (None: unknown)."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(database)))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class StoreBase:
    def __init__(self, engine: Engine, *, sqlite: bool, threads: int = 4,
                 checkpointer: WalCheckpointer | None = None) -> None:
        self._engine = engine
        self._checkpointer = checkpointer
        # A SQLite store in a file: the file, whose disk the write probe also looks at.
        self._database = checkpointer.database if checkpointer is not None else None
        if checkpointer is not None:
            checkpointer.start()
        # SQLite has one writer (and here one connection): one thread serialises every transaction,
        # which is what SQLite would do anyway, without "database is locked" retries.
        self._observe: Callable[[float, bool], None] | None = None
        self._group_conn: Connection | None = None  # the store thread's side: the open group's connection
        # SQLite: the store thread's one connection, kept checked out (a checkout per operation, its
        # events and its reset cost more than a small operation's statements); None until first used.
        self._conn: Connection | None = None
        self._lone = False  # a lone operation runs: its _tx/_read use self._conn
        self._in_tx = False  # inside a lone operation's _tx
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()  # put on loops, taken on the store thread
        self._thread: threading.Thread | None = None
        self._closed = False
        if sqlite:
            self._thread = threading.Thread(target=self._serve, name="broker-store", daemon=True)
            self._thread.start()
        else:
            self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="broker-store")

    def observe_with(self, observe: Callable[[float, bool], None] | None) -> None:
        """Call ``observe(seconds, failed)`` after every transaction (``broker.metrics``), on the event loop."""
        self._observe = observe

    async def close(self) -> None:
        checkpointer, self._checkpointer = self._checkpointer, None
        if checkpointer is not None:
            await asyncio.to_thread(checkpointer.stop)
        if self._thread is None:
            assert self._executor is not None
            await asyncio.get_running_loop().run_in_executor(self._executor, self._engine.dispose)
            self._executor.shutdown(wait=True)
            return
        if self._closed:
            return
        # The store thread closes its connection itself, after the jobs queued before this one: a dispose run
        # as a job could share a group with them and close the connection under their transaction.
        self._closed = True
        self._jobs.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    def _dbapi_target(self) -> tuple[str, tuple[Any, ...], dict[str, Any]] | None:
        """How another process connects to this database for reading: the DB-API module's name and its
        connection arguments; None when no other process can open it (SQLite in memory or by URI)."""
        engine = self._engine
        if engine.dialect.name == "sqlite":
            database = engine.url.database
            if not database or database == ":memory:" or database.startswith("file:"):
                return None
            # Read-only: a reader writes nothing, and a path that is not there is an error, not a new
            # empty database.
            return "sqlite3", (f"file:{quote(str(Path(database).resolve()))}?mode=ro",), {"uri": True}
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        # Plain values only: the dialect adds objects of its own (psycopg's adapters) that another
        # process does not need and cannot be sent.
        kwargs = {k: v for k, v in cparams.items() if isinstance(v, str | int | float | bool)}
        return type(engine.dialect).import_dbapi().__name__, tuple(cargs), kwargs

    async def _run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the store thread, in one transaction committed to the disk."""
        return await self._submit(fn, args, kwargs, durable=True)

    async def _run_replayable(self, fn: Callable[[], T]) -> T:
        """Like ``_run``, for a transaction that can be written again from its source if a power loss takes
        it (the Vault audit merge, re-read from Vault's file at the position it moves).

        On SQLite its commit is not flushed to the disk on its own (``synchronous=NORMAL`` in WAL mode): a
        crash of the process loses nothing, and the next durable commit's flush carries it too. A group
        with any durable operation is flushed.
        """
        return await self._submit(fn, (), {}, durable=False)

    async def _submit(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any], *,
                      durable: bool) -> T:
        loop = asyncio.get_running_loop()
        observe = self._observe
        started = time.perf_counter() if observe is not None else 0.0
        try:
            # In the caller's context (as asyncio.to_thread does): a record built in the transaction names
            # the request's caller like one built before it (broker.audit.CALLER_ADDRESS).
            call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
            if self._executor is None:
                if self._closed:
                    raise StoreUnavailable("the store is closed", reason="store closed")
                fut: asyncio.Future[T] = loop.create_future()
                # Each job brings its own loop (tests run one store under several): nothing here is tied to
                # one loop, and a job whose loop has closed is dropped alone.
                self._jobs.put((call, loop, fut, durable))
                result = await fut
            else:
                result = await loop.run_in_executor(self._executor, call)
        except SQLAlchemyError as exc:
            if observe is not None:
                observe(time.perf_counter() - started, True)
            log.error("store operation %s failed: %s", getattr(fn, "__name__", "?"), type(exc).__name__)
            raise StoreUnavailable("the store is unavailable", reason=type(exc).__name__) from exc
        if observe is not None:
            observe(time.perf_counter() - started, False)
        return result

    def _serve(self) -> None:
        """The store thread: take what is queued (at most ``_GROUP_MAX``) as one group, answer it, again."""
        while True:
            job = self._jobs.get()
            if job is _STOP:
                self._stop()
                return
            batch: list[_Job] = [job]
            stop = False
            while len(batch) < _GROUP_MAX:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True  # close() puts it after its last job: run what came before, then end
                    break
                batch.append(more)
            try:
                self._drain(batch)
            except Exception as exc:
                log.exception("the store thread failed a group; its callers get StoreUnavailable")
                failed = StoreUnavailable("the store is unavailable", reason=type(exc).__name__)
                self._answer_all(batch, [(False, failed)] * len(batch))
            if stop:
                self._stop()
                return

    def _stop(self) -> None:
        """The store thread's last act: close its connection, and refuse what was queued after ``_STOP``
        (a job submitted by another loop's thread as ``close`` ran), so that no caller waits forever."""
        try:
            self._dispose()
        except Exception:
            log.exception("closing the store's connection failed")
        closed = StoreUnavailable("the store is closed", reason="store closed")
        late: list[_Job] = []
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:  # not _STOP
                late.append(job)
        self._answer_all(late, [(False, closed)] * len(late))

    def _drain(self, batch: Sequence[_Job]) -> None:
        """On the store thread: run ``batch`` as one group, then answer each job on its own loop."""
        flush = any(durable for *_, durable in batch)
        try:
            if not flush:
                self._synchronous("NORMAL")
            try:
                outcomes = self._run_group([call for call, *_ in batch])
            finally:
                if not flush:
                    self._flush_again()
        except Exception as exc:  # noqa: BLE001 - BEGIN or COMMIT failed: no job's writes are kept
            outcomes = [(False, exc)] * len(batch)
        self._answer_all(batch, outcomes)

    @staticmethod
    def _answer_all(batch: Sequence[_Job], outcomes: Sequence[_Outcome]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], _Outcome]]] = {}
        for (_, loop, fut, _), outcome in zip(batch, outcomes, strict=True):
            by_loop.setdefault(loop, []).append((fut, outcome))
        for loop, answers in by_loop.items():
            with contextlib.suppress(RuntimeError):  # its loop has closed: nobody waits for the answer
                loop.call_soon_threadsafe(_answer, answers)

    def _synchronous(self, mode: str) -> None:
        """Set SQLite's flush mode for the next transactions (outside one: SQLite ignores it inside)."""
        self._connection().connection.dbapi_connection.execute(f"PRAGMA synchronous={mode}")  # type: ignore[union-attr]

    def _flush_again(self) -> None:
        """Back to ``synchronous=FULL`` after a replayable group; if that fails, a new connection (its
        ``connect`` event sets FULL) rather than durable commits left unflushed."""
        try:
            self._synchronous("FULL")
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy's or the DB-API's: the same remedy
            log.warning("the store connection could not flush again (%s); it is opened again", type(exc).__name__)
            if self._conn is not None:
                with contextlib.suppress(SQLAlchemyError):
                    self._conn.invalidate()
            self._conn = None

    def _connection(self) -> Connection:
        """On the SQLite store thread: its one connection, opened again if an error closed it."""
        conn = self._conn
        if conn is None or conn.closed or conn.invalidated:
            if conn is not None:
                with contextlib.suppress(SQLAlchemyError):
                    conn.close()
            conn = self._conn = self._engine.connect()
        return conn

    def _dispose(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._conn.close()
            self._conn = None
        self._engine.dispose()

    def _run_group(self, calls: Sequence[Callable[[], Any]]) -> list[_Outcome]:
        """On the store thread: every call in one transaction, each under its own savepoint."""
        if len(calls) == 1:  # nothing to share a commit with: its own transaction, no savepoint
            self._lone = True
            try:
                return [(True, calls[0]())]
            except Exception as exc:  # noqa: BLE001 - handed to its caller, who raises it
                return [(False, exc)]
            finally:
                self._lone = False
                self._end_reads()
        conn = self._connection()
        try:
            return self._grouped_calls(conn, calls)
        finally:
            self._end_reads()  # a COMMIT that failed may leave its transaction open: never reuse it

    def _grouped_calls(self, conn: Connection, calls: Sequence[Callable[[], Any]]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        with conn.begin():  # a failed BEGIN or COMMIT fails the whole group (_drain)
            self._group_conn = conn
            try:
                for call in calls:
                    try:
                        outcomes.append((True, call()))
                    except Exception as exc:  # noqa: BLE001 - its savepoint is rolled back; the others go on
                        outcomes.append((False, exc))
                    if not conn.in_transaction():  # an operation ended the group's transaction: keep nothing
                        msg = "a store operation ended its group's transaction (use _undo, not rollback)"
                        raise RuntimeError(msg)
            finally:
                self._group_conn = None
        return outcomes

    def _end_reads(self) -> None:
        """After an operation: end what its reads began (SQLAlchemy begins a transaction on a read), or what
        a failed COMMIT left open, as returning a pooled connection did (its reset rolls back)."""
        conn = self._conn
        if conn is None:
            return
        try:
            if conn.in_transaction():
                conn.rollback()
            raw = conn.connection.dbapi_connection
            if raw is not None and raw.in_transaction:  # what SQLite itself says
                raw.rollback()
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy's or the DB-API's: the same remedy
            log.warning("the store connection could not end its transaction (%s); it is opened again",
                        type(exc).__name__)
            with contextlib.suppress(SQLAlchemyError):
                conn.invalidate()
            self._conn = None

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        group = self._group_conn
        if group is None and self._lone:
            if self._in_tx:
                msg = "a store operation opened a transaction inside its own"
                raise RuntimeError(msg)
            conn = self._connection()
            if conn.in_transaction():  # an earlier read of this operation began one: ended here
                conn.rollback()
            self._in_tx = True
            try:
                with conn.begin():
                    yield conn
            finally:
                self._in_tx = False
        elif group is None:
            with self._engine.begin() as conn:
                yield conn
        else:
            # A savepoint on the DB-API cursor, not Connection.begin_nested(): SQLAlchemy's bookkeeping for
            # one cost more than the statements of a small operation. Same name nested is fine in SQLite.
            cursor = group.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            cursor.execute("SAVEPOINT store_op")
            try:
                yield group
            except BaseException:
                cursor.execute("ROLLBACK TO store_op")
                cursor.execute("RELEASE store_op")
                raise
            else:
                cursor.execute("RELEASE store_op")
            finally:
                cursor.close()

    def _undo(self, conn: Connection) -> None:
        """Discard what the running operation wrote in its ``_tx()`` so far: its transaction, or in a group
        only its own savepoint (``conn.rollback()`` there would discard the whole group's work)."""
        if self._group_conn is None:
            conn.rollback()
        else:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute("ROLLBACK TO store_op")
            finally:
                cursor.close()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        group = self._group_conn
        if group is not None:
            yield group
        elif self._lone:
            yield self._connection()  # what a read begins ends with the operation (_end_reads)
        else:
            with self._engine.connect() as conn:
                yield conn

    async def ping(self) -> None:
        """Raises: StoreUnavailable."""
        def run() -> None:
            with self._read() as conn:
                conn.execute(select(1))
        await self._run(run)

    async def probe_write(self, *, now: float) -> None:
        """Commit a one-row write, as issuing must: a readable store that cannot commit is not ready.

        Callers rate-limit it (``broker.readiness``): one small transaction per probe.

        A SQLite store whose disk has less than ``MIN_FREE_BYTES`` left is not ready either, whatever the
        probe's one row manages: a commit may still fit in WAL frames SQLite already has (the checkpointer
        copies them back, and the WAL starts over), while an issuance needs new ones and fails.

        Raises:
            StoreUnavailable: the write or its commit failed (a full disk, a read-only file or database).
        """
        if self._database is not None:
            free = await asyncio.to_thread(_free_bytes, self._database)
            if free is not None and free < MIN_FREE_BYTES:
                raise StoreUnavailable("the store's disk is full", reason=f"{free} bytes free")

        def run() -> None:
            with self._tx() as conn:
                if conn.execute(_PROBE, {"at": now}).rowcount == 0:
                    conn.execute(insert(health_probe).values(id=1, probed_at=now))
        try:
            await self._run(run)
        except StoreUnavailable as exc:
            if isinstance(exc.__cause__, IntegrityError):
                return  # another replica inserted the row first: its write proves the same
            raise
