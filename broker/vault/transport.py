"""HTTP/1.1 to Vault on keep-alive connections: the broker's requests to Vault, at a fraction of aiohttp's cost.

aiohttp's client spent 125-245 µs of CPU per request to OpenBao on the benchmark host (its request object,
its timeout handle, the connector's bookkeeping): 30-50% of the event loop's work per credential. This
module spends 60-90 µs: an ``asyncio.Protocol`` per connection and httptools' C parser (llhttp, the
parser aiohttp and Node use). It speaks only what the Vault API needs: one request at a time on a
connection, a bytes body, answers with ``Content-Length`` or chunked, keep-alive unless the server says
``close``. An answer delimited only by the end of the connection (HTTP/1.0 style) is read as a broken one:
Vault, and the proxies put in front of it, send a length or chunks.

Failures are told apart as the failover rules need them (``broker.vault.nodes`` rule 6):

- :class:`ConnectFailed`: no connection was made (refused, unreachable, connect timeout); nothing was sent.
- :class:`TLSFailed`: the TLS handshake or the certificate check failed: a configuration problem or an
  attack, never "retry later".
- :class:`Disconnected`: the connection broke before a whole answer; the request may have executed.
- :class:`BadAnswer`: the bytes are not an HTTP answer (or one too large).
- ``TimeoutError``: no whole answer within the request's time.

Rules:
1. A connection goes back to the pool only after a whole answer that allows keep-alive; a cancelled or
   failed request closes its connection (its answer may still arrive, for nobody).
2. Header values with CR, LF or NUL are refused before anything is sent (no header injection).
3. An idle connection is used again only if it is still open and was idle less than ``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import errno
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, cast

import httptools

__all__ = ["BadAnswer", "ConnectFailed", "Disconnected", "Node", "TLSFailed", "Transport"]

_MAX_ANSWER: Final = 32 * 1024 * 1024  # bytes of body; Vault's largest answers (lists, CRLs) are far smaller
_UNSAFE_HEADER = re.compile(r"[\r\n\x00]")
_SAFE_TARGET = re.compile(r"[A-Za-z0-9_.\-/~]*")


class ConnectFailed(OSError):
    """No connection to the node: nothing was sent."""


class Disconnected(OSError):
    """The connection broke before a whole answer: the request may have executed."""


class TLSFailed(Exception):  # not an OSError (ssl.SSLError is one): never "unavailable, retry later"
    """The TLS handshake or the server's certificate check failed."""


class BadAnswer(ValueError):
    """The answer is not HTTP, or is larger than the client takes."""


