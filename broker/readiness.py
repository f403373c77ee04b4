"""Readiness: can this replica issue a credential now? What ``GET /v1/health`` answers.

Rules this file keeps:
1. Ready means what issuing needs: Vault answers (``sys/health``: active, unsealed) and the store can
   commit a write. A read-only check would call a replica with a full disk ready while every issuance
   on it fails with ``store_unavailable``, and a load balancer would keep sending agents to it.
2. The answer names the part that is down (``vault``, ``store``), never why in detail (anyone on the
   network may ask).
3. Probes are rate-limited: one result serves every caller for ``ttl`` seconds, and one probe runs at
   a time, so a flood of health checks is not a flood of store writes or Vault calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from broker.errors import BrokerError, VaultError, VaultUnavailable
from broker.store import Store
from broker.vault import VaultClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadinessReport:
    vault: str  # ok, sealed, standby, unreachable
    store: str  # ok, unwritable, unavailable

    @property
    def ok(self) -> bool:
        return self.vault == "ok" and self.store == "ok"


class Readiness:
    """The cached readiness of one replica: a Vault probe and a store write probe, at most once per ``ttl``."""

    def __init__(self, *, store: Store, vault: VaultClient, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, ttl: float = 1.0, timeout: float = 2.0) -> None:
        self._store = store
        self._vault = vault
        self._clock = clock
        self._monotonic = monotonic
        self._ttl = ttl
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._last: tuple[float, ReadinessReport] | None = None
        self._told = False  # a Vault configuration problem was logged

    async def check(self) -> ReadinessReport:
        """The last report if it is fresh, else a new one (callers arriving meanwhile wait for it)."""
        fresh = self._fresh()
        if fresh is not None:
            return fresh
        async with self._lock:
            fresh = self._fresh()
            if fresh is not None:
                return fresh
            vault, store = await asyncio.gather(self._vault_state(), self._store_state())
            report = ReadinessReport(vault=vault, store=store)
            self._last = (self._monotonic(), report)
            return report

    def _fresh(self) -> ReadinessReport | None:
        if self._last is not None and self._monotonic() - self._last[0] < self._ttl:
            return self._last[1]
        return None

    async def _vault_state(self) -> str:
        try:
            h = await self._vault.health(timeout=self._timeout)
        except VaultError as exc:
            # Not an outage but a configuration problem (VaultTLSFailed: [vault].ca_cert) or an attack. The
            # answer stays "unreachable" (rule 2); the log says why, once until Vault answers again.
            if not isinstance(exc, VaultUnavailable) and not self._told:
                log.warning("readiness: Vault cannot be used: %s", exc)
                self._told = True
            return "unreachable"
        except BrokerError:
            return "unreachable"
        self._told = False
        return "sealed" if h.sealed else "standby" if h.standby else "ok"

    async def _store_state(self) -> str:
        try:
            await asyncio.wait_for(self._store.probe_write(now=self._clock()), timeout=self._timeout * 2)
        except (BrokerError, TimeoutError):
            try:
                await asyncio.wait_for(self._store.ping(), timeout=self._timeout)
            except (BrokerError, TimeoutError):
                return "unavailable"
            return "unwritable"
        return "ok"
