"""The broker's Prometheus metrics (``GET /metrics``), on a registry the app owns.

Rules this file keeps:
1. One ``CollectorRegistry`` per ``Metrics`` (per app), never prometheus_client's global default
   registry: two apps in one process (tests, ``broker dev``) never share or collide on a series.
2. Labels take bounded values only: a route *template* (``/v1/tasks/{task_id}``), a method from a fixed
   list, an HTTP status, a grant named in the catalog, an error code from ``broker.errors``, a Vault
   operation name from ``broker.vault.client``. Never an id, a person, an agent, a path as sent or a
   query value: ``/metrics`` is readable by anyone on the network (it is not authenticated), and a
   label from caller input would let anyone grow the series without bound.
3. The hot path pays one dict lookup and one ``observe``/``inc`` per event: label children are bound
   once (``_bound``) and reused, never re-resolved through ``labels()`` on each call.
4. What the store knows (live tasks and leases, the revocation backlog, pending approvals, the audit
   chain's head and last checkpoint) is read at scrape time in one read transaction, at most once per
   ``snapshot_ttl`` seconds, so a scrape flood costs the store nothing more.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

try:
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as _CONTENT_TYPE
except ImportError:  # older releases, whose latest text format is 0.0.4 and have no name for it
    from prometheus_client.exposition import CONTENT_TYPE_LATEST as _CONTENT_TYPE

from broker.errors import BrokerError

__all__ = ["CONTENT_TYPE", "LEGACY", "Metrics", "StoreSnapshot"]

# The text exposition format, version 0.0.4: what every Prometheus and promtool version parses.
CONTENT_TYPE: str = _CONTENT_TYPE

# The audit tailer's and exporter's unlabelled series (name -> (type, help)), kept under their names.
# A name not listed here cannot be counted: typos fail loudly in tests.
LEGACY: dict[str, tuple[str, str]] = {
    "broker_vault_audit_lines_total": ("counter", "Lines of Vault's audit file read and merged by the tailer."),
    "broker_vault_audit_invalid_lines_total": ("counter", "Lines of Vault's audit file that were not audit entries."),
    "broker_vault_audit_requests_total": ("counter", "vault.request records merged into the chain."),
    "broker_vault_audit_unexplained_total": ("counter", ("vault.unexplained records: Vault requests the broker "
                                                         "cannot explain.")),
    "broker_vault_audit_rotations_total": ("counter", "Rotations (rename + reopen) of Vault's audit file followed."),
    "broker_vault_audit_gaps_total": ("counter", ("Times the tailer could not find where it stopped "
                                                  "(file gone or truncated): entries may be missing.")),
    "broker_vault_audit_errors_total": ("counter", "Tailer polls that failed (store or file); retried."),
    "broker_vault_audit_lag_bytes": ("gauge", "Bytes of Vault's audit file not yet merged."),
    "broker_vault_audit_worker_failures_total": ("counter", ("Times the tailer's ingest worker process died or "
                                                             "could not read the store; merged in-process meanwhile.")),
    "broker_audit_export_backlog": ("gauge", "Audit records not yet delivered to the slowest export sink."),
    "broker_signals_delivered_total": ("counter", "SSF SETs a receiver accepted (HTTP 202)."),
    "broker_signals_retried_total": ("counter", "SSF pushes that failed and will be tried again."),
    "broker_signals_failed_total": ("counter", ("SSF SETs that will never be delivered: refused (HTTP 400), "
                                                "attempts or age spent, or the receiver removed.")),
}

# Seconds. API calls and Vault calls take milliseconds; a store commit under a millisecond on SQLite.
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "<unmatched>"  # the route label of a request no route matched (a 404, a refused request line)
OTHER_GRANT = "<other>"  # the grant label of a request naming no grant of the catalog


@dataclass(frozen=True)
class StoreSnapshot:
    """What the store holds, counted in one read transaction (``Store.metrics_snapshot``).

    ``oldest_revoke_pending_at`` is when the oldest task still awaiting Vault's confirmation was fenced;
    ``last_checkpoint_at`` the time of the newest signed checkpoint. None: there is none.
    """

    live_tasks: int
    live_leases: int
    revoke_pending_leases: int
    oldest_revoke_pending_at: float | None
    pending_approvals: int
    chain_head_seq: int
    last_checkpoint_at: float | None
    last_checkpoint_seq: int | None


class _StoreCollector(Collector):
    """Renders the last ``StoreSnapshot``; a series whose value is unknown is left out, not set to 0."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.snapshot: StoreSnapshot | None = None
        self._clock = clock

    def collect(self) -> Iterable[Metric]:
        s = self.snapshot
        if s is None:
            return
        now = self._clock()

        def g(name: str, help_: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, help_, value=value)

        yield g("broker_tasks_live", "Tasks in state active.", s.live_tasks)
        yield g("broker_leases_live", "Leases in state active (credentials agents hold now).", s.live_leases)
        yield g("broker_leases_revoke_pending", "Leases revoked by the broker that Vault has not confirmed gone yet.",
                s.revoke_pending_leases)
        yield g("broker_leases_revoke_pending_oldest_age_seconds",
                "Age of the oldest revocation Vault has not confirmed yet (0: none pending).",
                max(0.0, now - s.oldest_revoke_pending_at) if s.oldest_revoke_pending_at is not None else 0.0)
        yield g("broker_approvals_pending", "Approvals waiting for people to decide.", s.pending_approvals)
        yield g("broker_audit_chain_head_seq", "Sequence number of the newest audit record.", s.chain_head_seq)
        if s.last_checkpoint_at is not None and s.last_checkpoint_seq is not None:
            yield g("broker_audit_checkpoint_age_seconds", "Seconds since the newest signed audit checkpoint.",
                    max(0.0, now - s.last_checkpoint_at))
            yield g("broker_audit_checkpoint_seq", "Sequence number the newest signed checkpoint covers.",
                    s.last_checkpoint_seq)


