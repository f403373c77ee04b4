"""A loopback TCP proxy that breaks the network between the broker and OpenBao on demand.

The broker under test points ``[vault].addr`` at ``proxy.addr``; the test's own Vault-truth checks use
OpenBao's direct address. Faults, all reversible by ``heal()``:

- ``drop()``: a partition (a blackhole). Connections stay open and new ones are accepted, but nothing
  is forwarded either way; bytes already sent wait, as TCP retransmission would, and flow again at
  ``heal()``. A peer that gives up meanwhile (a client timeout closes its socket) takes its waiting
  bytes with it: the other side never receives them, as with a real reset.
- ``drop_after(path)``: a partition that starts right after the first request whose path starts with
  ``path`` has been delivered to OpenBao. Vault does the work; its answer (and everything after it)
  waits for ``heal()``. That is the ambiguous failure a real partition makes mid-operation.
- ``delay(seconds)``: every chunk, both ways, waits that long before it is forwarded.
- ``cut()``: every open connection is reset (RST), once.

Client-to-server bytes are framed into HTTP/1.1 requests (request line, ``Content-Length``) so that
``drop_after`` acts on request boundaries; a stream that is not framable is forwarded as it comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import Counter
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Conn:
    client_reader: asyncio.StreamReader
    client_writer: asyncio.StreamWriter
    upstream_writer: asyncio.StreamWriter | None = None
    to_upstream: asyncio.Queue[tuple[str | None, bytes] | None] = field(default_factory=asyncio.Queue)
    to_client: asyncio.Queue[bytes | None] = field(default_factory=asyncio.Queue)
    closed: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    """One upstream, any number of connections; faults apply to all of them at once."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._open = asyncio.Event()
        self._open.set()
        self._delay = 0.0
        self._trigger: str | None = None
        self._conns: set[_Conn] = set()
        self._later: set[asyncio.Task[None]] = set()
        self.port = 0
        self.requests: Counter[str] = Counter()
        self.drops = 0
        self.resets = 0

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dropping(self) -> bool:
        return not self._open.is_set()

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        self.heal()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            self._shut(conn, reset=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- faults ----------------------------------------------------------------------------------------

    def drop(self) -> None:
        """Start a partition now (see the module docstring)."""
        if self._open.is_set():
            self.drops += 1
        self._open.clear()

    def drop_after(self, path: str) -> None:
        """Start a partition right after the next request to ``path...`` reached the upstream."""
        self._trigger = path

    def heal(self) -> None:
        """End a partition and any delay; what waited flows again."""
        self._trigger = None
        self._delay = 0.0
        self._open.set()

    def delay(self, seconds: float) -> None:
        self._delay = seconds

    def cut(self) -> None:
        """Reset every open connection (both sides)."""
        for conn in list(self._conns):
            self._shut(conn, reset=True)
            self.resets += 1

    # -- plumbing --------------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(reader, writer)
        self._conns.add(conn)
        conn.tasks = [asyncio.create_task(self._read_client(conn)), asyncio.create_task(self._to_upstream(conn)),
                      asyncio.create_task(self._to_client(conn))]

    async def _gate(self) -> None:
        await self._open.wait()
        if self._delay:
            await asyncio.sleep(self._delay)
            await self._open.wait()

    async def _read_client(self, conn: _Conn) -> None:
        """Read the client continuously (so a client that gives up is seen at once), framing requests."""
        buf = b""
        framable = True
        try:
            while True:
                data = await conn.client_reader.read(65536)
                if not data:
                    break
                if not framable:
                    conn.to_upstream.put_nowait((None, data))
                    continue
                buf += data
                while True:
                    head_end = buf.find(b"\r\n\r\n")
                    if head_end < 0:
                        break
                    head = buf[:head_end].decode("latin-1")
                    lines = head.split("\r\n")
                    parts = lines[0].split(" ")
                    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
                    if "chunked" in headers.get("transfer-encoding", "").lower() or len(parts) != 3:
                        framable = False
                        conn.to_upstream.put_nowait((None, buf))
                        buf = b""
                        break
                    size = head_end + 4 + int(headers.get("content-length", "0") or 0)
                    if len(buf) < size:
                        break
                    path = parts[1].split("?", 1)[0].removeprefix("/v1/")
                    conn.to_upstream.put_nowait((path, buf[:size]))
                    buf = buf[size:]
        except (ConnectionError, OSError):
            pass
        # The client is gone (or done): what it sent and the partition still holds dies with it.
        self._shut(conn, reset=False)

    async def _to_upstream(self, conn: _Conn) -> None:
        try:
            await self._gate()
            if conn.closed:
                return
            reader, writer = await asyncio.open_connection(*self._upstream)
            conn.upstream_writer = writer
            conn.tasks.append(asyncio.create_task(self._read_upstream(conn, reader)))
            while True:
                item = await conn.to_upstream.get()
                if item is None:
                    return
                path, data = item
                await self._gate()
                if conn.closed:
                    return
                writer.write(data)
                await writer.drain()
                if path is not None:
                    self.requests[path] += 1
                    if self._trigger is not None and path.startswith(self._trigger):
                        self._trigger = None
                        self.drop()
        except (ConnectionError, OSError):
            self._shut(conn, reset=True)

    async def _read_upstream(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                conn.to_client.put_nowait(data)
        except (ConnectionError, OSError):
            pass
        conn.to_client.put_nowait(None)

    async def _to_client(self, conn: _Conn) -> None:
        try:
            while True:
                data = await conn.to_client.get()
                await self._gate()
                if conn.closed:
                    return
                if data is None:
                    self._shut(conn, reset=False)
                    return
                conn.client_writer.write(data)
                await conn.client_writer.drain()
        except (ConnectionError, OSError):
            self._shut(conn, reset=True)

    def _shut(self, conn: _Conn, *, reset: bool) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        conn.to_upstream.put_nowait(None)
        for writer in (conn.client_writer, conn.upstream_writer):
            if writer is None:
                continue
            if reset:
                _reset(writer)
            elif writer is conn.upstream_writer and self.dropping:
                # Across a partition the server learns of the client's close only once it heals.
                self._later.add(asyncio.create_task(self._close_after_heal(writer)))
            else:
                writer.close()
        current = asyncio.current_task()
        for t in conn.tasks:
            if t is not current and not t.done():
                t.cancel()


    async def _close_after_heal(self, writer: asyncio.StreamWriter) -> None:
        await self._open.wait()
        writer.close()
        task = asyncio.current_task()
        if task is not None:
            self._later.discard(task)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: SO_LINGER 0, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
