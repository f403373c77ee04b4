"""The web console: server-rendered pages for approvers, operators and auditors, on the broker's own app.

Pages (no JavaScript, plain forms), rendered from ``broker/templates/console/*.html`` by Jinja2 through
aiohttp-jinja2 with autoescape on for every template:

* ``GET/POST /console/login``: sign in by pasting an OIDC ID token, verified by the app's ``UserVerifier``;
  ``POST /console/logout``.
* ``GET /console``: the approvals queue, each pending request in full, with approve/deny and a reason.
* ``GET /console/tasks``: live tasks and leases, with a revoke button per task (operators).
* ``GET /console/tasks/{id}``: one task's timeline, as a picture and from the audit records (operators,
  auditors).
* ``GET /console/history``: a user's or an agent's tasks and leases over a chosen window, as a picture,
  with "revoke this user/agent" for operators (``POST /console/revoke``, which asks for confirmation
  first). The tasks page draws the live leases by tenant and grant. The pictures are inline SVG laid
  out by ``broker.timeline`` (pure) and drawn by the ``chart`` macro: no script, no style attribute.

Rules this file keeps:

1. Sessions live on the server only: a random 32-byte id in an ``HttpOnly; SameSite=Strict; Path=/console``
   cookie (``Secure`` over https), a bounded table in the store keyed by the id's SHA-256 (so every replica
   knows every session, and the table names no cookie), expiring with the token's ``exp``. The token itself
   is never kept, never put in a URL, never handed to the browser again; the session holds
   the verified ``UserIdentity`` (with its ``auth_time``).
2. Every POST carries the session's synchronizer token (compared with ``hmac.compare_digest``) and must
   show positive same-origin evidence (``Sec-Fetch-Site``, ``Origin`` or ``Referer``) and none against.
   The login form, before any session exists, uses a signed double-submit cookie instead, signed with a key
   derived from the store key file (so a form served by one replica is accepted by another).
3. Role checks are the API's: approvers (and auditors, read-only) see the queue; operators and auditors
   see tasks; only operators revoke; ``ApprovalManager.decide`` itself enforces the approver rules,
   including the re-authentication rule, whose refusal is shown as a "sign in again" page (RFC 9470
   step-up, in browser form).
4. Every console response carries a strict CSP and the other headers below; errors are a plain page with
   the error's public message, never a traceback and never a token.
5. Python decides, templates only lay out: sessions, CSRF, roles and every message are computed here; the
   templates receive plain values, and autoescape escapes each one. Nothing a user or agent typed (task
   reasons, names, ids, approval reasons, audit records) is ever marked safe.
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

import aiohttp_jinja2
import jinja2
from aiohttp import web
from yarl import URL

from broker import api, timeline
from broker.approvals import is_same_person
from broker.delegation import Catalog, any_includes
from broker.engines import revocation_of_kind
from broker.errors import (
    BadRequest,
    BrokerError,
    CsrfRefused,
    Denied,
    InsufficientAuthentication,
    InvalidIdentity,
    RateLimited,
    SignInRequired,
    StoreUnavailable,
    UnsupportedMediaType,
)
from broker.identity import MAX_TOKEN_BYTES, UserIdentity
from broker.instrument import note_identity
from broker.limits import RateLimiter
from broker.server import log_path
from broker.store import ApprovalRow, AuditRow, ConsoleSessionRow, Person, Store, TaskRow

log = logging.getLogger(__name__)

COOKIE = "broker_session"
LOGIN_COOKIE = "broker_login"
PREFIX = "/console"
MAX_SESSIONS = 1000
_MAX_REASON = 500
_REVOKE_WAIT = 5.0

SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


# -- sessions ----------------------------------------------------------------------------------------


@dataclass
class Session:
    """One signed-in person. ``csrf`` is the synchronizer token of every form this session posts; ``key`` is
    the SHA-256 of the session id, the row's key in the store (the id itself is the cookie, never stored)."""

    key: str
    user: UserIdentity
    csrf: str = field(repr=False)  # a secret: in no log line, even by accident
    created_at: float
    expires_at: float
    flash: str | None = None


def _identity_json(user: UserIdentity) -> str:
    """What a session keeps of the verified token: the identity the console decides on, not the token."""
    return json.dumps({"iss": user.issuer, "sub": user.subject, "groups": sorted(user.groups),
                       "auth_time": user.auth_time, "exp": user.expires_at, "email": user.email,
                       "email_trusted": user.email_trusted}, separators=(",", ":"), sort_keys=True)


