"""SQLite's WAL checkpoints, run by a thread of their own instead of inside the store's commits.

In WAL mode a commit appends its pages to the ``-wal`` file; a checkpoint copies them back into the
database file and syncs it. By default SQLite runs one inside whichever commit takes the WAL past 1,000
pages, and that commit waits for it: merging a backlog of Vault audit lines, the commits' median was
1.3 ms and their p99 18-24 ms, and the checkpoints were about 40 % of the merge's commit time
(docs/benchmarks.md, results L). An issuance that happened to cross the mark waited too.

Here a thread with its own connection runs a ``PASSIVE`` checkpoint every ``interval`` seconds (backing
off to ``idle_interval`` while nothing is written). A passive checkpoint takes no lock a writer or reader
waits for: it copies what no reader still needs and leaves the rest for the next round. Under a steady
stream of commits it never finds the WAL fully copied at the moment a writer begins, so the WAL is not
restarted from its beginning by it: the store's connections keep their automatic checkpoint, at
``SAFETY_PAGES``, which then finds nearly every frame copied already (and which also bounds a WAL whose
checkpointer falls behind or dies). Measured through a backlog: commits' p99 18-19 ms -> 8-9 ms, their
maximum 23-60 ms -> 11-14 ms, the merge 3-11 % faster.

Nothing about durability changes: a commit is durable when its WAL frames are (``synchronous=FULL``),
and a checkpoint syncs the WAL before and the database after copying, as SQLite's own does.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["SAFETY_PAGES", "WalCheckpointer"]

SAFETY_PAGES = 4096  # 16 MiB of 4 KiB pages: where a commit checkpoints (and restarts the WAL) itself


class WalCheckpointer:
    """Passive checkpoints of one SQLite database file, every ``interval`` seconds, until :meth:`stop`."""

    def __init__(self, database: str, *, interval: float = 0.05, idle_interval: float = 1.0) -> None:
        self._database = database
        self._interval = interval
        self._idle_interval = idle_interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-store-checkpoint", daemon=True)
        self.rounds = 0  # checkpoints run (for tests and diagnostics)

    @property
    def database(self) -> str:
        return self._database

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the checkpoint under way, if any (blocks: call it from a worker thread)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        failing = False
        wait = self._interval
        last: tuple[int, int] | None = None
        while not self._stopping.wait(wait):
            try:
                if conn is None:
                    if not os.path.exists(self._database):
                        continue  # not created yet: the store creates it
                    # mode=rw: a file deleted since is an error here, never created again, empty.
                    conn = sqlite3.connect(f"{Path(self._database).absolute().as_uri()}?mode=rw", uri=True,
                                           timeout=1.0, isolation_level=None, check_same_thread=False)
                    # A checkpoint syncs as its connection's setting says: the store's own (broker.store).
                    conn.execute("PRAGMA synchronous=FULL")
                _busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.rounds += 1
                # Nothing written since the last round: wait longer, up to idle_interval (an idle broker
                # checkpoints once a second, a busy one every interval).
                wait = min(wait * 2, self._idle_interval) if last == (frames, copied) else self._interval
                last = (frames, copied)
                if failing:
                    log.info("store: WAL checkpoints run again")
                    failing = False
            except sqlite3.Error as exc:
                # The commits' own automatic checkpoint (SAFETY_PAGES) keeps the WAL bounded meanwhile.
                if not failing:
                    log.warning("store: a WAL checkpoint failed (%s); retrying", type(exc).__name__)
                    failing = True
                wait = self._idle_interval
                if conn is not None:
                    conn.close()
                    conn = None
        if conn is not None:
            conn.close()
