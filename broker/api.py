"""The HTTP API (v1): routes, authentication, and the one middleware that turns errors into problems.

Handlers are short: parse the body into a wire model, establish who is calling, make the one domain
call, shape the answer. Every error leaves as ``application/problem+json`` (RFC 9457). A failed
identity check gets the same 401 whatever the reason, so the API is no oracle; the reason goes to
the log. Nothing here logs a header, a body or a credential.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web_protocol import RequestPayloadError
from pydantic import BaseModel, ValidationError

from broker import __version__, jsontext
from broker.approvals import ApprovalManager
from broker.audit import CALLER_ADDRESS
from broker.audit.checkpoints import StoreVerifier
from broker.audit.tailer import VaultAuditTailer
from broker.audit.tailers import VaultAuditTailers
from broker.delegation import Catalog, any_includes
from broker.engines import revocation_of_kind
from broker.errors import (
    BadRequest,
    BrokerError,
    Denied,
    InsufficientAuthentication,
    InvalidIdentity,
    NotFound,
    NumberOutOfRange,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from broker.identity import AgentIdentity, DelegationVerifier, UserIdentity, UserVerifier
from broker.identity.cache import VerifiedTokenCache
from broker.instrument import METER, note_identity, note_task
from broker.leases import LeaseManager, PendingApproval
from broker.limits import RateLimiter
from broker.metrics import CONTENT_TYPE
from broker.models import (
    ApprovalDecision,
    ApprovalList,
    ApprovalOut,
    ApprovalPendingOut,
    ApprovalVote,
    AuditOut,
    AuditPage,
    AuditVerifyOut,
    CredentialOut,
    CredentialRequest,
    DelegatedTaskCreate,
    EndOut,
    GrantOut,
    HealthOut,
    LeaseListItem,
    LeaseOut,
    LeasePage,
    Problem,
    RenewOut,
    RenewRequest,
    RevocationCreate,
    RevocationLift,
    RevocationList,
    RevocationOut,
    TaskCreate,
    TaskGrants,
    TaskOut,
    TaskPage,
)
from broker.readiness import Readiness
from broker.revocations import Revocations, RevocationStatus
from broker.server import log_path, route_of
from broker.signals.web import add_signal_routes
from broker.singletons import Singleton
from broker.states import TokenState
from broker.store import ApprovalRow, LeaseRow, Person, Store, TaskRow
from broker.tasks import TaskManager
from broker.vault import VaultClient

log = logging.getLogger(__name__)

TASKS = web.AppKey("tasks", TaskManager)
LEASES = web.AppKey("leases", LeaseManager)
STORE = web.AppKey("store", Store)
READINESS = web.AppKey("readiness", Readiness)
VAULT = web.AppKey("vault", VaultClient)
CATALOG = web.AppKey("catalog", Catalog)
AGENTS = web.AppKey("agent_verifier", VerifiedTokenCache[AgentIdentity])
USERS = web.AppKey("user_verifier", UserVerifier)
DELEGATIONS = web.AppKey("delegation_verifier", DelegationVerifier)
REVOCATIONS = web.AppKey("revocations", Revocations)
APPROVALS = web.AppKey("approvals", ApprovalManager)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock")
AUDIT_VERIFIER = web.AppKey("audit_verifier", StoreVerifier)
METRICS = METER  # the app's Prometheus registry and series (broker.metrics)
REQUESTS = web.AppKey("request_meter", RateLimiter)  # every authenticated request, per identity
VAULT_TAILER = web.AppKey("vault_tailer", VaultAuditTailer)  # set only with [vault].audit_log: the first file's
VAULT_TAILERS = web.AppKey("vault_tailers", VaultAuditTailers)  # every file's, run as one
REPLICA = web.AppKey("replica_id", str)  # this process as a singleton lease holder (broker.singletons)
SINGLETONS: web.AppKey[list[Singleton]] = web.AppKey("singletons")

_PROBLEM_TYPE = "https://agent-broker.dev/problems/"
_DECIMAL = re.compile(r"-?[0-9]{1,19}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_TOKEN = 8192
DELEGATION_HEADER = "X-Delegation-Token"

Identity = AgentIdentity | UserIdentity
M = TypeVar("M", bound=BaseModel)


# -- errors ------------------------------------------------------------------------------------------


def problem(status: int, code: str, title: str, detail: str, request: web.Request,
            headers: dict[str, str] | None = None) -> web.Response:
    # ``instance`` names the route, not the path as sent: a path segment is the caller's input, and a
    # problem never echoes input (a token pasted into a URL stays out of the answer and of the logs).
    body = Problem(type=_PROBLEM_TYPE + code, title=title, status=status, detail=detail, code=code,
                   instance=route_of(request), request_id=request.get("request_id"))
    return web.Response(status=status, text=body.model_dump_json(exclude_none=True),
                        content_type="application/problem+json", headers=headers)


def _check_edge(request: web.Request) -> None:
    """Control characters or oversized values in the path or the query are refused before any handler.

    Raises:
        BadRequest: a control character (NUL, CR, LF...) anywhere in the path or a query value, or a query
            value over 2,048 characters.
    """
    texts = [request.path, *request.query.keys(), *request.query.values()]
    if any(_CONTROL.search(t) for t in texts) or any(len(v) > 2048 for v in request.query.values()):
        msg = "the path or query holds a control character or an oversized value"
        raise BadRequest(msg)


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    request["request_id"] = secrets.token_hex(8)
    # Every audit record this request causes names its caller's address (the socket peer: a proxy in
    # front is what the broker sees; see docs/audit.md).
    caller = CALLER_ADDRESS.set(request.remote)
    try:
        _check_edge(request)
        return await handler(request)
    except BrokerError as exc:
        headers = {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        if isinstance(exc, InsufficientAuthentication):
            # RFC 9470: tell the client to come back with a fresher authentication.
            headers["WWW-Authenticate"] = (f'Bearer error="insufficient_user_authentication", '
                                           f'error_description="{exc}", max_age={exc.max_age}')
            log.info("stale authentication on %s %s: %s", request.method, log_path(request), exc.reason)
        elif isinstance(exc, InvalidIdentity):
            headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
            log.info("rejected credentials on %s %s: %s", request.method, log_path(request), exc.reason)
        elif exc.http_status >= 500:
            log.warning("%s %s failed: %s (%s)", request.method, log_path(request), exc.code, exc.reason)
        return problem(exc.http_status, exc.code, exc.title, str(exc), request, headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status, "http_error")
        if exc.status == 413:
            return problem(413, code, "Payload too large", "the request body is too large", request)
        # A 405 names the methods the route takes (RFC 9110 §15.5.6); nothing else of aiohttp's headers.
        allow = {"Allow": exc.headers["Allow"]} if exc.status == 405 and "Allow" in exc.headers else None
        return problem(exc.status, code, exc.reason, exc.reason, request, allow)
    except Exception:
        log.exception("unhandled error on %s %s (request %s)", request.method, log_path(request),
                      request["request_id"])
        return problem(500, "internal", "Internal error", "the broker failed; the request id identifies it in its log",
                       request)
    finally:
        CALLER_ADDRESS.reset(caller)


# -- request helpers -----------------------------------------------------------------------------------


async def _body(request: web.Request, model: type[M]) -> M:
    """The body, parsed strictly (``broker.jsontext``) into ``model``; an empty body is ``{}``.

    Raises:
        UnsupportedMediaType: a non-empty body that is not ``application/json`` in UTF-8.
        PayloadTooLarge, MalformedJson, JsonTooDeep, NumberOutOfRange, BadRequest (a field that does not
            validate: named, never its value).
    """
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge("the request body is too large") from exc
    except (BadHttpMessage, RequestPayloadError) as exc:
        # A body that does not decode (Content-Encoding: gzip over junk, a bad chunk): the caller's bytes,
        # never repeated.
        raise BadRequest("the request body could not be read", reason=type(exc).__name__) from exc
    if raw:
        charset = (request.charset or "utf-8").lower()
        if request.content_type != "application/json" or charset not in ("utf-8", "utf8"):
            raise UnsupportedMediaType("send the body as Content-Type: application/json (UTF-8)",
                                       reason=f"content type {request.content_type[:64]!r}")
    data = jsontext.loads(raw) if raw else {}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(_validation_detail(model, exc)) from exc


def _validation_detail(model: type[BaseModel], exc: ValidationError) -> str:
    """Field names and pydantic's messages, never the input: it may hold a token pasted by mistake.

    A location part that is not one of the model's fields (an unknown member name, which is input too)
    is not repeated either.
    """
    known = set(model.model_fields)
    parts = []
    for e in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in e["loc"] if isinstance(p, int) or p in known) or "body"
        if e["type"] == "extra_forbidden":
            msg = f"unknown field (the fields are {', '.join(sorted(known))})"
        else:
            # Our own validators' messages never hold the value (config.parse_duration); pydantic's do not.
            msg = str(e["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(dict.fromkeys(parts))


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise InvalidIdentity("missing bearer token")
    if len(token) > _MAX_TOKEN:
        raise InvalidIdentity("token larger than 8 KiB")
    return token.strip()


def _looks_like_svid(token: str) -> bool:
    """Route a token to the agent or the user verifier by its unverified ``sub``: a SPIFFE ID or a
    Kubernetes service account (``system:serviceaccount:...``) is an agent.

    Routing only: each verifier then checks everything itself, and each rejects the other's tokens.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return False
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return False
    return isinstance(payload, dict) and isinstance(payload.get("sub"), str) and payload["sub"].startswith(
        ("spiffe://", "system:serviceaccount:"))


