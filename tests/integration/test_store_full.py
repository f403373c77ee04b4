"""A full disk under the SQLite store: issuance fails closed and readiness says so (issue 15).

The store lives on a small tmpfs mounted for this test (root only: skipped, with the reason, where
``mount`` is not allowed). The disk is filled for real, with a file written until ENOSPC; then every
issuance answers 503 ``store_unavailable``, and ``GET /v1/health`` must not answer 200 ``store: ok`` as a
read-only check would: it commits a write, so it answers 503 ``store: unwritable``. Freeing the space
makes both work again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from broker.app import make_app
from tests.conftest import AGENT, BrokerSite, bearer

Client = TestClient[Any, Any]
READINESS_TTL = 1.0  # broker.readiness caches a report this long


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs, unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    # CI and the developers' machines run as root: a failed mount is a broken machine, not a reason to skip.
    assert done.returncode == 0, f"cannot mount a tmpfs (the test runs as root): {done.stderr.strip()}"
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def fill(path: Path) -> int:
    """Write zeros to ``path`` until the file system says ENOSPC; the bytes written."""
    written = 0
    with path.open("wb", buffering=0) as f:
        chunk = b"\0" * 65536
        while True:
            try:
                written += f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
        with contextlib.suppress(OSError):  # the last partial page, if any
            while True:
                written += f.write(b"\0" * 512)
    return written


class TestFullDisk:
    async def test_full_disk_fails_issuance_and_readiness_says_store_unwritable(
            self, site: BrokerSite, small_disk: Path, aiohttp_client: Callable[..., Awaitable[Client]]) -> None:
        """Disk full: issuance 503 store_unavailable, health 503 {vault: ok, store: unwritable}; space freed: both back."""
        settings = site.settings.model_copy(update={
            "store": site.settings.store.model_copy(update={"url": f"sqlite:///{small_disk / 'broker.db'}"})})
        client = await aiohttp_client(make_app(settings))
        user, agent = bearer(site.ids.user()), bearer(site.ids.agent())
        resp = await client.post("/v1/tasks", json={"agent": AGENT, "role": "support-triage", "ttl": "10m",
                                                    "reason": "disk drill"}, headers=user)
        assert resp.status == 201, await resp.text()
        task = (await resp.json())["id"]

        async def issue() -> Any:
            return await client.post(f"/v1/tasks/{task}/credentials", json={"grant": "agent-cert"}, headers=agent)

        assert (await issue()).status == 200
        health = await client.get("/v1/health")
        assert health.status == 200 and (await health.json())["store"] == "ok"

        filler = small_disk / "filler"
        assert fill(filler) > 0
        answers = []
        for _ in range(20):  # SQLite may reuse a few WAL frames it already has before it needs more space
            resp = await issue()
            answers.append(resp.status)
            if resp.status == 503:
                assert (await resp.json())["code"] == "store_unavailable"
                break
        assert answers[-1] == 503, answers
        await asyncio.sleep(READINESS_TTL + 0.2)
        health = await client.get("/v1/health")
        body = await health.json()
        assert health.status == 503, body
        assert (body["status"], body["vault"], body["store"]) == ("unavailable", "ok", "unwritable")

        os.unlink(filler)
        await asyncio.sleep(READINESS_TTL + 0.2)
        health = await client.get("/v1/health")
        assert health.status == 200, await health.text()
        assert (await issue()).status == 200

    async def test_health_checks_are_rate_limited(self, client: Client) -> None:
        """A flood of health checks makes one store write per readiness period, not one per request."""
        from broker.api import STORE

        store = client.app[STORE]
        writes = 0
        original = store.probe_write

        async def counting(*, now: float) -> None:
            nonlocal writes
            writes += 1
            await original(now=now)

        store.probe_write = counting  # type: ignore[method-assign,unused-ignore]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        answers = await asyncio.gather(*(client.get("/v1/health") for _ in range(50)))
        elapsed = loop.time() - t0
        assert {r.status for r in answers} == {200}
        assert 1 <= writes <= 1 + int(elapsed / READINESS_TTL), (writes, elapsed)
