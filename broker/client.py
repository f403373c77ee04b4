"""The one client to the broker's HTTP API: the agent SDK, the operator CLI and audit replay all use it.

    async with BrokerClient(url, token) as broker:
        task = await broker.call("GET", f"/v1/tasks/{task_id}")
        records, after = await broker.pages("/v1/audit", "records", {"task": task_id}, limit=1000)

Rules this file keeps:

- It imports nothing heavier than aiohttp, yarl, ``broker.errors`` and ``broker.models``, so an agent can
  vendor ``broker.sdk`` with these few modules (pinned by a test).
- It is the one boundary between aiohttp and the broker's errors. A transport failure or timeout becomes
  ``Unreachable``. An answer that is not a JSON object becomes ``BadResponse``. An error answer goes
  through ``decode_problem`` (the one problem+json decoder) and is raised as the ``broker.errors`` class
  its ``code`` names, ``from`` the decoded ``ProblemResponse``, so a caller that prints (the CLI) still has
  the status, title and code exactly as they were sent.
- The token is asked for on every request (a callable may rotate it, as a SPIFFE SVID does). It goes
  into the Authorization header only, never into a message.
- Each request is sent once; nothing here retries. A caller that polls (``broker revoke`` following a
  revocation) decides which failures are worth another try.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Self

import aiohttp
import yarl

from broker import errors

__all__ = ["DEFAULT_TIMEOUT", "BadResponse", "BrokerClient", "ProblemResponse", "TokenSource", "Unreachable",
           "decode_error", "decode_problem", "problem_of"]

TokenSource = str | Callable[[], str] | Callable[[], Awaitable[str]]

DEFAULT_TIMEOUT = 30.0
_PAGE = 500

Unreachable = errors.Unreachable
BadResponse = errors.BadResponse
_MAX_AGE = re.compile(r"max_age=(\d{1,9})")

# Every code the broker answers with and the class it stands for. An unknown code is a plain BrokerError.
_ERRORS: dict[str, type[errors.BrokerError]] = {
    cls.code: cls
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.BrokerError)
}


class ProblemResponse(Exception):
    """An error answer as the broker, or a proxy in front of it, sent it (RFC 9457 problem details).

    It is the ``__cause__`` of the ``broker.errors`` instance that ``BrokerClient.call`` raises (see
    ``problem_of``). ``code``, ``title`` and ``detail`` are ``""`` when the body is not a problem
    document, for example a proxy's HTML page. ``reason`` is the HTTP reason phrase. ``retry_after`` is
    the Retry-After header in seconds.
    """

    def __init__(self, status: int, code: str = "", title: str = "", detail: str = "", *, reason: str = "",
                 retry_after: float | None = None, max_age: int | None = None) -> None:
        super().__init__(f"HTTP {status} {code or 'http_error'}: {detail or title or reason}")
        self.status = status
        self.code = code
        self.title = title
        self.detail = detail
        self.reason = reason
        self.retry_after = retry_after
        self.max_age = max_age

    def error(self) -> errors.BrokerError:
        """The ``broker.errors`` instance for this answer's ``code``: its message is the detail, plus Retry-After.

        Every class is built the same way, from the answer alone. Their constructors are the server's,
        and take what only the server knows (an audit ``reason``, an authentication ``max_age``), so
        none of them is called here: a new required argument must not make decoding fail.
        """
        cls = _ERRORS.get(self.code, errors.BrokerError)
        exc = cls.__new__(cls)
        errors.BrokerError.__init__(exc, self.detail or f"HTTP {self.status}")
        if self.retry_after is not None and self.retry_after >= 0 and self.retry_after.is_integer():
            exc.retry_after = int(self.retry_after)
        if isinstance(exc, errors.InsufficientAuthentication):
            # RFC 9470: how fresh a sign-in the broker wants, from its WWW-Authenticate header.
            exc.max_age = self.max_age if self.max_age is not None else 0
        return exc


def decode_problem(status: int, payload: object, *, reason: str = "", retry_after: str | None = None,
                   www_authenticate: str | None = None) -> ProblemResponse:
    """The one problem+json decoder: an error answer's status, decoded body and headers as a ``ProblemResponse``.

    Lenient on purpose: it never raises, so a malformed body still yields a line to show.
    """
    body = payload if isinstance(payload, Mapping) else {}
    age = _MAX_AGE.search(www_authenticate or "")
    return ProblemResponse(status, _text(body.get("code")), _text(body.get("title")), _text(body.get("detail")),
                           reason=reason, retry_after=_seconds(retry_after),
                           max_age=int(age.group(1)) if age else None)


def decode_error(status: int, payload: object, headers: Mapping[str, str]) -> errors.BrokerError:
    """The ``broker.errors`` instance an error answer stands for (``decode_problem(...).error()``)."""
    return decode_problem(status, payload, retry_after=headers.get("Retry-After"),
                          www_authenticate=headers.get("WWW-Authenticate")).error()


def problem_of(exc: BaseException) -> ProblemResponse | None:
    """The error answer behind an exception that ``BrokerClient.call`` raised, if there was one."""
    cause = exc.__cause__
    return cause if isinstance(cause, ProblemResponse) else None


def _text(value: object) -> str:
    return str(value) if value else ""


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class BrokerClient:
    """Requests to one broker over one ``aiohttp`` session, authenticated with a bearer token.

    Without a ``session`` it opens its own (on entering the block, or on the first request) and closes
    it in ``close``. A session passed in belongs to the caller and is never closed here.
    """

    def __init__(self, base_url: str, token: TokenSource, *, session: aiohttp.ClientSession | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self._base = base_url.rstrip("/")
        self._token = token
        self._own_session = session is None
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def __aenter__(self) -> Self:
        self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def url(self) -> str:
        """The base URL as it may be shown: without a ``user:password@`` part."""
        return str(yarl.URL(self._base).with_user(None))

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._own_session = True
        return self._session

    async def _bearer(self) -> str:
        if isinstance(self._token, str):
            return self._token
        value = self._token()
        return value if isinstance(value, str) else await value

    async def call(self, method: str, path: str, *, query: Mapping[str, str] | None = None,
                   body: Mapping[str, Any] | None = None, timeout: float | None = None,
                   headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """One request to ``path`` (which may carry its own query string); the JSON object it answers.

        ``timeout`` replaces the client's own for this request (a server-side wait needs longer).
        ``headers`` are sent besides the client's own (``X-Delegation-Token``); they cannot replace them.

        Raises:
            Unreachable: no answer within the timeout, or the connection failed.
            BrokerError subclasses: an error answer, the class its problem ``code`` names (a plain
                ``BrokerError`` for an unknown code or a body that is not a problem); ``problem_of``
                gives the answer itself.
            BadResponse: a success status without a JSON object.
        """
        session = self._open()
        headers = {**(headers or {}), "Authorization": f"Bearer {await self._bearer()}", "Accept": "application/json"}
        per_request = aiohttp.ClientTimeout(total=timeout) if timeout is not None else None
        try:
            async with session.request(method, self._base + path, params=query, json=body, headers=headers,
                                       timeout=per_request) as resp:
                try:
                    payload = await resp.json(content_type=None)
                except ValueError:
                    payload = None
                status, reason, retry_after = resp.status, resp.reason or "", resp.headers.get("Retry-After")
                www_authenticate = resp.headers.get("WWW-Authenticate")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise Unreachable(self.url, type(exc).__name__) from exc
        if status >= 400:
            problem = decode_problem(status, payload, reason=reason, retry_after=retry_after,
                                     www_authenticate=www_authenticate)
            raise problem.error() from problem
        if not isinstance(payload, dict):
            msg = f"HTTP {status} without a JSON object"
            raise BadResponse(msg, status=status)
        return payload

    async def pages(self, path: str, key: str, filters: Mapping[str, str | None], limit: int,
                    page_size: int = _PAGE) -> tuple[list[dict[str, Any]], str | None]:
        """Up to ``limit`` items of a paginated list, following ``next_after``; and the cursor after them.

        ``filters`` that are None are left out of the query.

        Raises:
            As ``call``.
        """
        items: list[dict[str, Any]] = []
        after: str | None = None
        while len(items) < limit:
            query = {k: v for k, v in filters.items() if v is not None}
            query["limit"] = str(min(limit - len(items), page_size))
            if after is not None:
                query["after"] = after
            page = await self.call("GET", path, query=query)
            batch = list(page.get(key) or [])
            items.extend(batch)
            cursor = page.get("next_after")
            after = None if cursor is None else str(cursor)
            if after is None or not batch:
                break
        return items[:limit], after
