"""broker.metrics without a server: label values stay bounded, the store is read at most once per interval."""

from __future__ import annotations

import asyncio
import timeit

from prometheus_client import REGISTRY

from broker.errors import StoreUnavailable
from broker.metrics import OTHER_GRANT, UNMATCHED, Metrics, StoreSnapshot

SNAPSHOT = StoreSnapshot(live_tasks=3, live_leases=7, revoke_pending_leases=2, oldest_revoke_pending_at=100.0,
                         pending_approvals=1, chain_head_seq=42, last_checkpoint_at=None, last_checkpoint_seq=None)


class TestLabels:
    def test_a_grant_outside_the_catalog_is_one_label_value(self) -> None:
        """Denials for a thousand made-up grant names are one series, and the child cache does not grow."""
        m = Metrics(process=False)
        m.know_grants(["tickets-db-ro"])
        before = len(m._bound)
        for i in range(1000):
            m.credential_denied(f"made-up-{i}", "grant_not_in_role")
        assert m.get("broker_credentials_denied_total", {"grant": OTHER_GRANT, "reason": "grant_not_in_role"}) == 1000
        assert len(m._bound) == before
        assert b"made-up" not in asyncio.run(m.render())

    def test_unmatched_routes_and_odd_methods_are_bounded(self) -> None:
        """No route is `<unmatched>`; a method outside HTTP's usual ones is OTHER."""
        m = Metrics(process=False)
        m.observe_request(None, "BREW", 404, 0.001)
        assert m.get("broker_http_requests_total", {"route": UNMATCHED, "method": "OTHER", "status": "404"}) == 1

    def test_the_global_registry_is_untouched(self) -> None:
        """Two apps' metrics never meet: nothing registers on prometheus_client's default registry."""
        names = set(REGISTRY._names_to_collectors)
        Metrics()
        Metrics()
        assert set(REGISTRY._names_to_collectors) == names


class TestScrape:
    def test_the_store_is_read_at_most_once_per_interval(self) -> None:
        """A scrape flood reads the store once per snapshot_ttl; the gauges show what it read."""
        m = Metrics(process=False, clock=lambda: 160.0)
        reads = 0

        async def snapshot() -> StoreSnapshot:
            nonlocal reads
            reads += 1
            return SNAPSHOT

        async def flood() -> bytes:
            out = b""
            for _ in range(50):
                out = await m.render(snapshot)
            return out

        text = asyncio.run(flood())
        assert reads == 1
        assert b"broker_leases_live 7.0" in text
        assert b"broker_leases_revoke_pending_oldest_age_seconds 60.0" in text
        assert b"broker_audit_checkpoint_age_seconds" not in text  # no checkpoint yet: absent, not 0

    def test_a_store_outage_leaves_the_gauges_out_not_the_scrape(self) -> None:
        """StoreUnavailable while reading the gauges: the scrape still answers, without them."""
        m = Metrics(process=False)

        async def down() -> StoreSnapshot:
            raise StoreUnavailable("the store is unavailable")

        text = asyncio.run(m.render(down))
        assert b"broker_http_requests_total" in text and b"broker_tasks_live" not in text


class TestCost:
    def test_a_request_costs_microseconds(self) -> None:
        """Counting and timing one request (bound children) stays far below the issuance path's milliseconds."""
        m = Metrics(process=False)
        m.know_grants(["tickets-db-ro"])
        per_call = min(timeit.repeat(lambda: (m.observe_request("/v1/tasks/{task_id}/credentials", "POST", 200, 0.004),
                                             m.credential_issued("tickets-db-ro"),
                                             m.observe_vault("read credential", 0.002, None),
                                             m.observe_transaction(0.0005, False)),
                                     number=2000, repeat=3)) / 2000
        print(f"instrumentation per issuance: {per_call * 1e6:.1f} us")
        assert per_call < 100e-6
