"""Work one replica does at a time, under a lease in the store: maintenance, the Vault audit tailer, export.

Several replicas share one store. Expiry and reconciliation, the merge of Vault's audit files and the
export of the chain must each run on one replica at a time (two would race each other's compare-and-sets
and double the Vault and store work), and keep running when that replica dies. Each is a ``Singleton``:

1. **A lease, not a lock.** The holder renews its row (``Store.hold_singleton``, one compare-and-set
   statement in the database's clock) every ``renew_every`` seconds for ``lease`` seconds. A replica
   that is killed stops renewing; the row lapses and another replica takes it at its next attempt: a
   takeover within ``lease + renew_every`` seconds (5 + 1.5 by default).
2. **A holder that cannot renew stops its work** before its lease can lapse (``margin`` seconds before,
   by its own monotonic clock, counted from before the renewal was sent), so two replicas never work
   at once as long as clocks tick at the same rate. The work itself stays safe if they did: every step
   of it is a compare-and-set in the store (intent and lease transitions, the tailer's positions, the
   export cursors, the chain's head row), so a stale holder's write fails instead of repeating.
3. **A fence.** The row's fencing number grows at every change of holder; the holder's is in
   ``GET /v1/health`` and in the log line of every takeover.
4. **A clean stop gives the lease up** (``release_singleton``), so a rolling restart hands over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from broker import background
from broker.errors import BrokerError
from broker.store import Store

log = logging.getLogger(__name__)

__all__ = ["LEASE", "RENEW_EVERY", "Singleton", "SingletonState", "replica_id"]

LEASE = 5.0
RENEW_EVERY = 1.5


def replica_id() -> str:
    """This process's name as a lease holder: host, pid and a random suffix (a restarted pid is new)."""
    return f"{socket.gethostname()[:100]}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True)
class SingletonState:
    """What ``GET /v1/health`` says about one singleton on this replica."""

    name: str
    held: bool
    fence: int | None


class Singleton:
    """Runs ``work()`` while this replica holds the lease ``name`` (see the module docstring)."""

    def __init__(self, name: str, work: Callable[[], Coroutine[Any, Any, None]], *, store: Store, holder: str,
                 lease: float = LEASE, renew_every: float = RENEW_EVERY, margin: float | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if renew_every * 2 >= lease:
            msg = "a singleton's lease must outlast two renewals"
            raise ValueError(msg)
        self.name = name
        self._work = work
        self._store = store
        self._holder = holder
        self._lease = lease
        self._every = renew_every
        self._margin = renew_every / 2 if margin is None else margin
        self._monotonic = monotonic
        self._task: asyncio.Task[None] | None = None
        self._valid_until = 0.0
        self._fence: int | None = None

    @property
    def state(self) -> SingletonState:
        held = self._task is not None and not self._task.done()
        return SingletonState(self.name, held, self._fence if held else None)

    async def run_forever(self) -> None:
        """Acquire or renew every ``renew_every`` seconds; run the work while held. Cancel to stop."""
        try:
            while True:
                await self.tick()
                await asyncio.sleep(self._pause())
        finally:
            held = self._task is not None
            await self._stop()
            if held:
                with contextlib.suppress(BrokerError, TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._store.release_singleton(self.name, self._holder)),
                                           timeout=self._every)

    async def tick(self) -> None:
        """One renewal (or acquisition), then start or stop the work accordingly."""
        sent = self._monotonic()
        try:
            hold = await asyncio.wait_for(self._store.hold_singleton(self.name, self._holder, ttl=self._lease),
                                          timeout=self._every)
        except (BrokerError, TimeoutError) as exc:
            log.warning("singleton %s: cannot renew its lease (%s)", self.name, getattr(exc, "code", "timeout"))
            hold = None
            lost = False
        else:
            lost = hold is None
        if hold is not None:
            self._valid_until = sent + min(hold.remaining, self._lease)
            if self._task is None or self._task.done():
                self._reap()
                if self._fence != hold.fence:
                    log.info("singleton %s: this replica holds it now (fence %d)", self.name, hold.fence)
                self._fence = hold.fence
                self._task = asyncio.create_task(self._work(), name=f"singleton-{self.name}")
        if self._task is not None and (lost or self._monotonic() >= self._valid_until - self._margin):
            log.warning("singleton %s: lease %s; stopping its work", self.name, "taken" if lost else "expiring")
            await self._stop()

    def _pause(self) -> float:
        """Until the next renewal, or sooner when the lease would otherwise lapse under running work."""
        if self._task is None:
            return self._every
        return max(0.05, min(self._every, self._valid_until - self._margin - self._monotonic()))

    def _reap(self) -> None:
        """Log how a previous run of the work ended, if it ended by itself (a bug: work runs forever)."""
        task, self._task = self._task, None
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            log.error("singleton %s: its work failed; restarting it", self.name, exc_info=task.exception())

    async def _stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            # Not a suppress(CancelledError) around the await: that also swallows a cancel of this loop
            # arriving meanwhile, and the loop would then outlive the application.
            await background.stop(task, every=self._every)
