"""The broker's HTTP/1.1 transport to Vault (broker.vault.transport), against real loopback sockets.

What the failover rules and the hot path rely on: connections are kept alive and reused, an answer is
read whole (Content-Length or chunked), every failure is told apart (nothing sent, maybe executed, not
HTTP, too slow, TLS), and a connection whose answer is in doubt is never used again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.errors import VaultError, VaultUnavailable
from broker.vault.client import VaultClient
from broker.vault.transport import BadAnswer, ConnectFailed, Disconnected, Node, TLSFailed, Transport

Answer = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # (request head, writer) -> keep open?


@dataclass
class Server:
    """A loopback HTTP server whose answer is a test's function; it counts connections and requests."""

    answer: Answer
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0

    @property
    def node(self) -> Node:
        return Node.parse(f"http://127.0.0.1:{self.port}")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if not await self.answer(head, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def ok(body: bytes = b'{"ok":true}', *, close: bool = False) -> Answer:
    async def answer(_head: bytes, writer: asyncio.StreamWriter) -> bool:
        extra = b"Connection: close\r\n" if close else b""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
                     % (extra, len(body), body))
        await writer.drain()
        return not close
    return answer


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Callable[[Answer], Awaitable[Server]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> Server:
        srv = Server(answer)
        server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
        srv.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return srv

    yield start
    for s in servers:
        s.close()


async def get(t: Transport, srv: Server, path: str = "sys/health", timeout: float = 2.0) -> tuple[int, bytes]:
    return await t.request(srv.node, "GET", path, headers={"X-Vault-Request": "true"}, body=None, timeout=timeout)


class TestKeepAlive:
    async def test_sequential_requests_share_one_connection(self, serve: Callable[[Answer], Awaitable[Server]]
                                                             ) -> None:
        srv = await serve(ok())
        t = Transport()
        for _ in range(5):
            assert await get(t, srv) == (200, b'{"ok":true}')
        assert srv.connections == 1 and len(srv.requests) == 5
        t.close()

    async def test_an_answer_that_closes_is_not_reused(self, serve: Callable[[Answer], Awaitable[Server]]) -> None:
        srv = await serve(ok(close=True))
        t = Transport()
        for _ in range(3):
            assert (await get(t, srv))[0] == 200
        assert srv.connections == 3

    async def test_a_connection_the_server_closed_while_idle_is_replaced(
            self, serve: Callable[[Answer], Awaitable[Server]]) -> None:
        async def once(head: bytes, writer: asyncio.StreamWriter) -> bool:
            await ok()(head, writer)
            return False  # closes after answering, without saying so
        srv = await serve(once)
        t = Transport()
        assert (await get(t, srv))[0] == 200
        await asyncio.sleep(0.05)  # the server's FIN reaches the idle connection
        assert (await get(t, srv))[0] == 200
        assert srv.connections == 2

    async def test_concurrent_requests_are_bounded_by_the_limit(
            self, serve: Callable[[Answer], Awaitable[Server]]) -> None:
        async def slow(head: bytes, writer: asyncio.StreamWriter) -> bool:
            await asyncio.sleep(0.02)
            return await ok()(head, writer)
        srv = await serve(slow)
        t = Transport(limit=3)
        answers = await asyncio.gather(*(get(t, srv) for _ in range(12)))
        assert [a[0] for a in answers] == [200] * 12
        assert srv.connections == 3


class TestAnswers:
    async def test_a_chunked_answer_is_read_whole(self, serve: Callable[[Answer], Awaitable[Server]]) -> None:
        async def chunked(_head: bytes, writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\n{\"a\":\r\n3\r\n12}\r\n0\r\n\r\n")
            await writer.drain()
            return True
        srv = await serve(chunked)
        t = Transport()
        assert await get(t, srv) == (200, b'{"a":12}')
        assert await get(t, srv) == (200, b'{"a":12}')
        assert srv.connections == 1

    async def test_a_204_has_no_body_and_keeps_the_connection(
            self, serve: Callable[[Answer], Awaitable[Server]]) -> None:
        async def empty(_head: bytes, writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
            return True
        srv = await serve(empty)
        t = Transport()
        assert await get(t, srv) == (204, b"")
        assert await get(t, srv) == (204, b"")
        assert srv.connections == 1

    async def test_the_request_is_what_vault_expects(self, serve: Callable[[Answer], Awaitable[Server]]) -> None:
        srv = await serve(ok())
        t = Transport()
        await t.request(srv.node, "POST", "pki/issue/agents", query={"list": "true"},
                        headers={"X-Vault-Token": "s.test", "Content-Type": "application/json"},
                        body=b'{"ttl":"60s"}', timeout=2)
        head, _, body = srv.requests[0].partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        assert lines[0] == b"POST /v1/pki/issue/agents?list=true HTTP/1.1"
        assert f"Host: 127.0.0.1:{srv.port}".encode() in lines
        assert b"X-Vault-Token: s.test" in lines and b"Content-Length: 13" in lines
        assert body == b'{"ttl":"60s"}'

    async def test_not_http_is_a_bad_answer(self, serve: Callable[[Answer], Awaitable[Server]]) -> None:
        async def garbage(_head: bytes, writer: asyncio.StreamWriter) -> bool:
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
            await writer.drain()
            return True
        srv = await serve(garbage)
        with pytest.raises(BadAnswer):
            await get(Transport(), srv)

    async def test_an_answer_over_the_limit_is_refused(self, serve: Callable[[Answer], Awaitable[Server]]) -> None:
        srv = await serve(ok(b"x" * 5000))
        with pytest.raises(BadAnswer, match="larger than 4096"):
            await get(Transport(max_answer=4096), srv)


class TestFailures:
    async def test_a_closed_port_is_connect_failed(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(ConnectFailed):
            await Transport().request(Node.parse(f"http://127.0.0.1:{port}"), "GET", "sys/health", headers={},
                                      body=None, timeout=2)

    async def test_a_connection_cut_mid_answer_is_disconnected(
            self, serve: Callable[[Answer], Awaitable[Server]]) -> None:
        async def cut(_head: bytes, writer: asyncio.StreamWriter) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"half\":")
            await writer.drain()
            return False
        srv = await serve(cut)
        with pytest.raises(Disconnected):
            await get(Transport(), srv)

    async def test_a_silent_server_times_out_and_its_connection_is_dropped(
            self, serve: Callable[[Answer], Awaitable[Server]]) -> None:
        calls = [0]

        async def first_silent(head: bytes, writer: asyncio.StreamWriter) -> bool:
            calls[0] += 1
            if calls[0] == 1:
                await asyncio.sleep(1)  # answers late, on a connection the client gave up
            return await ok()(head, writer)
        srv = await serve(first_silent)
        t = Transport()
        with pytest.raises(TimeoutError):
            await get(t, srv, timeout=0.2)
        assert (await get(t, srv))[0] == 200
        assert srv.connections == 2  # the late answer was never read as the second request's

    async def test_a_cancelled_request_drops_its_connection(
            self, serve: Callable[[Answer], Awaitable[Server]]) -> None:
        async def slow(head: bytes, writer: asyncio.StreamWriter) -> bool:
            await asyncio.sleep(0.3)
            return await ok()(head, writer)
        srv = await serve(slow)
        t = Transport()
        pending = asyncio.ensure_future(get(t, srv))
        await asyncio.sleep(0.05)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert (await get(t, srv))[0] == 200
        assert srv.connections == 2

    async def test_a_header_with_a_line_break_is_refused_before_sending(
            self, serve: Callable[[Answer], Awaitable[Server]]) -> None:
        srv = await serve(ok())
        with pytest.raises(ValueError, match="line break"):
            await Transport().request(srv.node, "GET", "sys/health", headers={"X-Vault-Token": "a\r\nX-Evil: 1"},
                                      body=None, timeout=2)
        assert srv.requests == [] and srv.connections == 0

    async def test_the_client_maps_each_failure(self, serve: Callable[[Answer], Awaitable[Server]]) -> None:
        """Through VaultClient: refused and cut are "unavailable", a bad address is a configuration error."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(VaultUnavailable):
            await VaultClient(None, f"http://127.0.0.1:{port}", token="t", timeout=2).lookup_self()  # type: ignore[arg-type]
        bad = VaultClient(None, "ftp://127.0.0.1:1", token="t", timeout=2)  # type: ignore[arg-type]
        with pytest.raises(VaultError) as info:
            await bad.lookup_self()
        assert type(info.value) is VaultError


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class TestTLS:
    async def test_an_untrusted_certificate_fails_as_tls_and_a_trusted_one_works(self, tmp_path: Path) -> None:
        cert, key = _self_signed(tmp_path)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(cert, key)
        srv = Server(ok())
        server = await asyncio.start_server(srv.handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        node = Node.parse(f"https://127.0.0.1:{port}")
        try:
            with pytest.raises(TLSFailed):
                await Transport().request(node, "GET", "sys/health", headers={}, body=None, timeout=2)
            trusting = ssl.create_default_context(cafile=str(cert))
            t = Transport(ssl_context=trusting)
            assert await t.request(node, "GET", "sys/health", headers={}, body=None, timeout=2) == (
                200, b'{"ok":true}')
            t.close()
        finally:
            server.close()