def _metered(request: web.Request, ident: Identity) -> Identity:
    """Every authenticated request spends from its identity's bucket (``limits.request_rate_per_identity``):
    a flood from one agent or person is turned away before any store or Vault work, whatever the route.

    Raises:
        RateLimited: this identity asks faster than its request rate.
    """
    note_identity(request, ident)
    meter = request.app.get(REQUESTS)
    if meter is not None:
        key = str(ident.spiffe_id) if isinstance(ident, AgentIdentity) else ident.id
        meter.take(key, what="identity")
    return ident


async def agent_identity(request: web.Request) -> AgentIdentity:
    ident = await request.app[AGENTS].verify(_bearer(request))
    _metered(request, ident)
    return ident


async def user_identity(request: web.Request) -> UserIdentity:
    ident = await request.app[USERS].verify(_bearer(request))
    _metered(request, ident)
    return ident


async def any_identity(request: web.Request) -> Identity:
    token = _bearer(request)
    if _looks_like_svid(token):
        return _metered(request, await request.app[AGENTS].verify(token))
    return _metered(request, await request.app[USERS].verify(token))


def _json(model: BaseModel, status: int = 200, *, no_store: bool = False) -> web.Response:
    headers = {"Cache-Control": "no-store"} if no_store else None
    return web.Response(status=status, text=model.model_dump_json(), content_type="application/json",
                        headers=headers)


