"""Singleton leases (broker.store.singletons, broker.singletons): one holder at a time, takeover after a lapse.

On the SQLite store (the same statements run on PostgreSQL: tests/integration/test_ha_cluster.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from broker.errors import StoreUnavailable
from broker.singletons import Singleton
from broker.store import Store, open_store


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_store(f"sqlite:///{tmp_path / 'broker.db'}")
    try:
        yield s
    finally:
        await s.close()


class TestLeaseRow:
    async def test_one_holder_at_a_time(self, store: Store) -> None:
        """The first caller gets the lease; another is refused while it runs; the holder renews it."""
        first = await store.hold_singleton("maintenance", "a", ttl=5)
        assert first is not None and first.fence == 1 and 4 < first.remaining <= 5
        assert await store.hold_singleton("maintenance", "b", ttl=5) is None
        again = await store.hold_singleton("maintenance", "a", ttl=5)
        assert again is not None and again.fence == 1

    async def test_a_lapsed_lease_is_taken_with_a_new_fence(self, store: Store) -> None:
        """Once the holder stops renewing, the next caller takes it over, and the fence grows."""
        assert await store.hold_singleton("tailer", "a", ttl=0.3) is not None
        await asyncio.sleep(0.4)
        taken = await store.hold_singleton("tailer", "b", ttl=5)
        assert taken is not None and taken.fence == 2
        assert await store.hold_singleton("tailer", "a", ttl=5) is None
        rows = {r.name: r for r in await store.singletons()}
        assert rows["tailer"].holder == "b" and rows["tailer"].fence == 2

    async def test_release_hands_over_at_once(self, store: Store) -> None:
        assert await store.hold_singleton("export", "a", ttl=60) is not None
        await store.release_singleton("export", "b")  # not the holder: nothing happens
        assert await store.hold_singleton("export", "b", ttl=60) is None
        await store.release_singleton("export", "a")
        assert await store.hold_singleton("export", "b", ttl=60) is not None

    async def test_names_are_independent(self, store: Store) -> None:
        assert await store.hold_singleton("maintenance", "a", ttl=5) is not None
        assert await store.hold_singleton("vault-audit-tailer", "b", ttl=5) is not None


class _Work:
    """Records when each replica's work runs, to check that two never overlap."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.overlaps = 0
        self.ran: list[str] = []

    def of(self, who: str) -> Callable[[], Coroutine[Any, Any, None]]:
        async def work() -> None:
            self.running.add(who)
            self.ran.append(who)
            try:
                while True:
                    if len(self.running) > 1:
                        self.overlaps += 1
                    await asyncio.sleep(0.01)
            finally:
                self.running.discard(who)
        return work


class TestSingletonRunner:
    async def test_takeover_when_the_holder_cannot_renew(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        """A holder whose store fails stops its work before its lease lapses; the other replica then takes over
        within lease + one renewal, and the two never run at once."""
        work = _Work()
        a = Singleton("maintenance", work.of("a"), store=store, holder="a", lease=0.8, renew_every=0.2)
        b = Singleton("maintenance", work.of("b"), store=store, holder="b", lease=0.8, renew_every=0.2)
        ta = asyncio.create_task(a.run_forever())
        await asyncio.sleep(0.3)
        tb = asyncio.create_task(b.run_forever())
        await asyncio.sleep(0.5)
        assert a.state.held and not b.state.held and work.ran == ["a"]
        real = store.hold_singleton

        async def broken(name: str, holder: str, *, ttl: float) -> object:
            if holder == "a":
                raise StoreUnavailable("the store is unavailable")
            return await real(name, holder, ttl=ttl)

        monkeypatch.setattr(store, "hold_singleton", broken)
        cut = time.monotonic()
        for _ in range(100):
            if b.state.held:
                break
            await asyncio.sleep(0.02)
        took = time.monotonic() - cut
        assert b.state.held and not a.state.held
        assert took < 0.8 + 0.2 + 0.3
        assert work.overlaps == 0 and work.ran == ["a", "b"]
        assert b.state.fence == 2
        for t in (ta, tb):
            t.cancel()
        await asyncio.gather(ta, tb, return_exceptions=True)

    async def test_a_clean_stop_releases(self, store: Store) -> None:
        """Cancelling the holder (a clean shutdown) gives the lease up: the next replica need not wait."""
        work = _Work()
        a = Singleton("export", work.of("a"), store=store, holder="a", lease=30, renew_every=0.2)
        ta = asyncio.create_task(a.run_forever())
        await asyncio.sleep(0.2)
        assert a.state.held
        ta.cancel()
        await asyncio.gather(ta, return_exceptions=True)
        assert await store.hold_singleton("export", "b", ttl=5) is not None

    async def test_failed_work_restarts(self, store: Store) -> None:
        runs: list[int] = []

        async def flaky() -> None:
            runs.append(1)
            if len(runs) == 1:
                raise RuntimeError("boom")
            await asyncio.sleep(10)

        s = Singleton("m", flaky, store=store, holder="a", lease=1, renew_every=0.1)
        t = asyncio.create_task(s.run_forever())
        await asyncio.sleep(0.5)
        assert len(runs) == 2 and s.state.held
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)

    def test_lease_must_outlast_two_renewals(self, store: Store) -> None:
        async def nothing() -> None:
            return None

        with pytest.raises(ValueError, match="outlast"):
            Singleton("m", nothing, store=store, holder="a", lease=2, renew_every=1)
