"""The Vault / OpenBao HTTP adapter: one async method per endpoint, typed answers, one error boundary.

Rules this file keeps:

1. It is the only place the serving broker speaks Vault's HTTP API through. Every method names its
   endpoint in its docstring (hvac style) and returns a frozen dataclass, never a raw ``dict`` from the
   wire. Set-up (policies, token roles, mounts, engine configuration) is not here: it is on hvac, in
   ``broker.vault.admin``, which the serving broker never calls.
2. No foreign exception leaves this module. ``aiohttp``/``asyncio`` failures go through
   ``_transport_error`` and HTTP statuses through ``_status_error``; both return a ``VaultError``
   subclass that is raised ``from`` the original. An answer's fields are read inside ``with
   _parsing(op)``, which turns a missing or mistyped one into ``VaultBadResponse``.
   ``tests/integration/test_vault_client.py`` checks that the maps are complete and that every method
   that reads an answer reads it that way.
3. A token is never put in an exception message, a ``repr`` or a log line. Tokens Vault returns are
   wrapped in ``Sensitive``; Vault's own error strings go (scrubbed, truncated) to ``reason`` only.
4. Paths are validated with ``validate_path`` before they are put in a URL: URL-escaping alone would let
   ``..`` and ``/`` through to another endpoint.
5. Redirects are not followed: a standby's ``307`` would replay the ``X-Vault-Token`` header to whatever
   address it names. A redirect is answered as ``VaultUnavailable`` (talk to the active node).
6. With several nodes (a cluster), requests go to the node that last executed one. A node that did not
   execute a request (refused connection, standby without a leader, sealed, redirect) is a reason to try
   the next node whose ``sys/health`` says active, within ``failover_timeout``. A request
   that may have executed (a reset, a timeout, a 500) is sent again only when doing it twice is harmless:
   a credential read or a token create is not, and its caller gets the error (``broker.vault.nodes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import aiohttp
import orjson

from broker.errors import (
    VaultBadResponse,
    VaultDenied,
    VaultError,
    VaultTLSFailed,
    VaultUnavailable,
)
from broker.paths import validate_name, validate_path
from broker.vault.nodes import Next, NodeOrder, after_status, after_transport
from broker.vault.transport import ConnectFailed, Node, TLSFailed, Transport

__all__ = [
    "Sensitive",
    "VaultClient",
    "VaultHealth",
    "VaultLeaseInfo",
    "VaultSecret",
    "VaultTokenAuth",
    "VaultTokenInfo",
    "validate_path",
]


def _loads(raw: bytes) -> Any:
    """Vault's JSON answer, by orjson (the hot path's parser); json takes what orjson refuses (huge integers).

    Raises: ValueError.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


class Sensitive:
    """Holds a secret string; ``repr``/``str`` are ``'<redacted>'``; ``.reveal()`` returns the value.

    Used for every token Vault returns, so that a stray ``print``, log line or exception message that
    formats an object holding one shows nothing useful. Equality is constant-time.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            msg = "Sensitive holds a str"
            raise TypeError(msg)
        self._value = value

    def reveal(self) -> str:
        """Return the secret. Call it only where the value is sent (a header), never to log it."""
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sensitive):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Sensitive, self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> Any:
        # Pickling a secret (into a cache, a multiprocessing queue...) is a way to leak it: refuse.
        msg = "Sensitive values cannot be pickled"
        raise TypeError(msg)


@dataclass(frozen=True, slots=True)
class VaultTokenAuth:
    """The ``auth`` block of an answer that created a token."""

    client_token: Sensitive
    accessor: str
    lease_duration: int
    renewable: bool
    policies: tuple[str, ...]
    orphan: bool


@dataclass(frozen=True, slots=True)
class VaultSecret:
    """The answer of a credential read.

    ``data`` is the credential payload (passwords, private keys): never log it. The ``repr`` hides it.
    ``lease_id`` is ``""`` when the answer carries no lease (for example a token create, which carries
    ``auth`` instead).
    """

    request_id: str
    lease_id: str
    lease_duration: int
    renewable: bool
    data: Mapping[str, Any] | None = field(repr=False)
    auth: VaultTokenAuth | None
    warnings: tuple[str, ...]

    def __repr__(self) -> str:
        keys = sorted(self.data) if self.data is not None else None
        return (
            f"VaultSecret(request_id={self.request_id!r}, lease_id={self.lease_id!r}, "
            f"lease_duration={self.lease_duration}, renewable={self.renewable}, "
            f"data_keys={keys!r}, auth={self.auth!r}, warnings={self.warnings!r})"
        )


@dataclass(frozen=True, slots=True)
class VaultLeaseInfo:
    """A lease as Vault reports it. ``expire_time`` is ``None`` where the endpoint does not say (renew)."""

    lease_id: str
    expire_time: str | None
    ttl: int
    renewable: bool
    issue_time: str | None = None  # RFC 3339, Vault's clock (lookup only)


@dataclass(frozen=True, slots=True)
class VaultTokenInfo:
    """A token's lookup, without the token itself."""

    accessor: str
    ttl: int
    expire_time: str | None
    policies: tuple[str, ...]
    meta: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class VaultHealth:
    """``sys/health`` as data: a sealed or standby server is a state, not an error."""

    initialized: bool
    sealed: bool
    standby: bool
    version: str


