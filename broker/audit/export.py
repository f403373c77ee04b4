"""Audit export: the chain, record by record in sequence order, to a file and/or a webhook (TH-18).

The internal chain is the record of truth (written in the transaction of each state change); export
sinks are copies outside the store for a SIEM or a witness. Each sink has a cursor in the store (the
last sequence number it delivered, table ``audit_export``), advanced only after the sink took the batch:

- **file** (``[audit].export_file``): lines appended, flushed and ``fsync``'d per batch. At start the
  exporter reads the file's last complete line (and cuts a torn last line left by a crash), so a crash
  between the write and the cursor's move repeats nothing: every record lands in the file exactly once.
- **webhook** (``[audit].export_url``): batches POSTed as a JSON array, retried with exponential
  backoff a bounded number of times per round, then left for the next round. At least once: a
  receiver de-duplicates on the sequence number (``seq``, or ``metadata.uid`` in OCSF); the header
  ``X-Broker-Export-Range: first-last`` names the batch.

Formats (``[audit].export_format``): ``jsonl``, the record's canonical JSON as hashed by the chain
(:func:`broker.audit.canonical_bytes`) plus its ``prev_hash`` and ``hash``, so a receiver can re-verify
the chain; or ``ocsf``, one OCSF event per record (:mod:`broker.audit.ocsf`).

**Backlog** = the chain's head - the smallest sink cursor. Above ``export_backlog_limit``, issuance and
approval votes fail closed with 503 ``audit_backlog`` (``Retry-After``) while revocation and task ends
go on: :meth:`Exporter.check` reads an in-memory view of the backlog refreshed every round, so the
check on the issuance path costs no I/O. Run the exporter on one replica (as the SQLite broker is):
two exporters on one store notice each other through the cursor's compare-and-set but may repeat a batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import aiohttp
from aiohttp import web

from broker.audit import ChainLink, canonical_bytes
from broker.audit.ocsf import to_ocsf
from broker.errors import AuditBacklogFull, BrokerError, ExportFailed
from broker.store import Store

__all__ = [
    "EXPORTER",
    "Exporter",
    "FileSink",
    "Sink",
    "WebhookSink",
    "export_line",
    "export_object",
    "seq_of",
]

log = logging.getLogger(__name__)

Format = Literal["jsonl", "ocsf"]
_TAIL_MAX = 1 << 20  # the longest line we expect at the end of an export file (records are a few KB)


# -- formats (pure) ----------------------------------------------------------------------------------


def export_object(link: ChainLink, fmt: Format, *, origin: str = "agent-broker") -> dict[str, Any]:
    """One exported record as a JSON object: canonical record + hashes (``jsonl``) or an OCSF event."""
    if fmt == "ocsf":
        return to_ocsf(link.record, link.seq, origin=origin)
    body: dict[str, Any] = json.loads(canonical_bytes(link.record, link.seq))
    body["prev_hash"] = link.prev_hash
    body["hash"] = link.hash
    return body


def export_line(link: ChainLink, fmt: Format, *, origin: str = "agent-broker") -> bytes:
    """One line of an export file: sorted keys, no whitespace, UTF-8, newline-terminated."""
    obj = export_object(link, fmt, origin=origin)
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def seq_of(obj: Any) -> int | None:
    """The chain sequence number an exported object carries (``seq``, or OCSF ``metadata.uid``); None if none."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("seq"), int):
        return int(obj["seq"])
    meta = obj.get("metadata")
    uid = meta.get("uid") if isinstance(meta, dict) else None
    return int(uid) if isinstance(uid, str) and uid.isdigit() else None


# -- sinks ---------------------------------------------------------------------------------------------


class Sink(Protocol):
    name: str

    async def last_delivered(self) -> int | None:
        """The last sequence number the sink itself holds, when it can tell (a file can; a webhook cannot)."""
        ...

    async def deliver(self, links: Sequence[ChainLink]) -> None:
        """Hand over one batch, in order. Raises: ExportFailed."""
        ...