class Metrics:
    """Every series the broker exposes, on its own registry. Update it from the event loop.

    ``process=False`` leaves out the ``process_*`` series (a second app in the same process: tests).
    """

    def __init__(self, *, version: str = "", clock: Callable[[], float] = time.time, process: bool = True,
                 snapshot_ttl: float = 1.0) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        self._legacy: dict[str, Counter | Gauge] = {
            name: (Counter(name, help_, registry=r) if kind == "counter" else Gauge(name, help_, registry=r))
            for name, (kind, help_) in LEGACY.items()
        }
        Info("broker_build", "The broker's version (the value is always 1).", registry=r).info(
            {"version": version or "unknown", "python": platform.python_version()})
        if process:
            ProcessCollector(registry=r)
        self._requests = Counter("broker_http_requests_total", "API and console requests answered, by route "
                                 "template, method and status.", ["route", "method", "status"], registry=r)
        self._latency = Histogram("broker_http_request_duration_seconds", "Time to answer a request, by route "
                                  "template and method.", ["route", "method"], buckets=_LATENCY, registry=r)
        self._issued = Counter("broker_credentials_issued_total", "Credentials handed to agents, by grant.",
                               ["grant"], registry=r)
        self._denied = Counter("broker_credentials_denied_total", "Credential requests refused or failed, by "
                               "grant and reason (the problem's error code).", ["grant", "reason"], registry=r)
        self._approval_asked = Counter("broker_credentials_approval_required_total", "Credential requests for a "
                                       "high-risk grant answered 202 (an approval was requested), by grant.",
                                       ["grant"], registry=r)
        self._vault_latency = Histogram("broker_vault_request_duration_seconds", "Time of one Vault HTTP request, "
                                        "by operation.", ["operation"], buckets=_LATENCY, registry=r)
        self._vault_errors = Counter("broker_vault_request_errors_total", "Vault requests that failed, by operation "
                                     "and error code.", ["operation", "error"], registry=r)
        self._store_latency = Histogram("broker_store_transaction_duration_seconds", "Time of one store "
                                        "transaction as the event loop waits for it (queueing included).",
                                        buckets=_LATENCY, registry=r)
        self._store_errors = Counter("broker_store_transaction_errors_total", "Store transactions that failed "
                                     "(the store was unavailable).", registry=r)
        self._store_gauges = _StoreCollector(clock)
        r.register(self._store_gauges)
        self._clock = clock
        self.snapshot_ttl = snapshot_ttl
        self._snapshot_at = -math.inf
        self._grants: frozenset[str] = frozenset()
        self._bound: dict[tuple[str, ...], Any] = {}

    # -- the tailer's and exporter's series -------------------------------------------------------------

    def inc(self, name: str, by: float = 1.0) -> None:
        """Raises: KeyError: ``name`` is not one of ``LEGACY``'s counters."""
        metric = self._legacy[name]
        if not isinstance(metric, Counter):
            raise KeyError(name)
        if by:
            metric.inc(by)

    def set(self, name: str, value: float) -> None:
        """Raises: KeyError: ``name`` is not one of ``LEGACY``'s gauges."""
        metric = self._legacy[name]
        if not isinstance(metric, Gauge):
            raise KeyError(name)
        metric.set(value)

    def get(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The current value of a sample (``..._total`` for counters); 0.0 for a series not yet seen."""
        return self.registry.get_sample_value(name, labels) or 0.0

    # -- requests ---------------------------------------------------------------------------------------

    def observe_request(self, route: str | None, method: str, status: int, seconds: float) -> None:
        """One answered request. ``route`` is the matched route's template (None: no route matched)."""
        key = ("req", route or UNMATCHED, method, str(status))
        child = self._bound.get(key)
        if child is None:
            r, m = route or UNMATCHED, method if method in _METHODS else "OTHER"
            child = self._bound[key] = (self._requests.labels(r, m, str(status)), self._latency.labels(r, m))
        child[0].inc()
        child[1].observe(seconds)

    # -- credentials ------------------------------------------------------------------------------------

    def know_grants(self, names: Iterable[str]) -> None:
        """The catalog's grant names: the only values the grant label takes (anything else is ``<other>``)."""
        self._grants = frozenset(names)
        for g in self._grants:
            self._bound[("issued", g)] = self._issued.labels(g)

    def credential_issued(self, grant: str) -> None:
        child = self._bound.get(("issued", grant))
        if child is None:
            child = self._bound[("issued", grant)] = self._issued.labels(self._grant(grant))
        child.inc()

    def credential_denied(self, grant: str, reason: str) -> None:
        """``reason`` is a ``BrokerError.code`` (a closed set)."""
        key = ("denied", grant, reason)
        child = self._bound.get(key)
        if child is None:
            child = self._denied.labels(self._grant(grant), reason)
            if grant in self._grants:  # a stranger's grant name is no key: the cache stays bounded too
                self._bound[key] = child
        child.inc()

    def approval_required(self, grant: str) -> None:
        self._approval_asked.labels(self._grant(grant)).inc()

    def _grant(self, grant: str) -> str:
        return grant if grant in self._grants else OTHER_GRANT

    # -- Vault and the store ----------------------------------------------------------------------------

    def observe_vault(self, operation: str, seconds: float, error: str | None) -> None:
        """One Vault request (``broker.vault.VaultClient``'s observer). ``operation`` is one of its fixed names."""
        child = self._bound.get(("vault", operation))
        if child is None:
            child = self._bound[("vault", operation)] = self._vault_latency.labels(operation)
        child.observe(seconds)
        if error is not None:
            self._vault_errors.labels(operation, error).inc()

    def observe_transaction(self, seconds: float, failed: bool) -> None:
        """One store transaction (``broker.store``'s observer)."""
        self._store_latency.observe(seconds)
        if failed:
            self._store_errors.inc()

    # -- the scrape -------------------------------------------------------------------------------------

    async def render(self, snapshot: Callable[[], Awaitable[StoreSnapshot]] | None = None) -> bytes:
        """The exposition (text format 0.0.4). ``snapshot`` reads the store's gauges; at most once per
        ``snapshot_ttl`` s. A store that fails to answer leaves those gauges out of this scrape.
        """
        if snapshot is not None:
            now = time.monotonic()
            if now - self._snapshot_at >= self.snapshot_ttl:
                self._snapshot_at = now
                try:
                    self._store_gauges.snapshot = await snapshot()
                except BrokerError:  # a store outage must not fail the scrape: /v1/health says it
                    self._store_gauges.snapshot = None
        return generate_latest(self.registry)