def _task_out(task: TaskRow, leases: list[LeaseRow] | None = None) -> TaskOut:
    return TaskOut(
        id=task.id, user=task.user, user_name=task.user_name, agent=task.agent, role=task.role, tenant=task.tenant,
        reason=task.reason,
        state=task.state, created_at=task.created_at, expires_at=task.expires_at,
        ended_at=task.ended_at, revocation=_revocation_of(task),
        leases=None if leases is None else [
            LeaseOut(id=x.id, grant=x.grant, path=x.path, state=x.state, revocation=revocation_of_kind(x.kind),
                     issued_at=x.issued_at, expires_at=x.expires_at, renewable=x.renewable)
            for x in leases
        ],
    )


def _revocation_of(task: TaskRow) -> Literal["revoke_pending", "revoked"] | None:
    """Where a task that left active stands in Vault: its token's state (None while the task is active)."""
    if task.token_state == TokenState.REVOKED:
        return "revoked"
    return "revoke_pending" if task.token_state == TokenState.REVOKE_PENDING else None


def _is_party(ident: Identity, task: TaskRow) -> bool:
    if isinstance(ident, AgentIdentity):
        return str(ident.spiffe_id) == task.agent
    return ident.id == task.user


# -- handlers --------------------------------------------------------------------------------------


async def create_task(request: web.Request) -> web.Response:
    if DELEGATION_HEADER in request.headers:
        return await _create_delegated_task(request)
    user = await user_identity(request)
    body = await _body(request, TaskCreate)
    task = await request.app[TASKS].start(user, agent=body.agent, role=body.role, ttl=body.ttl,
                                          reason=body.reason, tenant=body.tenant)
    note_task(request, task.id)
    return _json(_task_out(task), 201)