# --------------------------------------------------------------------------------------------------
# Paths: broker.paths (pure), shared with the catalog, which checks every grant's path at start-up.

# The request header a journaled issuance sends (broker.journal); Vault's audit device writes it in plain
# text once ``sys/config/auditing/request-headers/X-Broker-Intent`` says ``hmac = false``.
INTENT_HEADER: Final = "X-Broker-Intent"

# --------------------------------------------------------------------------------------------------
# The error boundary

# Tokens look like ``s.`` + 24 chars (OpenBao), ``hvs.``/``hvb.``/``hvr.`` + more (Vault 1.10+), ``b.``
# for batch tokens. Anything that looks like one is cut out of a reason before it is stored.
_TOKEN_LIKE: Final = re.compile(r"(?<![A-Za-z0-9])(?:hv[sbr]|[sbr])\.[A-Za-z0-9_\-.]{20,}")
_MAX_REASON: Final = 400

# Statuses that mean "this node cannot answer now; retry later / elsewhere":
# 429 standby, 472 DR secondary, 473 performance standby, 503 sealed, 502/504 from a proxy,
# 412 Enterprise consistency precondition not yet met.
_UNAVAILABLE_STATUSES: Final = frozenset({412, 429, 472, 473, 502, 503, 504})


def _scrub(text: str) -> str:
    return _TOKEN_LIKE.sub("<token>", text)[:_MAX_REASON]


def _errors_of(body: Any) -> str:
    """Vault's ``errors`` list as one scrubbed string (for ``reason`` only, never the message)."""
    if isinstance(body, Mapping):
        errors = body.get("errors")
        if isinstance(errors, list):
            return _scrub("; ".join(str(e) for e in errors))
    return ""


def _status_error(status: int, body: Any, op: str) -> VaultError:
    """Map a non-2xx answer to a ``VaultError``. The message names only the operation and the status.

    500 is ``VaultBadResponse``, but callers that create things must treat it as "maybe done": OpenBao
    answers 500 when it wrote the request audit record and then failed on the response one, after the
    credential (a PostgreSQL role, a lease, a token) was already created.
    """
    detail = _errors_of(body)
    reason = f"{op}: HTTP {status}" + (f": {detail}" if detail else "")
    if status in _UNAVAILABLE_STATUSES or 300 <= status < 400:
        return VaultUnavailable(f"Vault is unavailable ({op}, HTTP {status})", reason=reason)
    if status == 403:
        return VaultDenied(f"Vault refused {op} (HTTP 403)", reason=reason)
    return VaultBadResponse(f"unexpected answer from Vault to {op} (HTTP {status})", reason=reason)


def _transport_error_class(kind: type[BaseException]) -> type[VaultError]:
    """Which ``VaultError`` a transport failure of class ``kind`` becomes.

    Connection refused/reset, server disconnected, timeouts and truncated bodies mean "retry later"
    (``VaultUnavailable``); a malformed HTTP answer is ``VaultBadResponse``; anything else (an invalid
    URL, a redirect error) is a plain ``VaultError``: a configuration problem. TLS failures (bad
    certificate, fingerprint mismatch) are configuration or attack, not "retry later": ``VaultError``.
    """
    if issubclass(kind, (aiohttp.InvalidURL, aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch, TLSFailed)):
        return VaultError
    if issubclass(kind, (aiohttp.ClientConnectionError, asyncio.TimeoutError, aiohttp.ClientPayloadError, OSError)):
        return VaultUnavailable
    if issubclass(kind, (aiohttp.ClientResponseError, ValueError)):
        # ClientResponseError covers malformed HTTP (bad status line, oversized headers) and content types.
        return VaultBadResponse
    return VaultError