def _identity_of(text: str) -> UserIdentity | None:
    """The identity a row holds, or None for a row this code cannot read (no session rather than a guess)."""
    try:
        d = json.loads(text)
        groups, auth_time, email = d["groups"], d["auth_time"], d["email"]
        if not (isinstance(d["iss"], str) and isinstance(d["sub"], str) and isinstance(groups, list)
                and all(isinstance(g, str) for g in groups) and isinstance(d["exp"], int | float)
                and isinstance(auth_time, int | float | None) and isinstance(email, str | None)
                and isinstance(d["email_trusted"], bool)):
            return None
    except (ValueError, KeyError, TypeError):
        return None
    return UserIdentity(subject=d["sub"], issuer=d["iss"], groups=frozenset(groups),
                        auth_time=None if auth_time is None else float(auth_time), expires_at=float(d["exp"]),
                        email=email, email_trusted=d["email_trusted"])


@dataclass
class SessionStore:
    """Server-side sessions in the store (``broker.store.sessions``), so any replica serves any session;
    bounded per person and in all.

    Signing in past ``per_person`` ends that person's own oldest session, never anyone else's; past
    ``limit`` in all (after expired sessions go) a sign-in is refused rather than evicting another
    person, so no one can sign everybody else out by signing in many times. Sign-ins are rate-limited
    per person (``sign_in_rate``), per replica.

    ``bind`` gives it the store and the login form's key at start-up: the key is derived from the store key
    file every replica shares, so a form served by one replica is accepted by another.
    """

    clock: Callable[[], float] = time.time
    limit: int = MAX_SESSIONS
    per_person: int = 5
    sign_in_rate: RateLimiter | None = None
    _store: Store | None = None
    _login_key: bytes | None = None

    def bind(self, store: Store, login_key: bytes) -> None:
        self._store, self._login_key = store, login_key

    def _bound(self) -> Store:
        if self._store is None:
            raise StoreUnavailable("the console is not ready", reason="console sessions not bound to the store")
        return self._store

    @staticmethod
    def _key(session_id: str) -> str:
        return hashlib.sha256(session_id.encode()).hexdigest()

    async def create(self, user: UserIdentity) -> tuple[str, Session]:
        """A new session (new id: nothing from before sign-in carries over). Returns (cookie value, session).

        Raises:
            RateLimited: this person signs in too often, or the console holds ``limit`` live sessions.
            StoreUnavailable: the store did not answer.
        """
        if self.sign_in_rate is not None:
            self.sign_in_rate.take(user.id, what="person")
        now = self.clock()
        session_id = secrets.token_urlsafe(32)
        session = Session(key=self._key(session_id), user=user, csrf=secrets.token_urlsafe(32), created_at=now,
                          expires_at=user.expires_at, flash=f"Signed in as {user.name}.")
        row = ConsoleSessionRow(key=session.key, person=user.id, identity=_identity_json(user), csrf=session.csrf,
                                flash=session.flash, created_at=now, expires_at=session.expires_at)
        live = await self._bound().create_console_session(row, per_person=self.per_person, limit=self.limit, now=now)
        if live is not None:
            msg = "the console holds as many sessions as it can; try again later"
            raise RateLimited(msg, reason=f"{live} live console sessions", retry_after=60)
        return session_id, session

    async def get(self, session_id: str | None, *, take_flash: bool = False) -> Session | None:
        """The live session for this cookie value, or None. ``take_flash``: load (and clear) its flash message."""
        if not session_id or len(session_id) > 128:
            return None
        row = await self._bound().get_console_session(self._key(session_id), now=self.clock(), take_flash=take_flash)
        user = None if row is None else _identity_of(row.identity)
        if row is None or user is None:
            return None
        return Session(key=row.key, user=user, csrf=row.csrf, created_at=row.created_at, expires_at=row.expires_at,
                       flash=row.flash if take_flash else None)

    async def drop(self, session_id: str | None) -> None:
        if session_id and len(session_id) <= 128:
            await self._bound().drop_console_session(self._key(session_id))

    async def set_flash(self, session: Session, message: str) -> None:
        """The message this session's next page shows once, on whichever replica serves it."""
        await self._bound().set_console_session_flash(session.key, message)

    async def purge(self) -> int:
        return await self._bound().purge_console_sessions(now=self.clock())

    def login_token(self, nonce: str) -> str:
        """The login form's CSRF token: an HMAC of the pre-login cookie's nonce (nothing stored), under a key
        every replica derives alike.

        Raises:
            StoreUnavailable: not bound yet (before start-up ends).
        """
        if self._login_key is None:
            raise StoreUnavailable("the console is not ready", reason="console login key not bound")
        return hmac.new(self._login_key, nonce.encode(), hashlib.sha256).hexdigest()