@dataclass(frozen=True)
class Node:
    """Where a Vault node is: ``http(s)://host[:port][/prefix]``, parsed once."""

    scheme: str
    host: str
    port: int
    host_header: str
    prefix: str  # the base path before ``/v1/``, without a trailing slash

    @classmethod
    def parse(cls, base: str) -> Node:
        """Raises: ValueError: not an http or https URL with a host (or with credentials in it)."""
        parts = urllib.parse.urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            msg = f"not an http(s) URL: {base[:80]!r}"
            raise ValueError(msg)
        if parts.username is not None or parts.password is not None:
            msg = "a Vault address must not carry credentials"
            raise ValueError(msg)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.netloc, parts.path.rstrip("/"))


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight (rule 1)."""

    def __init__(self, max_answer: int = _MAX_ANSWER) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._max = max_answer
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reusable = False
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._body: list[bytes] = []
        self._size = 0

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike: check what is used of one.
        assert callable(getattr(transport, "write", None)) and callable(getattr(transport, "abort", None))
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: this connection is not in a known state
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadAnswer(f"malformed HTTP answer ({type(exc).__name__})"))

    def eof_received(self) -> bool:
        self._fail(Disconnected("the server closed the connection before a whole answer"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(Disconnected("the connection was lost before a whole answer"))

    # -- httptools callbacks

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max:
            self._fail(BadAnswer(f"the answer is larger than {self._max} bytes"))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        body = b"".join(self._body)
        self._body, self._size = [], 0
        self.reusable = bool(self._parser.should_keep_alive())
        if waiter is not None and not waiter.done():
            waiter.set_result((self._parser.get_status_code(), body))

    # -- the pool's side

    def send(self, request: bytes, waiter: asyncio.Future[tuple[int, bytes]]) -> None:
        assert self.transport is not None
        self._waiter = waiter
        self.reusable = False
        self.transport.write(request)

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        self.reusable = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class Transport:
    """Keep-alive connections to Vault's nodes, on the event loop that uses them.

    ``limit`` bounds the connections open at once to one node (as aiohttp's connector did), so a burst
    waits for a connection instead of opening hundreds.
    """

    def __init__(self, *, limit: int = 128, idle_timeout: float = 15.0,
                 ssl_context: ssl.SSLContext | None = None, max_answer: int = _MAX_ANSWER) -> None:
        self._limit = limit
        self._max_answer = max_answer
        self._idle_timeout = idle_timeout
        self._ssl = ssl_context
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: dict[Node, list[_Connection]] = {}
        self._slots: dict[Node, asyncio.Semaphore] = {}

    async def request(self, node: Node, method: str, path: str, *, query: Mapping[str, str] | None = None,
                      headers: Mapping[str, str], body: bytes | None, timeout: float) -> tuple[int, bytes]:
        """Send one request; the answer's status and body.

        Raises:
            ConnectFailed, TLSFailed, Disconnected, BadAnswer, TimeoutError: see the module's text.
            ValueError: a header value with CR, LF or NUL (rule 2); nothing was sent.
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # connections belong to the loop that opened them
            self._forget()
            self._loop = loop
        request = self._render(node, method, path, query, headers, body)
        slot = self._slots.get(node)
        if slot is None:
            slot = self._slots[node] = asyncio.Semaphore(self._limit)
        connecting = False
        try:
            async with asyncio.timeout_at(loop.time() + timeout), slot:
                conn = self._take(node, loop.time())
                if conn is None:
                    connecting = True
                    conn = await self._connect(node)
                    connecting = False
                waiter: asyncio.Future[tuple[int, bytes]] = loop.create_future()
                try:
                    conn.send(request, waiter)
                    answer = await waiter
                except BaseException:
                    conn.close()  # rule 1: its answer, if any, is for nobody
                    raise
        except TimeoutError as exc:
            if connecting:  # nothing was sent: another node may take the request
                raise ConnectFailed(errno.ETIMEDOUT, f"connecting to {node.host_header} timed out") from exc
            raise
        if conn.reusable and not conn.closed:
            conn.idle_since = loop.time()
            self._idle.setdefault(node, []).append(conn)
        else:
            conn.close()
        return answer

    def close(self) -> None:
        """Close every idle connection (those in flight close when their request ends)."""
        self._forget()

    # -- helpers

    def _take(self, node: Node, now: float) -> _Connection | None:
        idle = self._idle.get(node)
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to have been closed by the server
            if not conn.closed and now - conn.idle_since < self._idle_timeout:
                return conn
            conn.close()
        return None

    async def _connect(self, node: Node) -> _Connection:
        loop = asyncio.get_running_loop()
        context: ssl.SSLContext | None = None
        if node.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            _, conn = await loop.create_connection(lambda: _Connection(self._max_answer), node.host, node.port,
                                                   ssl=context,
                                                   server_hostname=node.host if context else None)
        except ssl.SSLError as exc:  # before OSError: ssl.SSLError is one
            why = getattr(exc, "verify_message", None) or exc.reason or type(exc).__name__
            raise TLSFailed(f"TLS with {node.host_header} failed: {why}") from exc
        except OSError as exc:
            raise ConnectFailed(exc.errno, f"cannot connect to {node.host_header}: {exc.strerror or exc}") from exc
        return conn

    @staticmethod
    def _render(node: Node, method: str, path: str, query: Mapping[str, str] | None,
                headers: Mapping[str, str], body: bytes | None) -> bytes:
        target = node.prefix + "/v1/" + (path if _SAFE_TARGET.fullmatch(path) else urllib.parse.quote(path))
        if query:
            target += "?" + urllib.parse.urlencode(query)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {node.host_header}"]
        for name, value in headers.items():
            if _UNSAFE_HEADER.search(name) or _UNSAFE_HEADER.search(value):
                msg = f"header {name[:40]!r} holds a line break or NUL"
                raise ValueError(msg)
            lines.append(f"{name}: {value}")
        payload = body or b""
        if body is not None or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(payload)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload

    def _forget(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        self._slots.clear()