def _node(addr: str) -> Node | None:
    """A configured address, parsed once; None for one that is not an http(s) URL (each request then fails
    as a configuration error, as it did when aiohttp parsed the URL per request)."""
    try:
        return Node.parse(addr)
    except ValueError:
        return None


def _transport_error(exc: BaseException, op: str) -> VaultError:
    """Map an ``aiohttp``/``asyncio``/``OSError`` failure to a ``VaultError`` (raise it ``from exc``)."""
    return transport_failure(_transport_error_class(type(exc)), exc, op)


def transport_failure(cls: type[VaultError], exc: BaseException, op: str) -> VaultError:
    """The ``cls`` error for a transport failure ``exc`` of ``op``, its text scrubbed of anything token-shaped.

    Shared by the hot-path client (aiohttp) and the admin client (hvac over requests): one wording.
    """
    reason = f"{op}: {type(exc).__name__}: {_scrub(str(exc))}"
    refused = _tls_refusal(exc)
    if refused is not None:
        return VaultTLSFailed(f"TLS with Vault failed ({op}): {refused}", reason=reason)
    if cls is VaultUnavailable:
        return VaultUnavailable(f"Vault is unreachable ({op})", reason=reason)
    if cls is VaultBadResponse:
        return VaultBadResponse(f"unexpected answer from Vault to {op}", reason=reason)
    return VaultError(f"Vault request failed ({op})", reason=reason)


