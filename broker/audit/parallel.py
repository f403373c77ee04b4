"""Verifying a large log on every core: stretches of it checked in worker processes, the verdict drawn here.

The verifier is pure Python and holds the GIL: threads cannot share its work, processes can. Each
worker (``python -m broker.audit.parallel``) opens its own connection (``Store.chain_source``: the DB-API
module, its arguments, the page query), reads the stretches it is given page by page and checks each
from the ``prev_hash`` its first row stores (``broker.audit.stretches``); ``LogVerifier.feed_stretch``
takes the results in order and holds every boundary and checkpoint, so the report is the sequential one
exactly. Memory stays bounded: a worker holds one page, the coordinator one small result per stretch.

Workers are new interpreters that import only this module, talking JSON lines over their stdin and
stdout. Not ``fork``: the broker would fork from a process with threads (the store thread, the event
loop's executors), and a child forked while one of them holds a lock inside SQLite or libpq hangs on it.
Not ``multiprocessing``'s ``spawn`` either: it runs the parent's main module again in every child (the
CLI's, a test runner's, an embedding program's), which costs its imports and breaks a main module
without an ``if __name__ == "__main__"`` guard. A worker starts in ~0.3 s; small logs stay on the
sequential path (``StoreVerifier``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from broker.audit.stretches import StretchResult, plan_stretches, verify_stretch_rows
from broker.audit.verify import LogVerifier
from broker.errors import StoreUnavailable
from broker.rows import ChainSource

__all__ = ["usable_cores", "verify_in_processes", "worker_env"]

log = logging.getLogger(__name__)

_PAGE = 10_000
# Stretches per worker: more than one, so that a worker slowed by a neighbour on a shared machine leaves
# more of the log to the others; few, since each opens a connection.
_STRETCHES_PER_WORKER = 4


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _rows(source: ChainSource, first_seq: int, last_seq: int | None) -> Iterator[Sequence[Any]]:
    """The rows from ``first_seq`` on, as ``Store.chain_rows`` reads them, at most as many as the stretch has."""
    conn = importlib.import_module(source.module).connect(*source.args, **source.kwargs)
    try:
        cursor = conn.cursor()
        after, left = first_seq - 1, None if last_seq is None else last_seq - first_seq + 1
        while left is None or left > 0:
            limit = _PAGE if left is None else min(_PAGE, left)
            values = {**source.defaults, "after": after, "lim": limit}
            cursor.execute(source.sql, tuple(values[k] for k in source.order) if source.order is not None else values)
            page = cursor.fetchall()
            yield from page
            if len(page) < limit:
                return
            after = page[-1][0]
            if left is not None:
                left -= len(page)
    finally:
        conn.close()


def verify_stretch_at(source: ChainSource, first_seq: int, last_seq: int | None, sizes: Sequence[int]) -> StretchResult:
    """In a worker: read one stretch from the database and verify it."""
    return verify_stretch_rows(_rows(source, first_seq, last_seq), first_seq=first_seq, last_seq=last_seq,
                               sizes=sizes)


class WorkerFailed(OSError):
    """A worker process died or answered something else than a result."""


def _encode(r: StretchResult) -> bytes:
    return json.dumps({"first_seq": r.first_seq, "last_seq": r.last_seq, "first_row": r.first_row,
                       "start_prev": r.start_prev, "count": r.count, "last": r.last.hex(),
                       "heads": {str(k): v.hex() for k, v in r.heads.items()}, "broken": r.broken}).encode() + b"\n"


def _decode(line: bytes) -> StretchResult:
    d = json.loads(line)
    broken = d["broken"]
    return StretchResult(d["first_seq"], d["last_seq"], d["first_row"], d["start_prev"], d["count"],
                         bytes.fromhex(d["last"]), {int(k): bytes.fromhex(v) for k, v in d["heads"].items()},
                         (int(broken[0]), str(broken[1])) if broken is not None else None)


def serve(stdin: Any = None, stdout: Any = None) -> None:
    """A worker's loop: the source on the first line, then one stretch per line, one result line each."""
    stdin, stdout = stdin or sys.stdin.buffer, stdout or sys.stdout.buffer
    d = json.loads(stdin.readline())
    source = ChainSource(d["module"], tuple(d["args"]), d["kwargs"], d["sql"],
                         tuple(d["order"]) if d["order"] is not None else None, d["defaults"])
    error: type[Exception] = importlib.import_module(source.module).Error  # the DB-API's base class
    for line in stdin:
        job = json.loads(line)
        try:
            result = verify_stretch_at(source, job["first"], job["last"], job["sizes"])
        except error as exc:
            stdout.write(json.dumps({"error": type(exc).__name__}).encode() + b"\n")
        else:
            stdout.write(_encode(result))
        stdout.flush()


