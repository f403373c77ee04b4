"""The tools of ``broker mcp``, as plain async methods over one task (no MCP in here: ``server`` wraps them).

Rules this file keeps:
1. Every call first asks the broker whether the task is still active (``TaskSession.grants``). Once it
   is not, this object closes every connection, forgets every credential and answers ``Gone`` to every
   later call without asking again: a revoked task's database session must not outlive it here.
2. A credential is obtained through the broker (``TaskSession.held``), reused while it has time left,
   renewed or replaced near its end; a connection is kept per grant and opened anew when the credential
   behind it changes.
3. Where to connect is the grant's catalog ``endpoint``; the model names a grant, never a host (an HTTP
   URL's host must be on the grant's allow-list, checked again on every redirect).
4. Results are bounded (``bounds.Limits``): rows and bytes cut with ``truncated: true``, and time by the
   server's own statement timeout plus a client-side deadline. A connection left mid-result is closed.
5. Nothing returned contains a secret: results are built from data only, and ``server`` passes every
   string through the session's ``Redactor`` before it leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import aiohttp
import yarl

from broker import connectors, errors
from broker.endpoints import Endpoint, HostAllowList
from broker.mcp.bounds import Limits, RowCollector, bound_text, bound_value, parse_redis_command
from broker.models import CredentialOut, GrantOut, TaskGrants
from broker.sdk import TaskSession

__all__ = ["TaskTools"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_HTTP_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
# A grant's connection is closed by whatever close function it came with.
_Closer = Callable[[], Awaitable[None]]


@dataclass
class _Conn:
    lease_id: str
    handle: Any
    close: _Closer


class TaskTools:
    """``list_grants``, ``sql_query``, ``redis_command`` and ``http_request`` for one task."""

    def __init__(self, task: TaskSession, limits: Limits, *, ca_file: str | None = None) -> None:
        self._task = task
        self._limits = limits
        self._ca_file = ca_file
        self._conns: dict[str, _Conn] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._ended: str | None = None

    @property
    def redactor(self) -> connectors.Redactor:
        return self._task.redactor

    @property
    def holding(self) -> int:
        """How many connections and credentials this object holds (0 once the task has ended)."""
        return len(self._conns) + self._task.holding

    # -- tools ----------------------------------------------------------------------------------------

    async def list_grants(self) -> dict[str, Any]:
        """The task's grants: what each is for, its risk, how its credential ends, and where it is used."""
        view = await self._live()
        return {"task": view.task, "expires_at": view.expires_at,
                "grants": [_grant_entry(g) for g in view.grants]}

    async def sql_query(self, grant: str, sql: str, approval_id: str | None = None) -> dict[str, Any]:
        """Run one SQL statement on a PostgreSQL or MySQL grant's database as the grant's user."""
        self._limits.check_input("sql", sql)
        view = await self._live()
        g = await self._task.grant(grant, kind=("postgresql", "mysql"), view=view)
        cred = await self._held(grant, approval_id)
        endpoint = _endpoint(g)
        async with self._lock(grant):
            if endpoint.kind == "postgresql":
                return await self._postgres(grant, endpoint, cred, sql)
            return await self._mysql(grant, endpoint, cred, sql)

    async def redis_command(self, grant: str, command: str, approval_id: str | None = None) -> dict[str, Any]:
        """Run one Redis command (a shell-quoted line) as the grant's ACL user."""
        self._limits.check_input("command", command)
        args = parse_redis_command(command)
        view = await self._live()
        g = await self._task.grant(grant, kind="redis", view=view)
        cred = await self._held(grant, approval_id)
        endpoint = _endpoint(g)
        async with self._lock(grant):
            client = await self._conn(grant, cred, lambda: self._open_redis(endpoint, cred))
            try:
                async with asyncio.timeout(self._limits.timeout):
                    reply = await _raw_command(client, args)
            except TimeoutError:
                await self._close(grant)
                raise self._too_slow("the command") from None
            except Exception as exc:
                if _is_redis_error(exc):
                    if _is_connection_error(exc):
                        await self._close(grant)
                    raise connectors.upstream_error(exc, self.redactor, what="the Redis command") from None
                raise
        value, truncated = bound_value(reply, self._limits.max_bytes)
        return {"grant": grant, "reply": value, "truncated": truncated}

    async def http_request(self, grant: str, method: str, url: str, body: str | None = None,
                           approval_id: str | None = None) -> dict[str, Any]:
        """Send one HTTP request with the grant's token or client certificate, to an allowed host only."""
        verb = method.upper()
        if verb not in _HTTP_METHODS:
            msg = f"method must be one of {', '.join(_HTTP_METHODS)}"
            raise errors.ToolRefused(msg)
        self._limits.check_input("url", url)
        if body is not None and body:
            self._limits.check_input("body", body)
        view = await self._live()
        g = await self._task.grant(grant, kind="http", view=view)
        endpoint = _endpoint(g)
        allowed = HostAllowList.parse(g.allowed_hosts, default=endpoint.host)
        target = _target(url, endpoint, allowed)
        cred = await self._held(grant, approval_id)
        async with self._lock(grant):  # only the opening: an aiohttp session serves concurrent requests
            session = await self._conn(grant, cred, lambda: self._open_http(endpoint, allowed, g, cred))
        headers = {"Content-Type": _content_type(body)} if body else {}
        try:
            async with asyncio.timeout(self._limits.timeout), session.request(
                    verb, target, data=body.encode() if body else None, headers=headers, max_redirects=3) as resp:
                raw = await resp.content.read(self._limits.max_bytes + 1)
                status, content_type = resp.status, resp.headers.get("Content-Type", "")
                charset = resp.charset or "utf-8"
        except TimeoutError:
            raise self._too_slow("the request") from None
        except errors.HostNotAllowed:
            raise
        except aiohttp.ClientError as exc:
            raise connectors.upstream_error(exc, self.redactor, what="the HTTP request") from None
        text, truncated = bound_text(raw.decode(charset, "replace"), self._limits.max_bytes)
        return {"grant": grant, "status": status, "content_type": content_type, "body": text,
                "truncated": truncated or len(raw) > self._limits.max_bytes}

    # -- the task, its credentials, its connections ----------------------------------------------------

    async def _live(self) -> TaskGrants:
        if self._ended is not None:
            raise self._gone()
        try:
            return await self._task.grants()
        except errors.Gone as exc:
            await self.drop(str(exc).removeprefix("the task is "))
            raise self._gone() from None

    async def _held(self, grant: str, approval_id: str | None) -> CredentialOut:
        try:
            return await self._task.held(grant, approval_id=approval_id)
        except errors.Gone:
            await self.drop("no longer active")
            raise self._gone() from None

    def _gone(self) -> errors.Gone:
        msg = (f"the task has ended ({self._ended}): this server holds no credential or connection for it "
               "any more, and every tool will answer this")
        return errors.Gone(msg)

    async def drop(self, why: str) -> None:
        """Close every connection, forget every credential; every later call answers ``Gone``."""
        if self._ended is None:
            self._ended = why
            log.info("task %s %s: dropping %d connection(s)", self._task.task_id, why, len(self._conns))
        for grant in list(self._conns):
            await self._close(grant)
        self._task.forget()

    async def close(self) -> None:
        """Close every connection (the server is stopping); the task itself goes on."""
        for grant in list(self._conns):
            await self._close(grant)

    def _lock(self, grant: str) -> asyncio.Lock:
        return self._locks.setdefault(grant, asyncio.Lock())

    async def _conn(self, grant: str, cred: CredentialOut, opener: Callable[[], Awaitable[_Conn]]) -> Any:
        held = self._conns.get(grant)
        if held is not None and held.lease_id != cred.lease_id:
            await self._close(grant)  # the credential behind it was replaced
            held = None
        if held is None:
            held = await opener()
            self._conns[grant] = held
        return held.handle

    async def _close(self, grant: str) -> None:
        held = self._conns.pop(grant, None)
        if held is not None:
            with contextlib.suppress(Exception):
                await held.close()

    def _too_slow(self, what: str) -> errors.UpstreamFailed:
        return errors.UpstreamFailed(f"{what} ran past the {self._limits.timeout:g} s limit and was stopped")

    # -- engines --------------------------------------------------------------------------------------

    async def _postgres(self, grant: str, endpoint: Endpoint, cred: CredentialOut, sql: str) -> dict[str, Any]:
        import psycopg

        async def open_pg() -> _Conn:
            conn = await connectors.postgres(endpoint, cred.data, timeout=self._limits.timeout,
                                             statement_timeout=self._limits.timeout)
            return _Conn(cred.lease_id, conn, conn.close)

        conn: psycopg.AsyncConnection[Any] = await self._conn(grant, cred, open_pg)
        rows = RowCollector(self._limits)
        columns: list[str] = []
        try:
            async with asyncio.timeout(self._limits.timeout + 2), conn.cursor() as cur:
                try:
                    # Single-row mode: rows arrive one at a time, so a huge result is never held whole.
                    async for row in cur.stream(sql):
                        columns = columns or [d.name for d in cur.description or ()]
                        if not rows.add(row):
                            break
                    columns = columns or [d.name for d in cur.description or ()]
                except psycopg.ProgrammingError as exc:
                    if "didn't produce a result" not in str(exc):
                        raise
                    # A statement without rows (INSERT, CREATE...): it ran; psycopg's stream() only
                    # complains that there was nothing to stream, and gives no row count.
                    return {"grant": grant, "columns": [], "rows": [], "row_count": 0, "truncated": False,
                            "status": "done", "affected": None}
        except TimeoutError:
            await self._close(grant)
            raise self._too_slow("the query") from None
        except psycopg.Error as exc:
            if conn.broken or conn.closed:
                await self._close(grant)
            raise connectors.upstream_error(exc, self.redactor, what="the query") from None
        if rows.truncated:
            await self._close(grant)  # the rest of the result is still on the wire
        return {"grant": grant, "columns": columns, "rows": rows.rows, "row_count": len(rows.rows),
                "truncated": rows.truncated, "status": "rows", "affected": None}

    async def _mysql(self, grant: str, endpoint: Endpoint, cred: CredentialOut, sql: str) -> dict[str, Any]:
        import aiomysql
        import pymysql

        async def open_mysql() -> _Conn:
            conn = await connectors.mysql(endpoint, cred.data, timeout=self._limits.timeout)
            await _mysql_statement_timeout(conn, self._limits.timeout)

            async def close() -> None:
                conn.close()

            return _Conn(cred.lease_id, conn, close)

        conn = await self._conn(grant, cred, open_mysql)
        rows = RowCollector(self._limits)
        try:
            async with asyncio.timeout(self._limits.timeout + 2):
                cur = await conn.cursor(aiomysql.SSCursor)
                await cur.execute(sql)
                columns = [d[0] for d in cur.description or ()]
                while columns and not rows.truncated:
                    batch = await cur.fetchmany(100)
                    if not batch:
                        break
                    for row in batch:
                        if not rows.add(row):
                            break
                count = cur.rowcount
                if not rows.truncated:
                    await cur.close()
        except TimeoutError:
            await self._close(grant)
            raise self._too_slow("the query") from None
        except (pymysql.MySQLError, OSError) as exc:
            await self._close(grant)
            raise connectors.upstream_error(exc, self.redactor, what="the query") from None
        if rows.truncated:
            await self._close(grant)
        return {"grant": grant, "columns": columns, "rows": rows.rows, "row_count": len(rows.rows),
                "truncated": rows.truncated, "status": "rows" if columns else "done",
                "affected": count if not columns and count >= 0 else None}

    async def _open_redis(self, endpoint: Endpoint, cred: CredentialOut) -> _Conn:
        client = connectors.redis_client(endpoint, cred.data, timeout=self._limits.timeout)
        return _Conn(cred.lease_id, client, client.aclose)

    async def _open_http(self, endpoint: Endpoint, allowed: HostAllowList, g: GrantOut,
                         cred: CredentialOut) -> _Conn:
        session = connectors.http_session(endpoint, allowed, cred.data, http_auth=g.http_auth,
                                          timeout=self._limits.timeout, ca_file=self._ca_file)
        return _Conn(cred.lease_id, session, session.close)