def _tls_refusal(exc: BaseException) -> str | None:
    """OpenSSL's words when ``exc`` is, or wraps (requests and urllib3 nest it in their own errors), a failed
    TLS handshake: a refused certificate, a host name it does not name, no TLS at that address. What an
    operator must fix, not a network failure."""
    seen: list[BaseException] = []
    todo: list[object] = [exc]
    while todo and len(seen) < 16:
        e = todo.pop()
        if not isinstance(e, BaseException) or any(e is x for x in seen):
            continue
        seen.append(e)
        if isinstance(e, ssl.SSLCertVerificationError):
            return _scrub(str(e.verify_message or e.reason or "certificate verify failed"))
        if isinstance(e, ssl.SSLError) and not isinstance(e, ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return _scrub(str(e.reason or type(e).__name__))
        todo.extend([e.__cause__, e.__context__, getattr(e, "reason", None), *e.args])
    return None


# --------------------------------------------------------------------------------------------------
# Answer parsing: cheap, explicit, and every shape error is VaultBadResponse.


class _Shape(Exception):
    """Internal: the answer lacks a field or has a wrong type (turned into VaultBadResponse by ``_parsing``)."""


@contextlib.contextmanager
def _parsing(op: str) -> Iterator[None]:
    """Around the reading of one answer: a missing or mistyped field leaves as ``VaultBadResponse``.

    The one place ``_Shape`` is translated (the shape of httpx's ``map_httpcore_exceptions``); every
    method that reads fields of an answer does so inside it.
    """
    try:
        yield
    except _Shape as exc:
        msg = f"unexpected answer from Vault to {op}"
        raise VaultBadResponse(msg, reason=f"{op}: bad or missing field {exc}") from exc


def _str(m: Mapping[str, Any], key: str, default: str | None = None) -> str:
    v = m.get(key, default)
    if v is None and default is not None:
        return default
    if not isinstance(v, str):
        raise _Shape(key)
    return v


def _int(m: Mapping[str, Any], key: str, default: int | None = None) -> int:
    v = m.get(key, default)
    if v is None and default is not None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Shape(key)
    return v


def _bool(m: Mapping[str, Any], key: str, default: bool | None = None) -> bool:
    v = m.get(key, default)
    if v is None and default is not None:
        return default
    if not isinstance(v, bool):
        raise _Shape(key)
    return v


def _strs(m: Mapping[str, Any], key: str) -> tuple[str, ...]:
    v = m.get(key)
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _Shape(key)
    return tuple(v)


def _str_map(m: Mapping[str, Any], key: str) -> Mapping[str, str]:
    v = m.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
        raise _Shape(key)
    return dict(v)


def _mapping(m: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = m.get(key)
    if not isinstance(v, dict):
        raise _Shape(key)
    return v


def _parse_auth(a: Mapping[str, Any]) -> VaultTokenAuth:
    return VaultTokenAuth(
        client_token=Sensitive(_str(a, "client_token")),
        accessor=_str(a, "accessor", ""),
        lease_duration=_int(a, "lease_duration", 0),
        renewable=_bool(a, "renewable", False),
        policies=_strs(a, "policies"),
        orphan=_bool(a, "orphan", False),
    )


def _parse_token_info(d: Mapping[str, Any]) -> VaultTokenInfo:
    expire = d.get("expire_time")
    if expire is not None and not isinstance(expire, str):
        raise _Shape("expire_time")
    return VaultTokenInfo(
        accessor=_str(d, "accessor", ""),
        ttl=_int(d, "ttl", 0),
        expire_time=expire,
        policies=_strs(d, "policies"),
        meta=_str_map(d, "meta"),
    )


def _token_of(token: str | Sensitive | None) -> str | None:
    if token is None:
        return None
    return token.reveal() if isinstance(token, Sensitive) else token


# Failing over (several nodes): pauses between rounds, a bound on attempts, the health probe's timeout.
_FIRST_PAUSE: Final = 0.05
_MAX_PAUSE: Final = 0.5
_MAX_ATTEMPTS: Final = 200
_HEALTH_PROBE: Final = 1.0

_INVALID_ACCESSOR: Final = "invalid accessor"
_INVALID_LEASE: Final = "invalid lease"


class VaultClient:
    """Async client for the Vault/OpenBao endpoints the broker uses. One method per endpoint.

    The ``aiohttp.ClientSession`` comes in from outside (the app owns its lifecycle); requests to Vault go
    through the client's own keep-alive connections (``broker.vault.transport``), which ``close`` closes.
    ``token`` is the client's default token; every method that sends one also takes ``token=`` to override
    it for one call (the task token on the hot path).

    Every method raises:
        VaultUnavailable: Vault cannot be reached, timed out, is sealed, is a standby, or redirected.
        VaultDenied: HTTP 403 (missing capability, or an invalid/expired token).
        VaultBadResponse: any other unexpected status, a non-JSON body or a missing/mistyped field.
        VaultError: a transport failure that is a configuration problem (invalid URL...).
        BadRequest: a path or name argument failed ``validate_path``; raised before any request.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        addr: str | Sequence[str],
        *,
        token: str | Sensitive | None = None,
        timeout: float = 5.0,
        namespace: str | None = None,
        failover_timeout: float = 10.0,
        observe: Callable[[str, float, str | None], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._session = session
        # ``observe(op, seconds, error code or None)`` after every request (broker.metrics): ``op`` is
        # one of this module's fixed operation names, never a path.
        self._observe = observe
        nodes = (addr,) if isinstance(addr, str) else tuple(addr)
        self._bases: Final = tuple(a.rstrip("/") + "/v1/" for a in nodes)
        self._nodes: Final = tuple(_node(a) for a in nodes)
        self._order: Final = NodeOrder(len(self._bases))
        # The requests themselves go through broker.vault.transport, not the session: a third of the
        # CPU aiohttp's client spent per request (the session still serves callers that share it).
        # ``ssl_context`` (broker.vault.tls) for https nodes; None: the system's trust store.
        self._transport = Transport(ssl_context=ssl_context)
        self._token = _token_of(token)
        self._timeout = float(timeout)
        self._failover_timeout = failover_timeout
        headers = {"X-Vault-Request": "true"}
        if namespace:
            headers["X-Vault-Namespace"] = validate_path(namespace)
        self._headers: Final = headers

    def __repr__(self) -> str:
        return f"VaultClient(addr={', '.join(b[:-4] for b in self._bases)!r})"

    def close(self) -> None:
        """Close the idle connections to Vault (the app does at shutdown)."""
        self._transport.close()

    @property
    def clustered(self) -> bool:
        """Several nodes are configured."""
        return len(self._bases) > 1

    @property
    def active_addr(self) -> str:
        """The node requests go to first: the one that last executed a request (rule 6)."""
        return self._bases[self._order.active][:-4]

    # -- the one place requests are made ---------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        op: str,
        *,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, str] | None = None,
        token: str | Sensitive | None = None,
        use_token: bool = True,
        ok_extra: frozenset[int] = frozenset(),
        timeout: float | None = None,
        idempotent: bool = True,
        intent: str | None = None,
    ) -> tuple[int, Any]:
        """Send one request; return ``(status, parsed JSON or None)`` for 2xx and ``ok_extra`` statuses.

        ``path`` must already be validated by the caller. With several nodes, a node that did not execute
        the request (down, standby without a leader, sealed, redirecting) is a reason to try the next one,
        for at most ``failover_timeout`` seconds; a request that may have executed is sent again only if
        ``idempotent`` (rule 6, ``broker.vault.nodes``). ``intent`` goes in the ``X-Broker-Intent``
        header, which Vault's audit device records in plain text (broker.journal).
        """
        headers = self._headers.copy()
        if intent is not None:
            headers[INTENT_HEADER] = validate_name(intent)
        if use_token:
            tok = _token_of(token) if token is not None else self._token
            if tok:
                headers["X-Vault-Token"] = tok
        payload: bytes | None = None
        if body is not None:
            payload = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        t = self._timeout if timeout is None else timeout
        started = time.perf_counter()
        try:
            result = await self._call_nodes(method, path, op, payload, params, headers, t, ok_extra, idempotent)
        except VaultError as exc:
            if self._observe is not None:
                self._observe(op, time.perf_counter() - started, exc.code)
            raise
        if self._observe is not None:
            self._observe(op, time.perf_counter() - started, None)
        return result

    async def _call_nodes(self, method: str, path: str, op: str, payload: bytes | None,
                          params: Mapping[str, str] | None, headers: Mapping[str, str],
                          t: float, ok_extra: frozenset[int], idempotent: bool) -> tuple[int, Any]:
        """The request to the active node, failing over while no node has executed it (rule 6)."""
        if len(self._bases) == 1:
            return self._answer(*await self._send(self._nodes[0], method, path, op, payload, params, headers, t),
                                op, ok_extra)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._failover_timeout
        pause = _FIRST_PAUSE
        node = self._order.active
        for _ in range(_MAX_ATTEMPTS):
            try:
                status, parsed = await self._send(self._nodes[node], method, path, op, payload, params, headers, t)
            except VaultError as exc:
                cause = exc.__cause__
                decision = after_transport(
                    connected=not isinstance(cause, ConnectFailed),
                    idempotent=idempotent, config_error=type(exc) is VaultError)
                if decision is Next.ANSWER or loop.time() + pause > deadline:
                    raise
            else:
                if status in ok_extra or after_status(status, _errors_of(parsed), idempotent=idempotent
                                                      ) is Next.ANSWER:
                    if status < 500:
                        self._order.answered(node)  # it executed (or refused) the request itself
                    return self._answer(status, parsed, op, ok_extra)
                if loop.time() + pause > deadline:
                    return self._answer(status, parsed, op, ok_extra)  # the last node's refusal, as an error
            # This node did not take the request. Send it on only to a node that says it is active: during an
            # election a standby answers a create with a bare 500 ("internal error"), which is ambiguous.
            active = await self._find_active()
            while active is None and loop.time() + pause <= deadline:
                await asyncio.sleep(pause)
                pause = min(pause * 2, _MAX_PAUSE)
                active = await self._find_active()
            node = active if active is not None else self._order.after(node)
        msg = f"Vault is unavailable ({op}: no node took the request)"
        raise VaultUnavailable(msg, reason=f"{op}: {len(self._bases)} nodes, none active")

    async def _send(self, node: Node | None, method: str, path: str, op: str, payload: bytes | None,
                    params: Mapping[str, str] | None, headers: Mapping[str, str], timeout: float
                    ) -> tuple[int, Any]:
        """One request to one node: ``(status, parsed JSON or None)``; transport failures as ``VaultError``."""
        if node is None:
            msg = f"the Vault address is not an http(s) URL ({op})"
            raise VaultError(msg, reason=f"{op}: invalid Vault address")
        try:
            status, raw = await self._transport.request(node, method, path, query=params, headers=headers,
                                                        body=payload, timeout=timeout)
        except (TimeoutError, OSError, TLSFailed, ValueError) as exc:
            raise _transport_error(exc, op) from exc
        parsed: Any = None
        if raw:
            try:
                parsed = _loads(raw)
            except ValueError as exc:
                if 200 <= status < 300:
                    msg = f"unexpected answer from Vault to {op} (not JSON)"
                    raise VaultBadResponse(msg, reason=f"{op}: HTTP {status}: body is not JSON") from exc
                parsed = None
        return status, parsed

    @staticmethod
    def _answer(status: int, parsed: Any, op: str, ok_extra: frozenset[int]) -> tuple[int, Any]:
        if 200 <= status < 300 or status in ok_extra:
            return status, parsed
        raise _status_error(status, parsed, op)

    async def _find_active(self) -> int | None:
        """The node whose ``sys/health`` says active (200), asking all at once; None if none does."""
        async def one(node: Node | None) -> int:
            if node is None:
                return 0
            try:
                status, _ = await self._transport.request(node, "GET", "sys/health", headers=self._headers,
                                                          body=None, timeout=_HEALTH_PROBE)
            except (TimeoutError, OSError, TLSFailed, ValueError):
                return 0
            return status

        statuses = await asyncio.gather(*(one(n) for n in self._nodes))
        return next((i for i, st in enumerate(statuses) if st == 200), None)

    async def _call_json(self, method: str, path: str, op: str, **kw: Any) -> Mapping[str, Any]:
        """Like ``_call`` but the answer must be a JSON object (not 204)."""
        _, parsed = await self._call(method, path, op, **kw)
        if not isinstance(parsed, dict):
            msg = f"unexpected answer from Vault to {op}"
            raise VaultBadResponse(msg, reason=f"{op}: expected a JSON object")
        return parsed

    @staticmethod
    def _is_error(parsed: Any, text: str) -> bool:
        return text in _errors_of(parsed)

    # -- health ---------------------------------------------------------------------------------

    async def health(self, *, timeout: float | None = None) -> VaultHealth:
        """GET /v1/sys/health (no token).

        200 active, 429 standby, 472 DR secondary, 473 performance standby, 501 not initialised and
        503 sealed all come back as data; the caller decides what is healthy. ``timeout`` overrides the
        client's for this call (a readiness check must answer sooner than a partition's timeout).

        With several nodes, every node is asked at once and the cluster's answer is the active node's
        (then it is remembered as the node to send requests to); without one, the first node's that
        answered. ``VaultUnavailable`` only when no node answers.
        """
        op = "health"
        t = self._timeout if timeout is None else timeout
        ok = frozenset({429, 472, 473, 501, 503})

        async def one(node: Node | None) -> tuple[int, Any] | VaultError:
            try:
                return self._answer(*await self._send(node, "GET", "sys/health", op, None, None, self._headers, t),
                                    op, ok)
            except VaultError as exc:
                return exc

        answers = await asyncio.gather(*(one(n) for n in self._nodes))
        got = [(i, a) for i, a in enumerate(answers) if not isinstance(a, VaultError)]
        if not got:
            first = answers[0]
            assert isinstance(first, VaultError)
            raise first
        node, (status, parsed) = next(((i, a) for i, a in got if a[0] == 200), got[0])
        if status == 200:
            self._order.answered(node)
        if not isinstance(parsed, dict):
            msg = f"unexpected answer from Vault to {op}"
            raise VaultBadResponse(msg, reason=f"{op}: expected a JSON object")
        with _parsing(op):
            return VaultHealth(
                initialized=_bool(parsed, "initialized"),
                sealed=_bool(parsed, "sealed"),
                standby=_bool(parsed, "standby", False),
                version=_str(parsed, "version", ""),
            )

    # -- task tokens (hot path) --------------------------------------------------------------------

    async def create_token_from_role(
        self,
        role: str,
        *,
        policies: Sequence[str],
        ttl: int,
        explicit_max_ttl: int,
        meta: Mapping[str, str],
        display_name: str,
        no_default_policy: bool = True,
        token: str | Sensitive | None = None,
    ) -> VaultTokenAuth:
        """POST /v1/auth/token/create/:role -- create a (task) token through a token role.

        A ``VaultBadResponse`` for HTTP 500 may mean the token WAS created: treat it as "maybe issued"
        (the audit log or a metadata search can find it; it expires at ``explicit_max_ttl`` anyway).
        """
        op = "create token"
        path = "auth/token/create/" + validate_name(role)
        body = {
            "policies": list(policies),
            "ttl": f"{int(ttl)}s",
            "explicit_max_ttl": f"{int(explicit_max_ttl)}s",
            "meta": dict(meta),
            "display_name": display_name,
            "no_default_policy": no_default_policy,
        }
        parsed = await self._call_json("POST", path, op, body=body, token=token, idempotent=False)
        with _parsing(op):
            return _parse_auth(_mapping(parsed, "auth"))

    async def create_child_token(
        self,
        *,
        token: str | Sensitive,
        policies: Sequence[str],
        ttl: int,
        explicit_max_ttl: int,
        meta: Mapping[str, str],
        display_name: str,
        renewable: bool = False,
    ) -> VaultTokenAuth:
        """POST /v1/auth/token/create -- a child of ``token`` (an issuance token under a task token).

        The child holds no more than its parent's policies, dies with its parent, and everything read
        with it is revoked when it is. HTTP 500 may mean it was created (see ``create_token_from_role``).
        """
        op = "create child token"
        body = {
            "policies": list(policies),
            "ttl": f"{int(ttl)}s",
            "explicit_max_ttl": f"{int(explicit_max_ttl)}s",
            "meta": dict(meta),
            "display_name": display_name,
            "no_default_policy": True,
            "renewable": renewable,
        }
        parsed = await self._call_json("POST", "auth/token/create", op, body=body, token=token, idempotent=False)
        with _parsing(op):
            return _parse_auth(_mapping(parsed, "auth"))

    async def renew_self(self, *, token: str | Sensitive | None = None, increment: int | None = None) -> VaultTokenAuth:
        """POST /v1/auth/token/renew-self -- extend ``token``'s TTL (never past its explicit max TTL).

        Without ``token``, the client's own (the broker's periodic token); without ``increment``, Vault's
        default (a periodic token's period).
        """
        op = "renew token"
        body = {} if increment is None else {"increment": f"{int(increment)}s"}
        parsed = await self._call_json("POST", "auth/token/renew-self", op, body=body, token=token)
        with _parsing(op):
            return _parse_auth(_mapping(parsed, "auth"))

    async def revoke_accessor(self, accessor: str, *, token: str | Sensitive | None = None) -> None:
        """POST /v1/auth/token/revoke-accessor -- revoke a token (and its leases and children) by accessor.

        Returns before the token's leases are gone (OpenBao revokes them about 25 ms later): confirm with
        ``lookup_lease``/``lookup_accessor``. An unknown accessor answers 200 with a warning, so this
        returns normally for it too.
        """
        await self._call("POST", "auth/token/revoke-accessor", "revoke token", body={"accessor": accessor}, token=token)

    async def lookup_accessor(self, accessor: str, *, token: str | Sensitive | None = None) -> VaultTokenInfo | None:
        """POST /v1/auth/token/lookup-accessor -- a token's state by accessor; ``None`` when it is gone."""
        op = "lookup token"
        status, parsed = await self._call(
            "POST", "auth/token/lookup-accessor", op, body={"accessor": accessor}, token=token,
            ok_extra=frozenset({400})
        )
        if status == 400:
            if self._is_error(parsed, _INVALID_ACCESSOR):
                return None
            raise _status_error(status, parsed, op)
        with _parsing(op):
            if not isinstance(parsed, dict):
                raise _Shape("body")
            return _parse_token_info(_mapping(parsed, "data"))

    async def lookup_lease(self, lease_id: str, *, token: str | Sensitive | None = None) -> VaultLeaseInfo | None:
        """PUT /v1/sys/leases/lookup -- a lease's expiry; ``None`` when it is gone ("invalid lease")."""
        op = "lookup lease"
        status, parsed = await self._call(
            "PUT", "sys/leases/lookup", op, body={"lease_id": lease_id}, token=token, ok_extra=frozenset({400})
        )
        if status == 400:
            if self._is_error(parsed, _INVALID_LEASE):
                return None
            raise _status_error(status, parsed, op)
        with _parsing(op):
            if not isinstance(parsed, dict):
                raise _Shape("body")
            d = _mapping(parsed, "data")
            expire = d.get("expire_time")
            if expire is not None and not isinstance(expire, str):
                raise _Shape("expire_time")
            issued = d.get("issue_time")
            return VaultLeaseInfo(
                lease_id=_str(d, "id"), expire_time=expire, ttl=_int(d, "ttl", 0),
                renewable=_bool(d, "renewable", False), issue_time=issued if isinstance(issued, str) else None,
            )

    async def list_leases(self, prefix: str) -> list[str]:
        """LIST /v1/sys/leases/lookup/:prefix/ -- the ids of the leases directly under ``prefix`` (a grant's
        path); empty when there are none (Vault answers 404)."""
        op = "list leases"
        prefix = validate_path(prefix)
        status, parsed = await self._call("LIST", f"sys/leases/lookup/{prefix}/", op, ok_extra=frozenset({404}))
        if status == 404:
            return []
        with _parsing(op):
            if not isinstance(parsed, dict):
                raise _Shape("body")
            keys = _mapping(parsed, "data").get("keys") or []
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise _Shape("keys")
        return [f"{prefix}/{k}" for k in keys if not k.endswith("/")]

    async def read_credential(
        self,
        path: str,
        *,
        token: str | Sensitive,
        method: Literal["GET", "POST"] = "GET",
        data: Mapping[str, Any] | None = None,
        intent: str | None = None,
    ) -> VaultSecret:
        """GET or POST /v1/:path -- issue a credential (``database/creds/:role``, ``pki/issue/:role``...).

        With ``GET``, ``data`` goes in the query string; with ``POST``, in the JSON body.
        A ``VaultBadResponse`` for HTTP 500 may mean the credential WAS issued (a PostgreSQL role and a
        lease exist): treat it as "maybe issued" and revoke the task token or reconcile.
        ``intent`` names the broker's intent in Vault's audit log (broker.journal).
        """
        op = "read credential"
        path = validate_path(path)
        if method == "GET":
            params = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (data or {}).items()}
            parsed = await self._call_json("GET", path, op, params=params or None, token=token, intent=intent,
                                           idempotent=False)
        else:
            parsed = await self._call_json("POST", path, op, body=dict(data or {}), token=token, intent=intent,
                                           idempotent=False)
        with _parsing(op):
            return self._parse_secret(parsed)

    @staticmethod
    def _parse_secret(parsed: Mapping[str, Any]) -> VaultSecret:
        data = parsed.get("data")
        if data is not None and not isinstance(data, dict):
            raise _Shape("data")
        auth = parsed.get("auth")
        if auth is not None and not isinstance(auth, dict):
            raise _Shape("auth")
        if data is None and auth is None:
            raise _Shape("data")
        return VaultSecret(
            request_id=_str(parsed, "request_id", ""),
            lease_id=_str(parsed, "lease_id", ""),
            lease_duration=_int(parsed, "lease_duration", 0),
            renewable=_bool(parsed, "renewable", False),
            data=data,
            auth=_parse_auth(auth) if auth is not None else None,
            warnings=_strs(parsed, "warnings"),
        )

    async def renew_lease(
        self, lease_id: str, *, increment: int, token: str | Sensitive | None = None
    ) -> VaultLeaseInfo:
        """PUT /v1/sys/leases/renew -- ask for ``increment`` seconds from now.

        Vault caps the answer at the mount/role max TTL (200 with a warning); ``ttl`` in the result is
        what Vault granted. ``expire_time`` is ``None`` (the endpoint does not return it).
        """
        op = "renew lease"
        parsed = await self._call_json(
            "PUT", "sys/leases/renew", op, body={"lease_id": lease_id, "increment": int(increment)}, token=token
        )
        with _parsing(op):
            return VaultLeaseInfo(
                lease_id=_str(parsed, "lease_id"),
                expire_time=None,
                ttl=_int(parsed, "lease_duration"),
                renewable=_bool(parsed, "renewable", False),
            )

    async def revoke_lease(self, lease_id: str) -> None:
        """PUT /v1/sys/leases/revoke/:lease_id -- revoke one lease, synchronously (gone when this returns).

        The lease id is in the path, so the broker's policy can allow it for its grants' paths only.
        An unknown lease answers 204 like a revoked one: confirm with ``lookup_lease``.
        """
        op = "revoke lease"
        await self._call("PUT", "sys/leases/revoke/" + validate_path(lease_id), op)

    async def force_revoke_lease(self, lease_id: str) -> None:
        """PUT /v1/sys/leases/revoke-force/:lease_id -- drop one lease without its backend's revocation.

        Only for a lease whose backend object was never made (broker.journal rule 9): revoking it normally
        fails forever ("role does not exist"). The full id as the prefix names that one lease only.
        """
        await self._call("PUT", "sys/leases/revoke-force/" + validate_path(lease_id), "force-revoke lease")

    # -- the calling token ----------------------------------------------------------------------

    async def lookup_self(self, *, token: str | Sensitive | None = None, intent: str | None = None) -> VaultTokenInfo:
        """GET /v1/auth/token/lookup-self -- the calling token's own state (``num_uses`` counts this call).

        With ``intent``, it is also the journal's probe (broker.journal): an entry that moves the audit log.
        """
        op = "lookup self"
        parsed = await self._call_json("GET", "auth/token/lookup-self", op, token=token, intent=intent)
        with _parsing(op):
            return _parse_token_info(_mapping(parsed, "data"))

    # -- Vault's audit device ---------------------------------------------------------------------

    async def tidy_leases(self) -> None:
        """POST /v1/sys/leases/tidy (``sudo``) -- revoke leases whose token no longer exists.

        Vault runs it in the background and answers at once. Needed after a leader change: an active
        node killed in the middle of a credential read can leave a lease that the new leader holds but
        that revoking its token does not reach (its token index was not written); tidy revokes it.
        """
        await self._call("POST", "sys/leases/tidy", "tidy leases")

    async def audit_hash(self, device: str, value: str) -> str:
        """POST /v1/sys/audit-hash/:device -- the device's HMAC of ``value`` (``hmac-sha256:...``)."""
        op = "audit hash"
        parsed = await self._call_json("POST", "sys/audit-hash/" + validate_path(device), op, body={"input": value})
        with _parsing(op):
            # OpenBao answers with the hash both at the top level and under ``data``.
            d = parsed.get("data")
            return _str(d if isinstance(d, dict) and "hash" in d else parsed, "hash")