LOGIN_KEY_LABEL = b"console login csrf v1"


SESSIONS = web.AppKey("console_sessions", SessionStore)


# -- errors, headers, same-origin --------------------------------------------------------------------


def _origin(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def check_same_origin(request: web.Request) -> None:
    """Positive same-origin evidence (Sec-Fetch-Site, Origin or Referer) and none against.

    ``Referrer-Policy: no-referrer`` makes browsers send ``Origin: null`` on form POSTs (Fetch standard), so
    ``Sec-Fetch-Site`` is the usual evidence from a browser; ``Origin``/``Referer`` serve other clients.

    Raises:
        CsrfRefused: cross-site, or no evidence at all.
    """
    own = _origin(request)
    fetch_site = request.headers.get("Sec-Fetch-Site")
    origin = request.headers.get("Origin")
    referer = request.headers.get("Referer")
    if fetch_site is not None and fetch_site != "same-origin":
        raise CsrfRefused("this form was not sent from the console", reason=f"Sec-Fetch-Site {fetch_site}")
    if origin is not None and origin != "null" and origin != own:
        raise CsrfRefused("this form was not sent from the console", reason="cross-origin Origin")
    if referer is not None and not (referer == own or referer.startswith(own + "/")):
        raise CsrfRefused("this form was not sent from the console", reason="cross-origin Referer")
    if fetch_site is None and origin in (None, "null") and referer is None:
        raise CsrfRefused("this form was not sent from the console", reason="no Origin, Referer or Sec-Fetch-Site")


def _check_csrf(expected: str, given: str) -> None:
    if not given or not hmac.compare_digest(expected.encode(), given.encode()):
        raise CsrfRefused("the form's security token did not match; reload the page and try again",
                          reason="bad CSRF token")


@web.middleware
async def console_middleware(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """For ``/console`` paths: security headers on every response, and errors as plain HTML pages."""
    if not (request.path == PREFIX or request.path.startswith(PREFIX + "/")):
        return await handler(request)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            exc.headers.update(SECURITY_HEADERS)
            raise
        response = _error_page(request, exc.status, exc.reason, "There is no such page here."
                               if exc.status == 404 else exc.reason)
    except SignInRequired:
        response = _redirect(f"{PREFIX}/login") if request.method == "GET" else _error_page(
            request, 401, "Sign in required", "Your session has ended or you have not signed in.", sign_in=True)
    except BrokerError as exc:
        if exc.http_status >= 500:
            log.warning("console %s %s failed: %s (%s)", request.method, log_path(request), exc.code, exc.reason)
        else:
            log.info("console %s %s refused: %s (%s)", request.method, log_path(request), exc.code, exc.reason)
        response = _error_page(request, exc.http_status, exc.title, str(exc))
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
    except Exception:
        log.exception("console error on %s %s (request %s)", request.method, log_path(request),
                      request.get("request_id"))
        response = _error_page(request, 500, "Internal error",
                               f"The broker failed; request id {request.get('request_id', '-')} identifies it "
                               "in its log.")
    response.headers.update(SECURITY_HEADERS)
    return response


# -- rendering ---------------------------------------------------------------------------------------
#
# Markup lives in broker/templates/console/*.html; this section only prepares values. The environment escapes
# every value (autoescape=True for every template, whatever its name), prints None as nothing, and fails on an
# undefined name rather than printing nothing. Never mark a value ``|safe`` or ``Markup``: task reasons, names,
# ids, approval reasons and audit records are typed by agents and users (tests/api/test_console_escaping.py).


TEMPLATES = web.AppKey("console_templates", jinja2.Environment)


def _revocation(kind: str) -> str:
    return revocation_of_kind(kind)


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _dur(seconds: float) -> str:
    s = max(round(seconds), 0)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min" + (f" {s % 60} s" if s % 60 else "")
    return f"{s // 3600} h {s % 3600 // 60} min"


def _finalize(value: object) -> object:
    return "" if value is None else value


def _setup_templates(app: web.Application) -> None:
    filters: dict[str, Callable[..., str]] = {"when": _when, "dur": _dur, "revocation": _revocation}
    env = aiohttp_jinja2.setup(
        app, app_key=TEMPLATES, loader=jinja2.PackageLoader("broker", "templates/console"), autoescape=True,
        undefined=jinja2.StrictUndefined, finalize=_finalize, trim_blocks=True, lstrip_blocks=True,
        default_helpers=False, filters=filters)
    del env.globals["app"]  # templates see what a handler passes, not the app and its keys
    env.globals.update(prefix=PREFIX, max_reason=_MAX_REASON, max_token_bytes=MAX_TOKEN_BYTES)


@dataclass(frozen=True)
class _Nav:
    """The header of a signed-in page: the links this person's roles open, their name, sign-out's token."""

    links: list[tuple[str, str, str]]
    active: str
    who: str
    csrf: str


def _page(request: web.Request, template: str, title: str, *, session: Session | None = None, active: str = "",
          status: int = 200, **context: object) -> web.Response:
    """Render one console page; a signed-in page gets the navigation and (once) the session's flash message."""
    nav = None
    flash = None
    if session is not None:
        catalog = request.app[api.CATALOG]
        links = []
        if _can_see_approvals(catalog, session.user):
            links.append(("approvals", PREFIX, "Approvals"))
        if _is_staff(catalog, session.user):
            links.append(("tasks", f"{PREFIX}/tasks", "Tasks and leases"))
            links.append(("history", f"{PREFIX}/history", "History"))
        nav = _Nav(links=links, active=active, who=session.user.name, csrf=session.csrf)
        flash, session.flash = session.flash, None
    return aiohttp_jinja2.render_template(f"{template}.html", request,
                                          {"title": title, "nav": nav, "flash": flash, **context},
                                          app_key=TEMPLATES, status=status)


def _error_page(request: web.Request, status: int, title: str, message: str, *, sign_in: bool = False
                ) -> web.Response:
    return _page(request, "error", title, status=status, message=message, sign_in=sign_in)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _login_form(request: web.Request, title: str, *, status: int, note: str = "") -> web.Response:
    """The sign-in form (``note``: a refusal to show above it), with a fresh pre-login cookie for its CSRF token."""
    nonce = secrets.token_urlsafe(32)
    response = _page(request, "login", title, status=status, note=note,
                     login_csrf=request.app[SESSIONS].login_token(nonce))
    _set_cookie(request, response, LOGIN_COOKIE, nonce, max_age=1800)
    return response


def _set_cookie(request: web.Request, response: web.Response, name: str, value: str, *, max_age: int | None) -> None:
    response.set_cookie(name, value, path=PREFIX, httponly=True, samesite="Strict", secure=request.secure,
                        max_age=max_age)


# -- roles -------------------------------------------------------------------------------------------


def _can_see_approvals(catalog: Catalog, user: UserIdentity) -> bool:
    return any_includes(catalog.approvers, user) or any_includes(catalog.auditors, user)


def _is_staff(catalog: Catalog, user: UserIdentity) -> bool:
    return any_includes(catalog.operators, user) or any_includes(catalog.auditors, user)


async def _session(request: web.Request) -> Session:
    """The request's session; a page (GET) takes its flash message, a form post leaves it for the next page.

    Raises: SignInRequired."""
    session = await request.app[SESSIONS].get(request.cookies.get(COOKIE), take_flash=request.method == "GET")
    if session is None:
        raise SignInRequired
    note_identity(request, session.user)  # the access log names the signed-in person (broker.instrument)
    return session


async def _form(request: web.Request, session: Session | None) -> dict[str, str]:
    """The posted form after the same-origin and synchronizer-token checks. Raises: CsrfRefused."""
    check_same_origin(request)
    # Only what the console's own forms send; aiohttp's multipart and charset handling raise on a
    # malformed body with the attacker's text in the message.
    charset = (request.charset or "utf-8").lower()
    if request.content_type != "application/x-www-form-urlencoded" or charset not in ("utf-8", "utf8"):
        raise UnsupportedMediaType("send the form as application/x-www-form-urlencoded (UTF-8)",
                                   reason=f"content type {request.content_type[:64]!r}")
    try:
        data = await request.post()
    except (ValueError, LookupError, UnicodeDecodeError, web.HTTPException) as exc:
        raise BadRequest("the form could not be read", reason=type(exc).__name__) from exc
    form = {k: v for k, v in data.items() if isinstance(v, str)}
    if session is not None:
        _check_csrf(session.csrf, form.get("csrf", ""))
    return form


def _reason(form: dict[str, str]) -> str:
    reason = form.get("reason", "").strip()
    if not reason or len(reason) > _MAX_REASON:
        raise BadRequest(f"give a reason (1 to {_MAX_REASON} characters): it goes into the audit trail")
    return reason


# -- sign-in -----------------------------------------------------------------------------------------


async def login_page(request: web.Request, *, status: int = 200, note: str = "") -> web.Response:
    """The sign-in form, with a fresh pre-login cookie for its CSRF token."""
    return _login_form(request, "Sign in", status=status, note=note)


async def login(request: web.Request) -> web.Response:
    """Verify the pasted token, start a fresh server-side session, forget the token."""
    store = request.app[SESSIONS]
    form = await _form(request, None)
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce:
        raise CsrfRefused("the sign-in form expired; reload it and try again", reason="no login cookie")
    _check_csrf(store.login_token(nonce), form.get("csrf", ""))
    token = form.get("token", "").strip()
    if not token or len(token) > MAX_TOKEN_BYTES:
        return await login_page(request, status=401, note="The token was not accepted.")
    try:
        user = await request.app[api.USERS].verify(token)
    except InvalidIdentity as exc:
        log.info("console sign-in refused: %s", exc.reason)
        return await login_page(request, status=401, note="The token was not accepted.")
    catalog = request.app[api.CATALOG]
    if not (_can_see_approvals(catalog, user) or _is_staff(catalog, user)):
        raise Denied("this console is for approvers, operators and auditors", reason=f"{user.id} has no role")
    # An offboarded approver or operator signs in no more.
    await request.app[api.STORE].check_unlocked(Person(user.id, user.name, user.trusted_email, user.email),
                                                now=store.clock())
    # Only once the new session exists is the old one dropped: a refused sign-in leaves the person signed in.
    session_id, _ = await store.create(user)
    await store.drop(request.cookies.get(COOKIE))
    response = _redirect(PREFIX if _can_see_approvals(catalog, user) else f"{PREFIX}/tasks")
    _set_cookie(request, response, COOKIE, session_id, max_age=max(int(user.expires_at - store.clock()), 1))
    response.del_cookie(LOGIN_COOKIE, path=PREFIX)
    log.info("console sign-in: %s", user.id)
    return response


async def logout(request: web.Request) -> web.Response:
    """``POST /console/logout``: end the session (server side) and clear the cookie."""
    store = request.app[SESSIONS]
    session = await _session(request)
    await _form(request, session)
    await store.drop(request.cookies.get(COOKIE))
    response = _redirect(f"{PREFIX}/login")
    response.del_cookie(COOKIE, path=PREFIX)
    return response


# -- approvals ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Vote:
    """One recorded vote as the queue shows it (from ``Store.approval_votes``' loosely typed dicts)."""

    approver: str
    approver_name: str | None
    decision: object
    reason: object
    auth_time: float | None
    decided_at: float | None

    @classmethod
    def of(cls, vote: dict[str, object]) -> _Vote:
        name = vote.get("approver_name")
        return cls(approver=str(vote.get("approver")), approver_name=name if isinstance(name, str) else None,
                   decision=vote.get("decision"), reason=vote.get("reason"),
                   auth_time=_float(vote.get("auth_time")), decided_at=_float(vote.get("decided_at")))


@dataclass(frozen=True)
class _Card:
    """One pending request in the queue, with what the viewer may do about it."""

    approval: ApprovalRow
    task: TaskRow | None
    votes: list[_Vote]
    approved: int
    can_decide: bool


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


async def approvals_page(request: web.Request) -> web.Response:
    """``GET /console``: every pending approval in full; approve/deny forms for approvers."""
    session = await _session(request)
    catalog = request.app[api.CATALOG]
    if not _can_see_approvals(catalog, session.user):
        if _is_staff(catalog, session.user):
            return _redirect(f"{PREFIX}/tasks")
        raise Denied("approvers and auditors only", reason=f"{session.user.id} is not an approver")
    store = request.app[api.STORE]
    now = request.app[api.CLOCK]()
    can_decide = any_includes(catalog.approvers, session.user)
    cards = []
    for a in await store.list_approvals(state="pending", now=now):
        task = await store.get_task(a.task_id)
        votes = [_Vote.of(v) for v in await store.approval_votes(a.id)]
        cards.append(_Card(approval=a, task=task, votes=votes,
                           approved=sum(1 for v in votes if v.decision == "approve"),
                           can_decide=can_decide and not is_same_person(session.user, a.user,
                                                                        task.user_email if task else None)))
    signed_in_ago = None if session.user.auth_time is None else now - session.user.auth_time
    return _page(request, "approvals", "Approvals waiting", session=session, active="approvals", cards=cards,
                 now=now, staff=_is_staff(catalog, session.user), who=session.user.name, signed_in_ago=signed_in_ago,
                 csrf=session.csrf)


async def decide(request: web.Request) -> web.Response:
    """``POST /console/approvals/{id}``: one vote through ``ApprovalManager.decide`` as the session's person."""
    session = await _session(request)
    form = await _form(request, session)
    decision = form.get("decision")
    if decision not in ("approve", "deny"):
        raise BadRequest("choose approve or deny")
    choice: Literal["approve", "deny"] = "approve" if decision == "approve" else "deny"
    reason = _reason(form)
    approval_id = request.match_info["approval_id"]
    try:
        row = await request.app[api.APPROVALS].decide(session.user, approval_id, choice, reason)
    except InsufficientAuthentication as exc:
        return await _reauthenticate(request, session, exc)
    word = "approved" if choice == "approve" else "denied"
    more = "" if row.state != "pending" else f"; it still needs {row.required} approval(s) in all"
    await request.app[SESSIONS].set_flash(
        session, f"You {word} {row.grant} for {row.user_name or row.user} ({row.id}): now {row.state}{more}.")
    return _redirect(PREFIX)


async def _reauthenticate(request: web.Request, session: Session, exc: InsufficientAuthentication
                          ) -> web.Response:
    """RFC 9470 step-up, in browser form: the decision was not recorded; sign in again with a fresh token."""
    now = request.app[api.CLOCK]()
    when = "" if session.user.auth_time is None else f" You signed in {_dur(now - session.user.auth_time)} ago."
    note = (f"Deciding an approval needs a sign-in no older than {_dur(exc.max_age)}.{when} Nothing was recorded: "
            "sign in again with a fresh token from your identity provider, then decide.")
    response = _login_form(request, "Re-authenticate", status=401, note=note)
    response.headers["WWW-Authenticate"] = (f'Bearer error="insufficient_user_authentication", '
                                            f'max_age={exc.max_age}')
    return response


# -- tasks -------------------------------------------------------------------------------------------


def _staff_or_denied(catalog: Catalog, user: UserIdentity) -> None:
    if not _is_staff(catalog, user):
        raise Denied("operators and auditors only", reason=f"{user.id} is not an operator")


async def tasks_page(request: web.Request) -> web.Response:
    """``GET /console/tasks``: live tasks (with Revoke for operators) and live leases."""
    session = await _session(request)
    catalog = request.app[api.CATALOG]
    _staff_or_denied(catalog, session.user)
    store = request.app[api.STORE]
    now = request.app[api.CLOCK]()
    live = await store.find_tasks(states=("active",), limit=200)
    leases = await store.find_leases(states=("active", "revoke_pending"), limit=500)
    counts: dict[tuple[str, str], list[int]] = {}
    for lease, task in leases:
        n = counts.setdefault((task.tenant, lease.grant), [0, 0])
        n[0 if lease.state == "active" else 1] += 1
    chart = timeline.lease_chart([(t, g, a, p) for (t, g), (a, p) in counts.items()])
    return _page(request, "tasks", "Tasks and leases", session=session, active="tasks", tasks=live, now=now,
                 operator=any_includes(catalog.operators, session.user), csrf=session.csrf, leases=leases,
                 leases_with_task=any(t is not None for _, t in leases), lease_chart=chart)


async def task_page(request: web.Request) -> web.Response:
    """``GET /console/tasks/{id}``: the task, its leases and its timeline from the audit records."""
    session = await _session(request)
    catalog = request.app[api.CATALOG]
    _staff_or_denied(catalog, session.user)
    task, leases = await request.app[api.TASKS].get(request.match_info["task_id"])
    records = await request.app[api.STORE].query_audit(task=task.id, limit=1000)
    now = request.app[api.CLOCK]()
    lanes = timeline.task_lanes(task, leases, [r.record for r in records])
    # The task's life so far: from its start to its end (a live one: to now), and every lease's end in it.
    last = now if task.state == "active" else (task.ended_at if task.ended_at is not None else task.expires_at)
    last = max([last, *[x.revoked_at for x in leases if x.revoked_at is not None]])
    start, end = _padded(task.created_at, last)
    chart = timeline.timeline_chart(lanes, start=start, end=end, now=now,
                                    summary=f"Timeline of task {task.id}: {len(leases)} lease(s)")
    return _page(request, "task", f"Task {task.id}", session=session, active="tasks", task=task,
                 leases=[(x, None) for x in leases], records=records, chart=chart)


def _padded(start: float, end: float) -> tuple[float, float]:
    """The window ``[start, end]`` with a little room on each side."""
    pad = max((end - start) * 0.04, 0.5)
    return start - pad, end + pad


# -- history: a user's or an agent's tasks over a window ----------------------------------------------

_HISTORY_TASKS = 25
_HISTORY_RECORDS = 5000
_MAX_WINDOW = 31 * 86400
_SELECTORS = ("user", "agent")


def _parse_when(text: str, name: str) -> float:
    """``YYYY-MM-DDTHH:MM`` (what a datetime-local field sends; seconds optional), read as UTC.

    Raises:
        BadRequest: anything else.
    """
    for fmt in ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return float(calendar.timegm(time.strptime(text.strip(), fmt)))
        except ValueError:
            continue
    raise BadRequest(f"{name} must be a UTC date and time like 2026-12-01T09:30")


def _form_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))