async def _create_delegated_task(request: web.Request) -> web.Response:
    """An agent starts a task itself with a delegation its user's IdP issued (RFC 8693; ``broker.identity``).

    Both tokens are verified before the body is read; every failure of either is the same 401.
    """
    agent = await agent_identity(request)
    values = request.headers.getall(DELEGATION_HEADER)
    token = values[0].strip() if len(values) == 1 else ""
    if not token or len(token) > _MAX_TOKEN:
        raise InvalidIdentity("X-Delegation-Token missing, repeated or larger than 8 KiB")
    delegation = await request.app[DELEGATIONS].verify(token)
    body = await _body(request, DelegatedTaskCreate)
    task = await request.app[TASKS].start_delegated(agent, delegation, role=body.role, ttl=body.ttl,
                                                    reason=body.reason, tenant=body.tenant)
    return _json(_task_out(task), 201)


async def _readable_task(request: web.Request) -> tuple[TaskRow, list[LeaseRow]]:
    """The path's task and its leases, for its user, its agent, operators and auditors; else 404."""
    ident = await any_identity(request)
    task, leases = await request.app[TASKS].get(request.match_info["task_id"])
    catalog = request.app[CATALOG]
    staff = isinstance(ident, UserIdentity) and (any_includes(catalog.operators, ident)
                                                   or any_includes(catalog.auditors, ident))
    if not (_is_party(ident, task) or staff):
        raise NotFound("no such task")  # the same answer as for a missing task
    if staff and isinstance(ident, UserIdentity) and not _is_party(ident, task):
        await _unlocked(request, ident)
    return task, leases


async def get_task(request: web.Request) -> web.Response:
    task, leases = await _readable_task(request)
    return _json(_task_out(task, leases))


async def get_task_grants(request: web.Request) -> web.Response:
    """The task's grants with where and how each is used (``broker mcp``, the SDK's helpers); as ``get_task``."""
    task, _ = await _readable_task(request)
    role = request.app[CATALOG].roles.get(task.role)
    grants = [GrantOut(name=g.name, risk=g.risk, approvals_required=g.approvals_required, max_ttl=g.max_ttl,
                       revocation=g.revocation, endpoint=str(g.endpoint) if g.endpoint else None,
                       kind=g.endpoint.kind if g.endpoint else None,
                       allowed_hosts=g.allowed_hosts.patterns if g.allowed_hosts else [], http_auth=g.http_auth)
              for g in (role.grants.values() if role is not None else ())]
    return _json(TaskGrants(task=task.id, state=task.state, expires_at=task.expires_at,
                            grants=grants))


async def issue_credential(request: web.Request) -> web.Response:
    agent = await agent_identity(request)
    body = await _body(request, CredentialRequest)
    meter = request.app[METRICS]
    try:
        issued = await request.app[LEASES].issue(agent, request.match_info["task_id"], body.grant, body.ttl,
                                                 body.approval_id, public_key=body.public_key)
    except BrokerError as exc:
        meter.credential_denied(body.grant, exc.code)
        raise
    if isinstance(issued, PendingApproval):
        meter.approval_required(body.grant)
        a = issued.approval
        return _json(ApprovalPendingOut(approval_id=a.id, expires_at=a.expires_at), 202)
    meter.credential_issued(issued.lease.grant)
    out = CredentialOut(lease_id=issued.lease.id, grant=issued.lease.grant, expires_at=issued.lease.expires_at,
                        renewable=issued.lease.renewable, revocation=revocation_of_kind(issued.lease.kind),
                        data=dict(issued.data))
    return _json(out, no_store=True)


async def renew_lease(request: web.Request) -> web.Response:
    agent = await agent_identity(request)
    body = await _body(request, RenewRequest)
    lease = await request.app[LEASES].renew(agent, request.match_info["lease_id"], body.increment)
    return _json(RenewOut(lease_id=lease.id, expires_at=lease.expires_at))


