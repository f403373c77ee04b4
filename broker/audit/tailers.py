"""Every Vault node's audit file, merged into one chain: one ``VaultAuditTailer`` per file, in turn.

A cluster's nodes each write their own file device, and an entry can be in any of them (the node that
served the request wrote it; a device declared by one node is in the cluster's shared audit table, so
the active node may write it to every node's file). Each file keeps its own position, rotations and
gap records (``broker.audit.tailer``); the store keeps each Vault request id once
(``merge_vault_audit(dedupe=True)``), so the unified log holds every request exactly once, whichever
file it came from and through leader changes.

The files are polled one after the other in one task, not in parallel: the merges never race each
other on the request ids, and one file's failure (unreadable, a conflict) is retried without
stopping the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from broker.audit.tailer import VaultAuditTailer
from broker.errors import BrokerError
from broker.metrics import Metrics

log = logging.getLogger(__name__)

__all__ = ["VaultAuditTailers"]

_MAX_BACKOFF = 10.0


class VaultAuditTailers:
    """Several files' tailers run as one (``run_forever``), each retried on its own after a failure."""

    def __init__(self, tailers: Sequence[VaultAuditTailer], *, metrics: Metrics | None = None,
                 poll_interval: float = 0.25) -> None:
        if not tailers:
            msg = "no audit file to tail"
            raise ValueError(msg)
        self.tailers = tuple(tailers)
        self._metrics = metrics or Metrics()
        self._interval = poll_interval

    async def run_forever(self) -> None:
        """Poll every file until cancelled; a file that fails waits (doubling, at most 10 s) on its own."""
        loop = asyncio.get_running_loop()
        for t in self.tailers:
            t.reload()  # a previous run (under a lease since lost) may have left stale positions
            await t.seed_tokens()
        retry_at = [0.0] * len(self.tailers)
        backoff = [self._interval] * len(self.tailers)
        try:
            while True:
                busy = False
                for i, t in enumerate(self.tailers):
                    if loop.time() < retry_at[i]:
                        continue
                    try:
                        result = await t.step()
                    except asyncio.CancelledError:
                        raise
                    except (BrokerError, OSError) as exc:
                        self._metrics.inc("broker_vault_audit_errors_total")
                        log.warning("vault audit tailer %s: %s; retrying", t.path,
                                    getattr(exc, "reason", type(exc).__name__))
                        t.reload()
                        retry_at[i] = loop.time() + backoff[i]
                        backoff[i] = min(backoff[i] * 2, _MAX_BACKOFF)
                        continue
                    backoff[i] = self._interval
                    busy = busy or result.more or result.switched is not None
                if not busy:
                    await asyncio.sleep(self._interval)
        finally:
            for t in self.tailers:
                await t.aclose()

    async def catch_up(self, *, max_polls: int = 10_000) -> int:
        """Every file read to its end (tests, one-shot runs); the lines merged. Raises: OSError, BrokerError."""
        return sum([await t.catch_up(max_polls=max_polls) for t in self.tailers])