def _selector(kind: str, value: str) -> tuple[Literal["user", "agent"], str]:
    """Raises: BadRequest: a kind other than user or agent, or an empty or oversized value."""
    if kind not in _SELECTORS:
        raise BadRequest("choose user or agent")
    value = value.strip()
    if not value or len(value) > 2048:
        raise BadRequest(f"name the {kind} (a person id or email address, or a SPIFFE ID)")
    return ("user" if kind == "user" else "agent"), value


def _history_url(kind: str, value: str) -> str:
    return str(URL(f"{PREFIX}/history").with_query(kind=kind, value=value))


async def _window_records(request: web.Request, kind: str, value: str, start: float, end: float) -> list[AuditRow]:
    store = request.app[api.STORE]
    user, agent = (value, None) if kind == "user" else (None, value)
    rows: list[AuditRow] = []
    after = 0
    while len(rows) < _HISTORY_RECORDS:
        page = await store.query_audit(user=user, agent=agent, since=start, until=end, after_seq=after, limit=1000)
        rows += page
        if len(page) < 1000:
            break
        after = page[-1].seq
    return rows


async def history_page(request: web.Request) -> web.Response:
    """``GET /console/history?kind=user|agent&value=...&from=...&until=...``: that person's or agent's tasks
    and leases over the window (default: the last 24 hours), as a timeline."""
    session = await _session(request)
    catalog = request.app[api.CATALOG]
    _staff_or_denied(catalog, session.user)
    now = request.app[api.CLOCK]()
    q = request.query
    until = _parse_when(q["until"], "until") if q.get("until") else now
    since = _parse_when(q["from"], "from") if q.get("from") else until - 86400
    if not since < until or until - since > _MAX_WINDOW:
        raise BadRequest("the window must start before it ends, and span at most 31 days")
    kind, value, chart, shown, total = q.get("kind", "user"), q.get("value", ""), None, 0, 0
    if value:
        kind, value = _selector(kind, value)
        records = await _window_records(request, kind, value, since, until)
        by_task: dict[str, list[AuditRow]] = {}
        for r in records:
            if r.record.task is not None:
                by_task.setdefault(r.record.task, []).append(r)
        total = len(by_task)
        lanes: list[timeline.Lane] = []
        # The most recent tasks of the window, drawn oldest first.
        for task_id in list(by_task)[-_HISTORY_TASKS:]:
            found = await request.app[api.STORE].get_task(task_id)
            if found is None:
                continue
            leases = await request.app[api.STORE].list_leases(task_id=task_id)
            lanes += timeline.task_lanes(found, leases, [r.record for r in by_task[task_id]],
                                         href=f"{PREFIX}/tasks/{task_id}")
            shown += 1
        summary = f"{kind} {value}: {shown} task(s), {_when(since)} to {_when(until)}"
        chart = timeline.timeline_chart(lanes, start=since, end=until, now=now, summary=summary)
    return _page(request, "history", "History", session=session, active="history", kind=kind, value=value,
                 since=_form_time(since), until=q.get("until", ""), chart=chart, shown=shown, total=total,
                 operator=any_includes(catalog.operators, session.user), csrf=session.csrf)


