"""LeaderWatch (broker.revocations): after the active Vault node changes, tidy leases at +5 s and +60 s.

A stand-in for the client's two properties and two calls; what Vault does with a tidy is tested in
tests/integration/test_ha_cluster.py.
"""

from __future__ import annotations

from typing import Any

from broker.revocations import LeaderWatch


class _Client:
    clustered = True

    def __init__(self) -> None:
        self.active_addr = "http://a"
        self.tidies = 0

    async def health(self, *, timeout: float) -> None:
        return None

    async def tidy_leases(self) -> None:
        self.tidies += 1


class TestLeaderWatch:
    async def test_tidies_twice_after_a_change_and_never_without_one(self) -> None:
        now = [1000.0]
        client = _Client()
        watch = LeaderWatch(client, lambda: now[0])  # type: ignore[arg-type]
        for _ in range(3):
            await watch.tick()
            now[0] += 2
        assert client.tidies == 0
        client.active_addr = "http://b"
        await watch.tick()
        assert client.tidies == 0  # not at once: the request path revokes the issuance tokens first
        now[0] += 5
        await watch.tick()
        assert client.tidies == 1
        now[0] += 56
        await watch.tick()
        assert client.tidies == 2
        now[0] += 600
        await watch.tick()
        assert client.tidies == 2

    async def test_a_single_node_is_left_alone(self) -> None:
        client: Any = _Client()
        client.clustered = False
        watch = LeaderWatch(client, lambda: 0.0)
        client.active_addr = "http://b"
        await watch.tick()
        assert client.tidies == 0
