"""The store's engine and its one hop to the store thread: every public method runs one whole transaction there."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

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

__all__ = ["StoreBase"]

log = logging.getLogger("broker.store")
T = TypeVar("T")



class StoreBase:
    def __init__(self, engine: Engine, *, sqlite: bool, threads: int = 4) -> None:
        self._engine = engine
        # SQLite has one writer (and here one connection): one thread serialises every transaction,
        # which is what SQLite would do anyway, without "database is locked" retries.
        self._executor = ThreadPoolExecutor(max_workers=1 if sqlite else threads, thread_name_prefix="broker-store")
        self._observe: Callable[[float, bool], None] | None = None

    def observe_with(self, observe: Callable[[float, bool], None] | None) -> None:
        """Call ``observe(seconds, failed)`` after every transaction (``broker.metrics``), on the event loop."""
        self._observe = observe

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._engine.dispose)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        observe = self._observe
        started = time.perf_counter() if observe is not None else 0.0
        try:
            # In the caller's context (as asyncio.to_thread does): a record built in the transaction names
            # the request's caller like one built before it (broker.audit.CALLER_ADDRESS).
            call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
            result = await loop.run_in_executor(self._executor, call)
        except SQLAlchemyError as exc:
            if observe is not None:
                observe(time.perf_counter() - started, True)
            log.error("store operation %s failed: %s", getattr(fn, "__name__", "?"), type(exc).__name__)
            raise StoreUnavailable("the store is unavailable", reason=type(exc).__name__) from exc
        if observe is not None:
            observe(time.perf_counter() - started, False)
        return result

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self._engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
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

        Raises:
            StoreUnavailable: the write or its commit failed (a full disk, a read-only file or database).
        """
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