async def _operator(request: web.Request, user: UserIdentity) -> None:
    """The API's rule for revocations: an operator, not locked out. Raises: Denied, Locked."""
    if not any_includes(request.app[api.CATALOG].operators, user):
        raise Denied("operators only", reason=f"{user.id} is not an operator")
    await request.app[api.STORE].check_unlocked(Person(user.id, user.name, user.trusted_email, user.email),
                                                now=request.app[api.CLOCK]())


async def revoke_selected(request: web.Request) -> web.Response:
    """``POST /console/revoke``: revoke every live task of a user or an agent and lock them out.

    The first post shows what would be revoked and asks to confirm; only a post with ``confirm=yes`` (from
    that page, with the session's token like every form) calls ``Revocations.revoke``.
    """
    session = await _session(request)
    form = await _form(request, session)
    await _operator(request, session.user)
    kind, value = _selector(form.get("kind", ""), form.get("value", ""))
    reason = _reason(form)
    if form.get("confirm") != "yes":
        store = request.app[api.STORE]
        user, agent = (value, None) if kind == "user" else (None, value)
        tasks = await store.find_tasks(user=user, agent=agent, states=("active",), limit=1000)
        leases = await store.find_leases(user=user, agent=agent, states=("active", "revoke_pending"), limit=1000)
        return _page(request, "revoke_confirm", f"Revoke this {kind}?", session=session, active="history",
                     kind=kind, value=value, reason=reason, tasks=tasks, leases=len(leases), csrf=session.csrf,
                     back=_history_url(kind, value))
    st = await request.app[api.REVOCATIONS].revoke(session.user, kind=kind, value=value, reason=reason,
                                                   wait=_REVOKE_WAIT)
    r = st.revocation
    lock = " and locked out until an operator lifts the lock" if r.lock else ""
    if st.done:
        flash = (f"Revoked {kind} {value} ({r.id}): {r.tasks} task(s), {st.revoked} lease(s) confirmed by "
                 f"Vault{lock}.")
    else:
        flash = (f"Revoking {kind} {value} ({r.id}): {st.pending} lease(s) still waiting for Vault to "
                 f"confirm; the broker keeps retrying{lock}.")
    await request.app[SESSIONS].set_flash(session, flash)
    return _redirect(_history_url(kind, value))