async def end_task(request: web.Request) -> web.Response:
    ident = await any_identity(request)
    manager = request.app[TASKS]
    task, _ = await manager.get(request.match_info["task_id"])
    if not _is_party(ident, task):
        raise NotFound("no such task")
    result = await manager.end(task.id, by=ident)
    # 202: Vault answered the revocation but has not confirmed every lease yet (a task with many leases);
    # the broker keeps confirming and GET /v1/tasks/{id} shows when it is done. 503 is Vault or the store down.
    pending = result.pending > 0
    return _json(EndOut(id=task.id, state=result.task.state, revoked=result.revoked, pending=result.pending,
                        revocation="revoke_pending" if pending else "revoked"), 202 if pending else 200)


def _float_param(request: web.Request, name: str, *, lo: float = 0.0, hi: float = 1e11) -> float | None:
    """A finite number from the query string within [lo, hi], or None when absent.

    Raises:
        NumberOutOfRange: not a finite number in range (NaN and Infinity included).
    """
    value = request.query.get(name)
    if value is None:
        return None
    try:
        number = float(value) if len(value) <= 32 else math.nan
    except ValueError:
        number = math.nan
    if not lo <= number <= hi:  # also false for NaN
        msg = f"{name} must be a number from {lo:g} to {hi:g}"
        raise NumberOutOfRange(msg)
    return number


def _bool_param(request: web.Request, name: str) -> bool:
    """``true`` or ``false`` (absent: false). Raises: BadRequest: anything else, or the parameter twice."""
    values = request.query.getall(name, [])
    if not values:
        return False
    if len(values) > 1 or values[0] not in ("true", "false"):
        msg = f"{name} must be true or false"
        raise BadRequest(msg)
    return values[0] == "true"


def _int_param(request: web.Request, name: str, *, default: int, lo: int, hi: int) -> int:
    """A decimal integer from the query string within [lo, hi] (``default`` when absent).

    Raises:
        NumberOutOfRange: not a decimal integer in range.
    """
    value = request.query.get(name)
    if value is None:
        return default
    if _DECIMAL.fullmatch(value) is None or not lo <= int(value) <= hi:
        msg = f"{name} must be an integer from {lo} to {hi}"
        raise NumberOutOfRange(msg)
    return int(value)


async def list_audit(request: web.Request) -> web.Response:
    user = await user_identity(request)
    await _auditor(request, user)
    q = request.query
    limit = _int_param(request, "limit", default=100, lo=1, hi=1000)
    after = _int_param(request, "after", default=0, lo=0, hi=jsontext.INT64_MAX)
    rows = await request.app[STORE].query_audit(
        user=q.get("user"), agent=q.get("agent"), task=q.get("task"), since=_float_param(request, "since"),
        until=_float_param(request, "until"), after_seq=after, limit=limit,
    )
    records = [AuditOut(seq=r.seq, **r.record.__dict__) for r in rows]
    next_after = records[-1].seq if len(records) == limit else None
    return _json(AuditPage(records=records, next_after=next_after))


async def verify_audit(request: web.Request) -> web.Response:
    """Recompute the whole chain and check every checkpoint (and the witness, if configured). Auditors only."""
    user = await user_identity(request)
    await _auditor(request, user)
    r = await request.app[AUDIT_VERIFIER].verify()
    return _json(AuditVerifyOut(ok=r.ok, records=r.records, checkpoints=r.checkpoints, witnessed=r.witnessed,
                                first_bad_seq=r.first_bad_seq, reason=r.reason))


