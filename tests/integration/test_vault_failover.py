"""The Vault client of a cluster (broker.vault.client rule 6) against the real OpenBao and loopback stand-ins.

The stand-ins are not Vault: a closed port, a server that redirects, one that answers 500 to anything.
What is checked is the client's reaction: it moves to the next node only when a request certainly did
not run there, never follows a redirect with a token, and never sends a create twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from broker.dev.stack import DevOpenBao
from broker.errors import VaultBadResponse
from broker.vault import VaultClient
from tests.support.crash import free_port

pytestmark = pytest.mark.timeout(60)


class StandIn:
    """A loopback HTTP server answering every request with one fixed status line and body; counts requests."""

    def __init__(self, status: bytes, body: bytes = b"", extra: bytes = b"") -> None:
        self.requests: list[bytes] = []
        self._answer = (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n" + extra
                        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        self.addr = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> StandIn:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.addr = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        self.requests.append(head)
        writer.write(self._answer)
        await writer.drain()
        writer.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest_asyncio.fixture(loop_scope="function")
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _paths(stand_in: StandIn) -> list[str]:
    return [h.split(b" ")[1].decode() for h in stand_in.requests]


class TestFailover:
    async def test_a_dead_node_is_skipped_and_the_live_one_remembered(
        self, openbao: DevOpenBao, session: aiohttp.ClientSession
    ) -> None:
        """Node 1 refuses connections: the token create goes to node 2, and the next request starts there."""
        dead = f"http://127.0.0.1:{free_port()}"
        client = VaultClient(session, [dead, openbao.addr], token=openbao.root_token, failover_timeout=5)
        auth = await client.create_child_token(token=openbao.root_token, policies=["default"], ttl=60,
                                               explicit_max_ttl=60, meta={}, display_name="failover")
        assert auth.accessor
        assert client.active_addr == openbao.addr
        assert (await client.lookup_self()).policies

    async def test_standby_and_redirect_move_on_without_the_token_following(
        self, openbao: DevOpenBao, session: aiohttp.ClientSession
    ) -> None:
        """A 429 standby and a 307 redirect: nothing ran there; the request goes to the active node, and the
        redirect's Location (another port) never sees a request."""
        target = await StandIn(b"200 OK", b"{}").start()
        standby = await StandIn(b"429 Too Many Requests", b'{"errors":[]}').start()
        redirect = await StandIn(b"307 Temporary Redirect", b"",
                                 b"Location: " + target.addr.encode() + b"/v1/auth/token/lookup-self\r\n").start()
        try:
            client = VaultClient(session, [standby.addr, redirect.addr, openbao.addr], token=openbao.root_token,
                                 failover_timeout=5)
            await client.read_credential("auth/token/lookup-self", token=openbao.root_token)
            assert client.active_addr == openbao.addr
            assert target.requests == []
            asked = [p for s in (standby, redirect) for p in _paths(s) if p != "/v1/sys/health"]
            assert asked == ["/v1/auth/token/lookup-self"]  # the standby, once; then only the active node
        finally:
            for s in (target, standby, redirect):
                s.close()

    async def test_a_create_that_may_have_run_is_not_sent_again(
        self, openbao: DevOpenBao, session: aiohttp.ClientSession
    ) -> None:
        """A 500 to a credential read may mean it was issued: the caller gets the error, no other node the request."""
        broken = await StandIn(b"500 Internal Server Error", b'{"errors":["internal error"]}').start()
        try:
            client = VaultClient(session, [broken.addr, openbao.addr], token=openbao.root_token, failover_timeout=5)
            before = openbao.audit_log.stat().st_size
            with pytest.raises(VaultBadResponse):
                await client.read_credential("auth/token/create", token=openbao.root_token, method="POST",
                                             data={"policies": ["default"], "ttl": "60s"})
            assert _paths(broken) == ["/v1/auth/token/create"]
            assert b"auth/token/create" not in openbao.audit_log.read_bytes()[before:]
        finally:
            broken.close()

    async def test_a_lookup_that_got_a_500_is_asked_elsewhere(
        self, openbao: DevOpenBao, session: aiohttp.ClientSession
    ) -> None:
        """Idempotent requests may run twice: a restarting node's "no audit backend succeeded" moves on."""
        broken = await StandIn(b"500 Internal Server Error",
                               b'{"errors":["no audit backend succeeded in logging the request"]}').start()
        try:
            client = VaultClient(session, [broken.addr, openbao.addr], token=openbao.root_token, failover_timeout=5)
            assert (await client.lookup_self()).policies
        finally:
            broken.close()

    async def test_health_reports_the_active_node(self, openbao: DevOpenBao, session: aiohttp.ClientSession) -> None:
        """sys/health of a cluster is its active node's, whatever the first node answers."""
        standby = await StandIn(b"429 Too Many Requests",
                                b'{"initialized":true,"sealed":false,"standby":true,"version":"x"}').start()
        try:
            client = VaultClient(session, [standby.addr, openbao.addr], token=openbao.root_token)
            h = await client.health(timeout=2)
            assert not h.standby and not h.sealed and client.active_addr == openbao.addr
        finally:
            standby.close()

    async def test_no_node_at_all_is_unavailable_within_the_bound(self, session: aiohttp.ClientSession) -> None:
        from broker.errors import VaultUnavailable

        client = VaultClient(session, [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"],
                             token="t", failover_timeout=1)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(VaultUnavailable):
            await client.lookup_self()
        assert loop.time() - start < 3


class TestTidy:
    async def test_only_a_cluster_policy_may_tidy_leases(
        self, openbao: DevOpenBao, session: aiohttp.ClientSession
    ) -> None:
        """``broker vault sync`` for a cluster lets the broker's token tidy leases; the single-node policy does not."""
        from broker.delegation import Catalog
        from broker.errors import VaultDenied
        from broker.vault.admin import VaultAdmin
        from broker.vault.sync import broker_policy_hcl

        catalog = Catalog(roles={})
        tokens = {}
        with VaultAdmin(openbao.addr, token=openbao.root_token) as admin:
            for name, tidy in (("tidy-yes", True), ("tidy-no", False)):
                admin.put_policy(f"broker-{name}", broker_policy_hcl(catalog, tidy=tidy))
                tokens[name] = (admin.create_token(policies=[f"broker-{name}"], ttl="5m")).client_token
        await VaultClient(session, openbao.addr, token=tokens["tidy-yes"]).tidy_leases()
        with pytest.raises(VaultDenied):
            await VaultClient(session, openbao.addr, token=tokens["tidy-no"]).tidy_leases()