def worker_env() -> dict[str, str]:
    """This environment, with the directory this ``broker`` package was imported from first on the path (for a
    worker started with ``python -m``: it imports the same code as the broker, installed or not).

    ``PYTHONSAFEPATH``: ``-m`` would otherwise put the working directory before that, and a ``broker``
    there (another checkout, or planted) would be the worker's code instead of the broker's.
    """
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else ""), "PYTHONSAFEPATH": "1"}


async def verify_in_processes(source: ChainSource, verifier: LogVerifier, *, last_seq: int, workers: int,
                              least: int) -> None:
    """Feed ``verifier`` the whole log, 1..``last_seq`` and whatever follows, checked by ``workers`` processes in
    stretches of at least ``least`` records. Stops early once the verifier has failed.

    Raises:
        StoreUnavailable: a worker could not read the database.
        OSError: a worker could not be started, or died (``WorkerFailed``).
    """
    plan = plan_stretches(last_seq, parts=workers * _STRETCHES_PER_WORKER, least=least)
    sizes = verifier.claim_sizes
    jobs = iter([(i, json.dumps({"first": first, "last": last,
                                 "sizes": [s for s in sizes if s >= first and (last is None or s <= last)]}))
                 for i, (first, last) in enumerate(plan)])
    loop = asyncio.get_running_loop()
    results: list[asyncio.Future[StretchResult]] = [loop.create_future() for _ in plan]
    head = json.dumps({**asdict(source)}).encode() + b"\n"
    procs: list[asyncio.subprocess.Process] = []

    async def drive(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(head)
        for i, job in jobs:  # shared: each worker takes the next stretch when it is done with one
            try:
                proc.stdin.write(job.encode() + b"\n")
                await proc.stdin.drain()
                line = await proc.stdout.readline()
                if not line:
                    raise WorkerFailed(f"verifier worker {proc.pid} exited ({await proc.wait()})")
                answer = json.loads(line)
                if "error" in answer:
                    log.error("a verifier worker could not read the store: %s", answer["error"])
                    raise StoreUnavailable("the store is unavailable", reason=answer["error"])
                results[i].set_result(_decode(line))
            except Exception as exc:
                for fut in results:  # nobody else would answer this stretch: fail the verification
                    if not fut.done():
                        fut.set_exception(exc)
                raise
        proc.stdin.close()

    drivers: list[asyncio.Task[None]] = []
    finished = False
    try:
        for _ in range(min(workers, len(plan))):
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "broker.audit.parallel", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, env=worker_env()))
            drivers.append(asyncio.create_task(drive(procs[-1])))
        for fut in results:
            verifier.feed_stretch(await fut)
            if verifier.failed:
                break
        else:
            finished = True  # every worker has closed its stdin: each ends by itself
    finally:
        for task in drivers:
            task.cancel()
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
            if not finished and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()  # what it still reads is no longer needed: the verdict is in
            await proc.wait()
        for task in drivers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for fut in results:
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: a failure already raised above is not logged again


if __name__ == "__main__":
    serve()
