"""The HTTP server around the app: what aiohttp does before a request reaches a handler.

Rules this file keeps (TH-21, issue 8):
1. The access log names the client, the method, the **path without its query string**, the status, the
   size and the time. Never a header, never a query value: ``GET /console/login?token=<ID token>`` must
   not put an ID token in the log.
2. A request aiohttp's parser refuses (a header over 8 KiB, a malformed request line) is answered by the
   broker in ``application/problem+json``, with nothing of the request in the body or the log. aiohttp's
   own answer repeats the start of the offending line (the ``Authorization`` header) and logs a
   traceback holding those bytes.

``serve`` replaces ``aiohttp.web.run_app`` for ``broker serve``; ``BrokerRunner`` is the runner for
anything else that serves the app (``broker dev``, tests that need the real parser).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from typing import Any

from aiohttp import web, web_protocol, web_server
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_request import BaseRequest

from broker.errors import BadRequest, BrokerError, HeaderTooLarge
from broker.models import Problem

__all__ = ["AccessLogger", "BrokerRunner", "log_path", "route_of", "serve"]

log = logging.getLogger(__name__)
access_log = logging.getLogger("aiohttp.access")

_PROBLEM_TYPE = "https://agent-broker.dev/problems/"
# What the API writes on a request for its access log line (broker.instrument): verified names only.
LOG_AGENT = "log_agent"
LOG_USER = "log_user"
LOG_TASK = "log_task"
STARTED = "started"


class AccessLogger(AbstractAccessLogger):
    """One line per request: ``client "METHOD /route" status bytes seconds``.

    The route (``/v1/tasks/{task_id}``), not the path as sent: no query string, no path segment (the
    caller's input: a pasted token, a CR-LF that would forge a log line).
    """

    @property
    def enabled(self) -> bool:
        # aiohttp asks once per connection: below INFO no line is built at all (the fields cost a dict and
        # two route lookups per request, for a line the logger would drop).
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        # The same facts as fields, for ``--log-format json`` (broker.logs); the text line ignores them.
        fields = {"request_id": request.get("request_id"), "method": request.method, "route": log_path(request),
                  "status": response.status, "duration_ms": round(time * 1000.0, 3), "client": request.remote,
                  "task": request.get(LOG_TASK), "agent": request.get(LOG_AGENT), "user": request.get(LOG_USER)}
        self.logger.info('%s "%s %s" %d %d %.6fs', request.remote, request.method, log_path(request),
                         response.status, response.body_length, time, extra={"http": fields})


def route_of(request: BaseRequest) -> str | None:
    """The route a request matched (``/v1/tasks/{task_id}``), or None."""
    # A request the parser refused, or a bare BaseRequest, has no match info (aiohttp asserts on it).
    info = getattr(request, "_match_info", None)
    route = getattr(info, "route", None)
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else None


def log_path(request: BaseRequest) -> str:
    """The request's path for a log line: its route, never the path as sent, whose segments are the caller's
    input (a token pasted into a URL, a CR-LF that forges a log line)."""
    return route_of(request) or "<no route>"


def _problem_body(error: BrokerError, request_id: str) -> str:
    return Problem(type=_PROBLEM_TYPE + error.code, title=error.title, status=error.http_status, detail=str(error),
                   code=error.code, request_id=request_id).model_dump_json(exclude_none=True)


class _RequestHandler(web_protocol.RequestHandler):
    """aiohttp's protocol handler, answering the requests its parser refused as problems (rule 2)."""

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, BadHttpMessage | web_protocol.RequestPayloadError):
            # A body that would not decode, met again while draining it after the answer: one line, no
            # traceback (its text is the parser's, its cause the caller's bytes).
            log.info("dropped the rest of a malformed request body: %s", type(exc).__name__)
            return
        super().log_exception(*args, **kw)

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, BadHttpMessage):
            return super().handle_error(request, status, exc, message)
        # The exception's text and traceback hold the raw bytes of the line it refused: neither is logged.
        request_id = secrets.token_hex(8)
        too_large = isinstance(exc, LineTooLong) or "too long" in exc.message or "too many" in exc.message.lower()
        error: BrokerError = (HeaderTooLarge("a request header is larger than the broker accepts (8 KiB)")
                              if too_large else BadRequest("the request is not well-formed HTTP"))
        log.info("refused a malformed request from %s: %s (request %s)", request.remote, type(exc).__name__,
                 request_id)
        if request.writer.output_size > 0:
            msg = "response already started"
            raise ConnectionError(msg)
        response = web.Response(status=error.http_status, text=_problem_body(error, request_id),
                                content_type="application/problem+json")
        response.force_close()
        return response


class _Server(web_server.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class BrokerRunner(web.AppRunner):
    """``web.AppRunner`` with the broker's access log and parser-error answers."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("access_log_class", AccessLogger)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        # aiohttp offers no hook for the protocol handler's class; _Server adds behaviour, no state.
        server.__class__ = _Server
        return server


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve ``app`` on ``host:port`` until SIGINT or SIGTERM, then shut down cleanly."""
    runner = BrokerRunner(app)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("serving on %s:%d", host, port)
        await stop.wait()
    finally:
        await runner.cleanup()