class FileSink:
    """Append lines to a file, ``fsync`` per batch."""

    name = "file"

    def __init__(self, path: Path, fmt: Format, *, origin: str = "agent-broker") -> None:
        self._path = path
        self._fmt = fmt
        self._origin = origin

    async def last_delivered(self) -> int | None:
        """The sequence number on the file's last complete line; a torn last line is cut off first.

        Raises:
            ExportFailed: the file cannot be read or repaired.
        """
        try:
            return await asyncio.to_thread(self._repair_and_read_tail)
        except OSError as exc:
            raise ExportFailed("cannot read the export file", reason=f"{self._path}: {exc.strerror}") from exc

    def _repair_and_read_tail(self) -> int | None:
        try:
            size = self._path.stat().st_size
        except FileNotFoundError:
            return None
        with self._path.open("r+b") as f:
            start = max(0, size - _TAIL_MAX)
            f.seek(start)
            tail = f.read()
            if tail and not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n") + 1
                log.warning("export file %s ends with a torn line (%d bytes): cut", self._path, len(tail) - cut)
                f.truncate(start + cut)
                f.flush()
                os.fsync(f.fileno())
                tail = tail[:cut]
        lines = [x for x in tail.splitlines() if x.strip()]
        if not lines:
            return None
        try:
            return seq_of(json.loads(lines[-1]))
        except ValueError:
            return None

    async def deliver(self, links: Sequence[ChainLink]) -> None:
        """Raises: ExportFailed: the write or the fsync failed (disk full, read-only, gone)."""
        data = b"".join(export_line(link, self._fmt, origin=self._origin) for link in links)
        try:
            await asyncio.to_thread(self._append, data)
        except OSError as exc:
            raise ExportFailed("cannot write the export file", reason=f"{self._path}: {exc.strerror}") from exc

    def _append(self, data: bytes) -> None:
        new = not self._path.exists()
        if new:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            for _ in range(len(data) + 1):  # bounded: each write moves forward or raises
                if not view:
                    break
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            dir_fd = os.open(self._path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


class WebhookSink:
    """POST each batch as a JSON array; retried with backoff, a bounded number of times per round."""

    name = "webhook"

    def __init__(self, url: str, fmt: Format, session: aiohttp.ClientSession, *, origin: str = "agent-broker",
                 attempts: int = 3, backoff: float = 0.2, max_backoff: float = 5.0, timeout: float = 10.0,
                 sleep: Callable[[float], Any] = asyncio.sleep) -> None:
        self._url = url
        self._fmt = fmt
        self._session = session
        self._origin = origin
        self._attempts = max(1, attempts)
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._timeout = timeout
        self._sleep = sleep

    async def last_delivered(self) -> int | None:
        return None

    async def deliver(self, links: Sequence[ChainLink]) -> None:
        """Raises: ExportFailed: every attempt failed (unreachable, timeout, non-2xx)."""
        body = [export_object(link, self._fmt, origin=self._origin) for link in links]
        headers = {"X-Broker-Export-Range": f"{links[0].seq}-{links[-1].seq}"}
        delay = self._backoff
        why = ""
        for attempt in range(self._attempts):
            if attempt:
                await self._sleep(delay)
                delay = min(delay * 2, self._max_backoff)
            try:
                async with self._session.post(self._url, json=body, headers=headers,
                                              timeout=aiohttp.ClientTimeout(total=self._timeout)) as resp:
                    if 200 <= resp.status < 300:
                        return
                    why = f"HTTP {resp.status}"
            except (TimeoutError, aiohttp.ClientError) as exc:
                why = type(exc).__name__
        raise ExportFailed("the export webhook did not take the batch",
                           reason=f"{self._attempts} attempts, last: {why}")


# -- the exporter ----------------------------------------------------------------------------------------


class Exporter:
    """Follow the chain by sequence number into every sink; keep the backlog in memory for :meth:`check`."""

    def __init__(self, *, store: Store, sinks: Sequence[Sink], backlog_limit: int, clock: Callable[[], float],
                 batch: int = 500, interval: float = 1.0, max_batches: int = 20, stale_after: float = 120.0,
                 on_backlog: Callable[[int], None] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._sinks = list(sinks)
        self._limit = backlog_limit
        self._clock = clock
        self._batch = batch
        self._interval = interval
        self._max_batches = max_batches
        self._on_backlog = on_backlog
        self._lock = asyncio.Lock()
        self._reconciled: set[str] = set()
        self._backlog = 0
        self._stale_after = stale_after
        self._monotonic = monotonic
        self._updated_at: float | None = None  # when the backlog view last moved (None: no round yet)
        self.failing: set[str] = set()

    @property
    def backlog(self) -> int:
        """Records not yet delivered to the slowest sink, as of the last round."""
        return self._backlog

    def check(self) -> None:
        """The fail-closed gate for issuance and approvals: no I/O.

        Raises:
            AuditBacklogFull: the backlog is above the limit, or no round has reported for ``stale_after``
                seconds (a stuck exporter proves nothing).
        """
        if self._backlog > self._limit:
            raise AuditBacklogFull("the audit export is behind; credentials are not issued until it catches up",
                                   reason=f"export backlog {self._backlog} > limit {self._limit}")
        if self._updated_at is not None and self._monotonic() - self._updated_at > self._stale_after:
            # The view is old (the exporter is stuck or dead): it proves nothing, so fail closed.
            raise AuditBacklogFull("the audit export is not reporting; credentials are not issued",
                                   reason=f"no export round for more than {self._stale_after:.0f} s")

    async def step(self) -> int:
        """One round: up to ``max_batches`` batches into each sink; returns the records delivered.

        A failing sink is logged and retried next round; its backlog grows. Store errors propagate.

        Raises:
            StoreUnavailable: the store could not be read or the cursor not moved.
        """
        async with self._lock:
            positions = await self._store.export_positions()
            delivered = 0
            cursors: list[int] = []
            for sink in self._sinks:
                cur = positions.get(sink.name, 0)
                try:
                    cur = await self._reconcile(sink, cur)
                    for _ in range(self._max_batches):
                        links = await self._store.iter_chain(after_seq=cur, limit=self._batch)
                        if not links:
                            break
                        await sink.deliver(links)
                        new = links[-1].seq
                        if not await self._store.advance_export(sink.name, expected=cur, seq=new, now=self._clock()):
                            log.warning("audit export cursor of %s moved under us: another exporter runs", sink.name)
                            cur = (await self._store.export_positions()).get(sink.name, cur)
                            break
                        delivered += len(links)
                        cur = new
                        self._updated_at = self._monotonic()  # progress, even within a long round
                    if sink.name in self.failing:
                        log.info("audit export sink %s is delivering again", sink.name)
                    self.failing.discard(sink.name)
                except ExportFailed as exc:
                    if sink.name not in self.failing:
                        log.warning("audit export sink %s failed: %s", sink.name, exc.reason)
                    self.failing.add(sink.name)
                cursors.append(cur)
            head, _ = await self._store.chain_head()
            self._backlog = max(0, head - min(cursors, default=head))
            self._updated_at = self._monotonic()
            if self._on_backlog is not None:
                self._on_backlog(self._backlog)
            return delivered

    async def _reconcile(self, sink: Sink, cur: int) -> int:
        """Once per sink: if the sink holds more than the cursor says (a crash after the write), move the cursor.

        Raises:
            ExportFailed: the sink cannot be read.
        """
        if sink.name in self._reconciled:
            return cur
        last = await sink.last_delivered()
        if last is not None and last > cur:
            log.info("audit export sink %s already holds records up to %d (cursor %d): skipping them",
                     sink.name, last, cur)
            if await self._store.advance_export(sink.name, expected=cur, seq=last, now=self._clock()):
                cur = last
        self._reconciled.add(sink.name)
        return cur

    async def measure(self) -> int:
        """The backlog from the store's cursors, without delivering anything (a replica that does not export).

        With several replicas one exports (the ``audit-exporter`` singleton) and every replica gates its own
        issuance with :meth:`check`: the others keep their view fresh with this. Raises: StoreUnavailable.
        """
        positions = await self._store.export_positions()
        head, _ = await self._store.chain_head()
        self._backlog = max(0, head - min((positions.get(s.name, 0) for s in self._sinks), default=head))
        self._updated_at = self._monotonic()
        if self._on_backlog is not None:
            self._on_backlog(self._backlog)
        return self._backlog

    async def watch_forever(self) -> None:
        """:meth:`measure` every ``interval`` seconds, on every replica; errors are logged, never fatal."""
        while True:
            try:
                await self.measure()
            except BrokerError as exc:
                log.warning("audit export backlog unknown: %s", exc.code)
            await asyncio.sleep(self._interval)

    async def run_forever(self) -> None:
        """Rounds every ``interval`` seconds (at once again while a round was full); errors are logged, never fatal."""
        self._reconciled.clear()  # a holder again after another replica exported: look at the sinks afresh
        while True:
            busy = False
            try:
                busy = await self.step() >= self._batch * self._max_batches
            except BrokerError as exc:
                log.warning("audit export round failed: %s (%s)", exc.code, exc.reason)
            except Exception:  # a dead exporter would leave a stale view: log and keep going
                log.exception("audit export round failed unexpectedly")
            await asyncio.sleep(0 if busy else self._interval)


EXPORTER = web.AppKey("audit_exporter", Exporter)  # set only when an export sink is configured