async def revoke_task(request: web.Request) -> web.Response:
    """``POST /console/tasks/{id}/revoke``: ``Revocations.revoke(kind="task")`` with the operator's reason."""
    session = await _session(request)
    form = await _form(request, session)
    catalog = request.app[api.CATALOG]
    if not any_includes(catalog.operators, session.user):
        raise Denied("operators only", reason=f"{session.user.id} is not an operator")
    reason = _reason(form)
    task_id = request.match_info["task_id"]
    st = await request.app[api.REVOCATIONS].revoke(session.user, kind="task", value=task_id, reason=reason,
                                                   wait=_REVOKE_WAIT)
    r = st.revocation
    if st.done:
        flash = (f"Task {task_id} revoked ({r.id}): {r.tasks} task(s), {st.revoked} lease(s), "
                 "confirmed by Vault.")
    else:
        flash = (f"Task {task_id} is being revoked ({r.id}): {st.pending} lease(s) still waiting for "
                 "Vault to confirm; the broker keeps retrying.")
    await request.app[SESSIONS].set_flash(session, flash)
    return _redirect(f"{PREFIX}/tasks")


# -- static and wiring -------------------------------------------------------------------------------


@functools.cache
def _css() -> bytes:
    """The stylesheet, read once from the package."""
    return resources.files("broker").joinpath("static/console.css").read_bytes()


