"""Two replicas (two apps) on one PostgreSQL store: what one decides, the other sees at once.

- An approval decided on replica A wakes a long poll held on replica B within a second (LISTEN/NOTIFY
  on the store, broker.store.wakeups), not at B's next re-read (5 s while it listens).
- Singletons: exactly one replica holds each, and says so in ``GET /v1/health``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_asyncio

from broker.api import APPROVALS
from broker.app import make_app
from broker.config import load_settings
from tests.api.test_approvals import decide, requested
from tests.conftest import BrokerSite, bearer
from tests.support.pg import scratch_database


@pytest_asyncio.fixture
async def two_replicas(site: BrokerSite, aiohttp_client: Callable[..., Any]) -> AsyncIterator[tuple[Any, Any]]:
    pg = site.engines.pg
    async with scratch_database(pg) as name:
        settings = load_settings({"BROKER_STORE_URL": pg.dsn(name)}, site.root / "broker.toml")
        a = await aiohttp_client(make_app(settings))
        b = await aiohttp_client(make_app(settings))
        yield a, b
        await a.close()
        await b.close()


class TestTwoReplicas:
    async def test_a_decision_on_one_replica_wakes_a_long_poll_on_the_other(
        self, two_replicas: tuple[Any, Any], site: BrokerSite
    ) -> None:
        a, b = two_replicas
        for _ in range(100):  # B's listener connects in the background
            if b.app[APPROVALS].listening():
                break
            await asyncio.sleep(0.05)
        assert b.app[APPROVALS].listening()
        _task, apr = await requested(a, site)

        async def poll() -> tuple[float, dict[str, Any]]:
            resp = await b.get(f"/v1/approvals/{apr}?wait=30", headers=bearer(site.ids.agent()))
            return time.monotonic(), await resp.json()

        waiter = asyncio.create_task(poll())
        await asyncio.sleep(0.5)  # the poll is waiting on B
        await decide(a, site, apr)
        decided = time.monotonic()
        answered, body = await waiter
        assert body["state"] == "approved"
        assert answered - decided < 1.0, f"woke {answered - decided:.2f} s after the decision"

    async def test_each_singleton_has_one_holder(self, two_replicas: tuple[Any, Any]) -> None:
        a, b = two_replicas
        held: list[str] = []
        for _ in range(100):
            held = []
            for client in (a, b):
                held += (await (await client.get("/v1/health")).json())["singletons"]
            if "maintenance" in held and "vault-audit-tailer" in held:
                break
            await asyncio.sleep(0.1)
        assert sorted(held) == ["maintenance", "vault-audit-tailer"]
