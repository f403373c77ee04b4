"""The outermost middleware: every answered request is counted, timed and described for the access log.

Rules this file keeps:
1. Metrics take the route *template* (``broker.server.route_of``), never the path as sent; the access
   log takes the same (``broker.server.AccessLogger``).
2. Who asked is written on the request by the API once the caller's token is verified
   (``note_identity``), never from an unverified header: the log names an agent by its SPIFFE ID and a
   person by their display name, and names nothing for a token that did not verify.
3. A task id is logged only when it has the shape the broker gives task ids: a path segment is the
   caller's input (a token pasted into a URL must not reach the log).
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from broker.identity import AgentIdentity, UserIdentity
from broker.metrics import Metrics
from broker.server import LOG_AGENT, LOG_TASK, LOG_USER, STARTED, route_of

__all__ = ["METER", "instrument_middleware", "note_identity", "note_task"]

METER = web.AppKey("metrics", Metrics)

_TASK_ID = re.compile(r"tsk_[A-Za-z0-9_-]{24}")


def note_identity(request: web.Request, ident: AgentIdentity | UserIdentity) -> None:
    """Name the verified caller in the request's access log line."""
    if isinstance(ident, AgentIdentity):
        request[LOG_AGENT] = str(ident.spiffe_id)
    else:
        request[LOG_USER] = ident.name


def note_task(request: web.Request, task_id: str) -> None:
    """Name the task the request is about (only a well-formed task id: rule 3)."""
    if _TASK_ID.fullmatch(task_id):
        request[LOG_TASK] = task_id


@web.middleware
async def instrument_middleware(request: web.Request,
                                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    started = request[STARTED] = time.perf_counter()
    task_id = request.match_info.get("task_id")
    if task_id is not None:
        note_task(request, task_id)
    meter = request.app.get(METER)
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # a redirect (the console's), or an error past the error middleware
        if meter is not None:
            meter.observe_request(route_of(request), request.method, exc.status, time.perf_counter() - started)
        raise
    if meter is not None:
        meter.observe_request(route_of(request), request.method, response.status, time.perf_counter() - started)
    return response