async def health(request: web.Request) -> web.Response:
    """Readiness for what issuing needs (broker.readiness): 503 names the part that is down."""
    r = await request.app[READINESS].check()
    mode = request.app[LEASES].journal
    journal = "off" if mode is None else "on" if mode.ready else "probing"
    held = [s.name for s in request.app[SINGLETONS] if s.state.held]
    out = HealthOut.model_validate({"status": "ok" if r.ok else "unavailable", "vault": r.vault, "store": r.store,
                                    "version": __version__, "issuance_journal": journal, "singletons": held})
    return _json(out, 200 if r.ok else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format 0.0.4 (broker.metrics): bounded labels only, never an identity or an id
    (anyone on the network may read it)."""
    app = request.app
    store, clock = app.get(STORE), app[CLOCK]
    body = await app[METRICS].render(None if store is None else lambda: store.metrics_snapshot(now=clock()))
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE, "X-Content-Type-Options": "nosniff"})


async def openapi(request: web.Request) -> web.Response:
    from broker.openapi import spec

    return web.json_response(spec())


async def _unlocked(request: web.Request, user: UserIdentity) -> None:
    """Raises: Locked: an operator's lock covers this person (an offboarded operator or auditor acts no more)."""
    await request.app[STORE].check_unlocked(
        Person(user.id, user.name, user.trusted_email, user.email), now=request.app[CLOCK]())


async def _auditor(request: web.Request, user: UserIdentity) -> None:
    if not any_includes(request.app[CATALOG].auditors, user):
        raise Denied("auditors only", reason=f"{user.id} is not an auditor")
    await _unlocked(request, user)


async def _staff(request: web.Request, user: UserIdentity, *, auditors: bool) -> None:
    catalog = request.app[CATALOG]
    if any_includes(catalog.operators, user) or (auditors and any_includes(catalog.auditors, user)):
        await _unlocked(request, user)
        return
    raise Denied("operators only" if not auditors else "operators and auditors only",
                 reason=f"{user.id} is not an operator")


def _revocation_out(st: RevocationStatus) -> RevocationOut:
    r = st.revocation
    return RevocationOut(id=r.id, kind=r.kind, value=r.value, reason=r.reason,
                         created_by=r.created_by, created_by_name=r.created_by_name, created_at=r.created_at,
                         lock=r.lock, lifted_at=r.lifted_at, lifted_by=r.lifted_by, lifted_by_name=r.lifted_by_name,
                         tasks=r.tasks, leases=r.leases, revoked=st.revoked, pending=st.pending,
                         state="done" if st.done else "in_progress")


async def create_revocation(request: web.Request) -> web.Response:
    user = await user_identity(request)
    await _staff(request, user, auditors=False)
    body = await _body(request, RevocationCreate)
    kind, value = body.selector
    st = await request.app[REVOCATIONS].revoke(user, kind=kind, value=value, reason=body.reason, wait=body.wait)
    return _json(_revocation_out(st), 200 if st.done else 202)


async def get_revocation(request: web.Request) -> web.Response:
    user = await user_identity(request)
    await _staff(request, user, auditors=True)
    return _json(_revocation_out(await request.app[REVOCATIONS].status(request.match_info["revocation_id"])))


async def list_revocations(request: web.Request) -> web.Response:
    user = await user_identity(request)
    await _staff(request, user, auditors=True)
    active = _bool_param(request, "active")
    rows = await request.app[STORE].list_revocations(active_only=active)
    statuses = [await request.app[REVOCATIONS].status(r.id) for r in rows]
    return _json(RevocationList(revocations=[_revocation_out(s) for s in statuses]))


async def lift_revocation(request: web.Request) -> web.Response:
    user = await user_identity(request)
    await _staff(request, user, auditors=False)
    body = await _body(request, RevocationLift)
    st = await request.app[REVOCATIONS].lift(user, request.match_info["revocation_id"], reason=body.reason)
    return _json(_revocation_out(st))


def _page_args(request: web.Request) -> tuple[int, str | None, tuple[str, ...] | None]:
    q = request.query
    limit = _int_param(request, "limit", default=100, lo=1, hi=1000)
    state = q.get("state")
    return limit, q.get("after"), (state,) if state else None


async def list_leases(request: web.Request) -> web.Response:
    user = await user_identity(request)
    await _staff(request, user, auditors=True)
    limit, after, states = _page_args(request)
    q = request.query
    rows = await request.app[STORE].find_leases(user=q.get("user"), agent=q.get("agent"), task=q.get("task"),
                                                tenant=q.get("tenant"), states=states, limit=limit, after=after)
    items = [LeaseListItem(id=x.id, task=t.id, user=t.user, user_name=t.user_name, agent=t.agent, tenant=t.tenant,
                           grant=x.grant,
                           path=x.path, state=x.state, revocation=revocation_of_kind(x.kind), issued_at=x.issued_at,
                           expires_at=x.expires_at, revoked_at=x.revoked_at) for x, t in rows]
    next_after = f"{rows[-1][0].issued_at!r}:{rows[-1][0].id}" if len(rows) == limit else None
    return _json(LeasePage(leases=items, next_after=next_after))


async def list_tasks(request: web.Request) -> web.Response:
    user = await user_identity(request)
    await _staff(request, user, auditors=True)
    limit, after, states = _page_args(request)
    q = request.query
    rows = await request.app[STORE].find_tasks(user=q.get("user"), agent=q.get("agent"), tenant=q.get("tenant"),
                                               states=states, limit=limit, after=after)
    next_after = f"{rows[-1].created_at!r}:{rows[-1].id}" if len(rows) == limit else None
    return _json(TaskPage(tasks=[_task_out(t) for t in rows], next_after=next_after))


async def _approval_out(request: web.Request, a: ApprovalRow, *, votes: bool) -> ApprovalOut:
    task = await request.app[STORE].get_task(a.task_id)
    vs = await request.app[STORE].approval_votes(a.id) if votes else None
    return ApprovalOut(id=a.id, state=a.state, task=a.task_id, user=a.user, user_name=a.user_name, agent=a.agent,
                       tenant=a.tenant, grant=a.grant, path=a.path, ttl=a.ttl, required=a.required,
                       created_at=a.created_at, expires_at=a.expires_at, decided_at=a.decided_at,
                       task_reason=task.reason if task else None,
                       votes=None if vs is None else [ApprovalVote(**{k: v[k] for k in ApprovalVote.model_fields})
                                                      for v in vs])


async def _approver_or_auditor(request: web.Request, user: UserIdentity) -> None:
    catalog = request.app[CATALOG]
    if not (any_includes(catalog.approvers, user) or any_includes(catalog.auditors, user)):
        raise Denied("approvers and auditors only", reason=f"{user.id} is not an approver")
    await _unlocked(request, user)


async def list_approvals(request: web.Request) -> web.Response:
    user = await user_identity(request)
    await _approver_or_auditor(request, user)
    state = request.query.get("state")
    if state not in (None, "pending", "approved", "denied", "expired", "consumed"):
        raise BadRequest("state must be pending, approved, denied, expired or consumed")
    rows = await request.app[STORE].list_approvals(state=state, now=request.app[CLOCK]())
    return _json(ApprovalList(approvals=[await _approval_out(request, a, votes=True) for a in rows]))


async def get_approval(request: web.Request) -> web.Response:
    ident = await any_identity(request)
    manager = request.app[APPROVALS]
    a = await manager.get(request.match_info["approval_id"])
    if isinstance(ident, AgentIdentity):
        if str(ident.spiffe_id) != a.agent:
            raise NotFound("no such approval")
    else:
        await _approver_or_auditor(request, ident)
    wait = _float_param(request, "wait", lo=0.0, hi=60.0) or 0.0
    if wait:
        waiter = str(ident.spiffe_id) if isinstance(ident, AgentIdentity) else ident.id
        a = await manager.wait(a.id, timeout=wait, waiter=waiter)
    return _json(await _approval_out(request, a, votes=isinstance(ident, UserIdentity)))


async def decide_approval(request: web.Request) -> web.Response:
    user = await user_identity(request)
    body = await _body(request, ApprovalDecision)
    a = await request.app[APPROVALS].decide(user, request.match_info["approval_id"], body.decision, body.reason)
    return _json(await _approval_out(request, a, votes=True))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/tasks", create_task)
    app.router.add_get("/v1/tasks/{task_id}", get_task)
    app.router.add_get("/v1/tasks/{task_id}/grants", get_task_grants)
    app.router.add_post("/v1/tasks/{task_id}/credentials", issue_credential)
    app.router.add_post("/v1/tasks/{task_id}/end", end_task)
    app.router.add_post("/v1/leases/{lease_id}/renew", renew_lease)
    app.router.add_get("/v1/leases", list_leases)
    app.router.add_get("/v1/tasks", list_tasks)
    app.router.add_post("/v1/revocations", create_revocation)
    app.router.add_get("/v1/revocations", list_revocations)
    app.router.add_get("/v1/revocations/{revocation_id}", get_revocation)
    app.router.add_delete("/v1/revocations/{revocation_id}", lift_revocation)
    app.router.add_get("/v1/audit", list_audit)
    app.router.add_get("/v1/approvals", list_approvals)
    app.router.add_get("/v1/approvals/{approval_id}", get_approval)
    app.router.add_post("/v1/approvals/{approval_id}", decide_approval)
    app.router.add_get("/v1/audit/verify", verify_audit)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/openapi.json", openapi)
    add_signal_routes(app)  # the SSF transmitter's metadata and keys (broker.signals.web)