def _grant_entry(g: GrantOut) -> dict[str, Any]:
    tool = {"postgresql": "sql_query", "mysql": "sql_query", "redis": "redis_command", "http": "http_request"}
    return {"name": g.name, "risk": g.risk, "revocation": g.revocation, "max_ttl": g.max_ttl,
            "approvals_required": g.approvals_required if g.risk == "high" else 0,
            "kind": g.kind, "endpoint": g.endpoint, "allowed_hosts": g.allowed_hosts or None,
            "tool": tool.get(g.kind or "")}


def _endpoint(g: GrantOut) -> Endpoint:
    assert g.endpoint is not None  # a grant picked by kind has one
    return Endpoint.parse(g.endpoint)


def _target(url: str, endpoint: Endpoint, allowed: HostAllowList) -> str:
    """The URL to request: a path joins the endpoint; an absolute URL must be to an allowed host.

    Raises:
        ToolRefused: neither a path nor an http(s) URL. HostNotAllowed: a host off the grant's list.
    """
    if url.startswith("/") and not url.startswith("//"):
        return url
    parsed = yarl.URL(url)
    if not parsed.absolute or parsed.scheme not in ("http", "https"):
        raise errors.ToolRefused("url must be a path (/v1/...) or an http(s) URL")
    if parsed.user is not None or parsed.password is not None:
        raise errors.ToolRefused("url must not carry credentials: the grant's credential is added for you")
    if not allowed.allows(parsed.host or "") or (parsed.scheme == "http" and endpoint.scheme != "http"):
        msg = f"this grant's credential may not be sent to {parsed.host}; allowed: {', '.join(allowed.patterns)}"
        raise errors.HostNotAllowed(msg)
    return url


