"""The fault proxy itself (tests/support/faultproxy.py), against a tiny loopback HTTP server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from tests.support.faultproxy import FaultProxy


@pytest_asyncio.fixture
async def proxied() -> AsyncIterator[tuple[FaultProxy, list[str]]]:
    """A server that records each request's path, behind a proxy."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.path)
        await request.read()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    proxy = await FaultProxy("127.0.0.1", port).start()
    try:
        yield proxy, seen
    finally:
        await proxy.close()
        await runner.cleanup()


async def _get(session: aiohttp.ClientSession, url: str, timeout: float = 2.0) -> str:
    async with session.post(url, data=b"x" * 10, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        return await r.text()


class TestFaultProxy:
    async def test_pass_forwards_and_frames_requests(self, proxied: tuple[FaultProxy, list[str]]) -> None:
        """In pass mode requests go through on one keep-alive connection and are counted by path."""
        proxy, seen = proxied
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                assert await _get(s, proxy.addr + "/v1/a/b") == "ok"
        assert seen == ["/v1/a/b"] * 3 and proxy.requests["a/b"] == 3

    async def test_drop_holds_until_heal(self, proxied: tuple[FaultProxy, list[str]]) -> None:
        """During a drop nothing reaches the server; after heal a still-waiting request completes."""
        proxy, seen = proxied
        async with aiohttp.ClientSession() as s:
            proxy.drop()
            with pytest.raises(asyncio.TimeoutError):
                await _get(s, proxy.addr + "/v1/gone", timeout=0.3)
            waiting = asyncio.create_task(_get(s, proxy.addr + "/v1/later", timeout=5))
            await asyncio.sleep(0.3)
            assert seen == []
            proxy.heal()
            assert await waiting == "ok"
        await asyncio.sleep(0.1)
        assert seen == ["/v1/later"]  # the request whose client gave up never arrived

    async def test_drop_after_delivers_the_request_but_not_its_answer(
            self, proxied: tuple[FaultProxy, list[str]]) -> None:
        """drop_after(path): the server handles that request; the client times out; everything after waits."""
        proxy, seen = proxied
        async with aiohttp.ClientSession() as s:
            proxy.drop_after("slow/")
            assert await _get(s, proxy.addr + "/v1/fast") == "ok"
            with pytest.raises(asyncio.TimeoutError):
                await _get(s, proxy.addr + "/v1/slow/x", timeout=0.5)
            assert seen == ["/v1/fast", "/v1/slow/x"] and proxy.dropping
            proxy.heal()
            assert await _get(s, proxy.addr + "/v1/fast") == "ok"

    async def test_cut_resets_open_connections(self, proxied: tuple[FaultProxy, list[str]]) -> None:
        """cut() resets a connection with a request in flight: the client sees a connection error at once."""
        proxy, _ = proxied
        async with aiohttp.ClientSession() as s:
            proxy.drop()
            waiting = asyncio.create_task(_get(s, proxy.addr + "/v1/x", timeout=5))
            await asyncio.sleep(0.2)
            proxy.cut()
            with pytest.raises(aiohttp.ClientError):
                await waiting
            proxy.heal()
            assert await _get(s, proxy.addr + "/v1/x") == "ok"

    async def test_delay_slows_each_way(self, proxied: tuple[FaultProxy, list[str]]) -> None:
        """delay(0.2) makes a round trip take at least 0.4 s."""
        proxy, _ = proxied
        async with aiohttp.ClientSession() as s:
            proxy.delay(0.2)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            assert await _get(s, proxy.addr + "/v1/x") == "ok"
            assert loop.time() - t0 >= 0.4