async def stylesheet(request: web.Request) -> web.Response:
    """``GET /console/static/console.css`` (the CSP allows styles from 'self' only)."""
    return web.Response(body=_css(), content_type="text/css", charset="utf-8")


async def _login_get(request: web.Request) -> web.Response:
    return await login_page(request)


def add_console_routes(app: web.Application, *, sessions_per_person: int = 5,
                       sign_in_rate: RateLimiter | None = None) -> None:
    """Register the console's pages, its session table and its middleware on the broker's app."""
    app[SESSIONS] = SessionStore(clock=lambda: app[api.CLOCK]() if api.CLOCK in app else time.time(),
                                 per_person=sessions_per_person, sign_in_rate=sign_in_rate)
    app.middlewares.append(console_middleware)
    _setup_templates(app)
    app.router.add_get(PREFIX, approvals_page)
    app.router.add_get(f"{PREFIX}/", approvals_page)
    app.router.add_get(f"{PREFIX}/login", _login_get)
    app.router.add_post(f"{PREFIX}/login", login)
    app.router.add_post(f"{PREFIX}/logout", logout)
    app.router.add_post(f"{PREFIX}/approvals/{{approval_id}}", decide)
    app.router.add_get(f"{PREFIX}/tasks", tasks_page)
    app.router.add_get(f"{PREFIX}/tasks/{{task_id}}", task_page)
    app.router.add_post(f"{PREFIX}/tasks/{{task_id}}/revoke", revoke_task)
    app.router.add_get(f"{PREFIX}/history", history_page)
    app.router.add_post(f"{PREFIX}/revoke", revoke_selected)
    app.router.add_get(f"{PREFIX}/static/console.css", stylesheet)


__all__ = ["COOKIE", "LOGIN_KEY_LABEL", "SECURITY_HEADERS", "SESSIONS", "Session", "SessionStore", "add_console_routes",
           "check_same_origin"]