def _content_type(body: str) -> str:
    try:
        json.loads(body)
    except ValueError:
        return "text/plain; charset=utf-8"
    return "application/json"


async def _mysql_statement_timeout(conn: Any, seconds: float) -> None:
    """Bound every statement on the server: MariaDB's ``max_statement_time`` (s), else MySQL's (ms, SELECT)."""
    import pymysql

    for statement in (f"SET SESSION max_statement_time = {seconds:g}",
                      f"SET SESSION max_execution_time = {int(seconds * 1000)}"):
        try:
            async with conn.cursor() as cur:
                await cur.execute(statement)
            return
        except pymysql.MySQLError:
            continue


async def _raw_command(client: Any, args: list[str]) -> Any:
    """The server's own reply to ``args`` (redis-py's per-command callbacks would turn ``OK`` into ``True``)."""
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        await conn.send_command(*args)
        return await conn.read_response()
    except BaseException:
        await conn.disconnect()  # a half-read reply must not stay on a pooled connection
        raise
    finally:
        await pool.release(conn)


def _is_redis_error(exc: BaseException) -> bool:
    import redis.exceptions

    return isinstance(exc, redis.exceptions.RedisError | OSError)


def _is_connection_error(exc: BaseException) -> bool:
    import redis.exceptions

    return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError | OSError)
