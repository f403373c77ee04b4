"""The web console: server-rendered pages for approvers, operators and auditors, on the broker's own app.

Pages (no JavaScript, plain forms, every value through ``html.escape``):

* ``GET/POST /console/login``: sign in by pasting an OIDC ID token, verified by the app's ``UserVerifier``;
  ``POST /console/logout``.
* ``GET /console``: the approvals queue, each pending request in full, with approve/deny and a reason.
* ``GET /console/tasks``: live tasks and leases, with a revoke button per task (operators).
* ``GET /console/tasks/{id}``: one task's timeline from the audit records (operators, auditors).

Rules this file keeps:

1. Sessions live on the server only: a random 32-byte id in an ``HttpOnly; SameSite=Strict; Path=/console``
   cookie (``Secure`` over https), a bounded in-memory table keyed by the id's SHA-256, expiring with the
   token's ``exp``. The token itself is never kept, never put in a URL, never handed to the browser again;
   the session holds the verified ``UserIdentity`` (with its ``auth_time``).
2. Every POST carries the session's synchronizer token (compared with ``hmac.compare_digest``) and must
   show positive same-origin evidence (``Sec-Fetch-Site``, ``Origin`` or ``Referer``) and none against.
   The login form, before any session exists, uses a signed double-submit cookie instead.
3. Role checks are the API's: approvers (and auditors, read-only) see the queue; operators and auditors
   see tasks; only operators revoke; ``ApprovalManager.decide`` itself enforces the approver rules,
   including the re-authentication rule, whose refusal is shown as a "sign in again" page (RFC 9470
   step-up, in browser form).
4. Every console response carries a strict CSP and the other headers below; errors are a plain page with
   the error's public message, never a traceback and never a token.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import html
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Literal

from aiohttp import web

from broker import api
from broker.approvals import is_same_person
from broker.delegation import Catalog, any_includes
from broker.errors import (
    BadRequest,
    BrokerError,
    CsrfRefused,
    Denied,
    InsufficientAuthentication,
    InvalidIdentity,
    RateLimited,
    SignInRequired,
)
from broker.identity import MAX_TOKEN_BYTES, UserIdentity
from broker.limits import RateLimiter
from broker.store import ApprovalRow, LeaseRow, TaskRow

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
    """One signed-in person. ``csrf`` is the synchronizer token of every form this session posts."""

    user: UserIdentity
    csrf: str
    created_at: float
    expires_at: float
    flash: str | None = None


@dataclass
class SessionStore:
    """Server-side sessions, bounded per person and in all.

    Signing in past ``per_person`` ends that person's own oldest session, never anyone else's; past
    ``limit`` in all (after expired sessions go) a sign-in is refused rather than evicting another
    person, so no one can sign everybody else out by signing in many times. Sign-ins are rate-limited
    per person (``sign_in_rate``).
    """

    clock: Callable[[], float] = time.time
    limit: int = MAX_SESSIONS
    per_person: int = 5
    sign_in_rate: RateLimiter | None = None
    login_key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _sessions: dict[str, Session] = field(default_factory=dict)

    @staticmethod
    def _key(session_id: str) -> str:
        return hashlib.sha256(session_id.encode()).hexdigest()

    def create(self, user: UserIdentity) -> tuple[str, Session]:
        """A new session (new id: nothing from before sign-in carries over). Returns (cookie value, session).

        Raises:
            RateLimited: this person signs in too often, or the console holds ``limit`` live sessions.
        """
        if self.sign_in_rate is not None:
            self.sign_in_rate.take(user.id, what="person")
        now = self.clock()
        self._purge(now)
        own = sorted((k for k, s in self._sessions.items() if s.user.id == user.id),
                     key=lambda k: self._sessions[k].created_at)
        for key in own[:max(len(own) - self.per_person + 1, 0)]:
            del self._sessions[key]
        if len(self._sessions) >= self.limit:
            msg = "the console holds as many sessions as it can; try again later"
            raise RateLimited(msg, reason=f"{len(self._sessions)} live console sessions", retry_after=60)
        session_id = secrets.token_urlsafe(32)
        session = Session(user=user, csrf=secrets.token_urlsafe(32), created_at=now, expires_at=user.expires_at)
        self._sessions[self._key(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id or len(session_id) > 128:
            return None
        key = self._key(session_id)
        session = self._sessions.get(key)
        if session is not None and session.expires_at <= self.clock():
            del self._sessions[key]
            return None
        return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(self._key(session_id), None)

    def login_token(self, nonce: str) -> str:
        """The login form's CSRF token: an HMAC of the pre-login cookie's nonce (nothing stored)."""
        return hmac.new(self.login_key, nonce.encode(), hashlib.sha256).hexdigest()

    def __len__(self) -> int:
        return len(self._sessions)

    def _purge(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[key]


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
            log.warning("console %s %s failed: %s (%s)", request.method, request.path, exc.code, exc.reason)
        else:
            log.info("console %s %s refused: %s (%s)", request.method, request.path, exc.code, exc.reason)
        response = _error_page(request, exc.http_status, exc.title, str(exc))
    except Exception:
        log.exception("console error on %s %s (request %s)", request.method, request.path,
                      request.get("request_id"))
        response = _error_page(request, 500, "Internal error",
                               f"The broker failed; request id {request.get('request_id', '-')} identifies it "
                               "in its log.")
    response.headers.update(SECURITY_HEADERS)
    return response


# -- rendering ---------------------------------------------------------------------------------------


def e(value: object) -> str:
    """HTML-escape anything (quotes too)."""
    return html.escape("" if value is None else str(value), quote=True)


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


def _layout(title: str, body: str, *, session: Session | None = None, active: str = "",
            catalog: Catalog | None = None, status: int = 200) -> web.Response:
    nav = ""
    if session is not None and catalog is not None:
        links = []
        if _can_see_approvals(catalog, session.user):
            links.append(("approvals", PREFIX, "Approvals"))
        if _is_staff(catalog, session.user):
            links.append(("tasks", f"{PREFIX}/tasks", "Tasks and leases"))
        current = ' class="active"'
        items = "".join(f'<a href="{e(href)}"{current if key == active else ""}>{e(label)}</a>'
                        for key, href, label in links)
        nav = (f'<nav>{items}<span class="who">{e(session.user.name)}</span>'
               f'<form method="post" action="{PREFIX}/logout" class="inline">{_csrf_field(session)}'
               f'<button type="submit" class="link">Sign out</button></form></nav>')
    flash = ""
    if session is not None and session.flash:
        flash = f'<p class="flash">{e(session.flash)}</p>'
        session.flash = None
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{e(title)} - agent secrets broker</title>'
            f'<link rel="stylesheet" href="{PREFIX}/static/console.css"></head><body>'
            f'<header><span class="brand">agent secrets broker</span>{nav}</header>'
            f'<main><h1>{e(title)}</h1>{flash}{body}</main></body></html>')
    return web.Response(status=status, text=page, content_type="text/html", charset="utf-8")


def _error_page(request: web.Request, status: int, title: str, message: str, *, sign_in: bool = False
                ) -> web.Response:
    link = f'<p><a href="{PREFIX}/login">Sign in</a></p>' if sign_in else f'<p><a href="{PREFIX}">Back</a></p>'
    return _layout(title, f'<p class="error">{e(message)}</p>{link}', status=status)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _csrf_field(session: Session) -> str:
    return f'<input type="hidden" name="csrf" value="{e(session.csrf)}">'


def _login_form(store: SessionStore, response_cookies: list[tuple[str, str]], *, note: str = "") -> str:
    nonce = secrets.token_urlsafe(32)
    response_cookies.append((LOGIN_COOKIE, nonce))
    return (f'{note}<form method="post" action="{PREFIX}/login" class="card">'
            f'<input type="hidden" name="csrf" value="{e(store.login_token(nonce))}">'
            f'<label for="token">OIDC ID token</label>'
            f'<textarea id="token" name="token" rows="6" required maxlength="{MAX_TOKEN_BYTES}" '
            f'autocomplete="off" spellcheck="false"></textarea>'
            f'<p class="hint">Paste an ID token from your identity provider (with <code>broker dev</code>: '
            f'the contents of <code>.broker-dev/demo-approver.jwt</code>). It is verified and then discarded: '
            f'the broker keeps a server-side session, not the token.</p>'
            f'<button type="submit">Sign in</button></form>')


def _set_cookie(request: web.Request, response: web.Response, name: str, value: str, *, max_age: int | None) -> None:
    response.set_cookie(name, value, path=PREFIX, httponly=True, samesite="Strict", secure=request.secure,
                        max_age=max_age)


# -- roles -------------------------------------------------------------------------------------------


def _can_see_approvals(catalog: Catalog, user: UserIdentity) -> bool:
    return any_includes(catalog.approvers, user) or any_includes(catalog.auditors, user)


def _is_staff(catalog: Catalog, user: UserIdentity) -> bool:
    return any_includes(catalog.operators, user) or any_includes(catalog.auditors, user)


def _session(request: web.Request) -> Session:
    """Raises: SignInRequired."""
    session = request.app[SESSIONS].get(request.cookies.get(COOKIE))
    if session is None:
        raise SignInRequired
    return session


async def _form(request: web.Request, session: Session | None) -> dict[str, str]:
    """The posted form after the same-origin and synchronizer-token checks. Raises: CsrfRefused."""
    check_same_origin(request)
    data = await request.post()
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
    store = request.app[SESSIONS]
    cookies: list[tuple[str, str]] = []
    body = _login_form(store, cookies, note=note)
    response = _layout("Sign in", body, status=status)
    for name, value in cookies:
        _set_cookie(request, response, name, value, max_age=1800)
    return response


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
        return await login_page(request, status=401, note='<p class="error">The token was not accepted.</p>')
    try:
        user = await request.app[api.USERS].verify(token)
    except InvalidIdentity as exc:
        log.info("console sign-in refused: %s", exc.reason)
        return await login_page(request, status=401, note='<p class="error">The token was not accepted.</p>')
    catalog = request.app[api.CATALOG]
    if not (_can_see_approvals(catalog, user) or _is_staff(catalog, user)):
        raise Denied("this console is for approvers, operators and auditors", reason=f"{user.id} has no role")
    store.drop(request.cookies.get(COOKIE))
    session_id, session = store.create(user)
    session.flash = f"Signed in as {user.name}."
    response = _redirect(PREFIX if _can_see_approvals(catalog, user) else f"{PREFIX}/tasks")
    _set_cookie(request, response, COOKIE, session_id, max_age=max(int(user.expires_at - store.clock()), 1))
    response.del_cookie(LOGIN_COOKIE, path=PREFIX)
    log.info("console sign-in: %s", user.id)
    return response


async def logout(request: web.Request) -> web.Response:
    """``POST /console/logout``: end the session (server side) and clear the cookie."""
    store = request.app[SESSIONS]
    session = _session(request)
    await _form(request, session)
    store.drop(request.cookies.get(COOKIE))
    response = _redirect(f"{PREFIX}/login")
    response.del_cookie(COOKIE, path=PREFIX)
    return response


# -- approvals ---------------------------------------------------------------------------------------


def _approval_card(a: ApprovalRow, task: TaskRow | None, votes: Sequence[dict[str, object]], *, now: float,
                   session: Session, can_decide: bool, staff: bool) -> str:
    task_cell = (f'<a href="{PREFIX}/tasks/{e(a.task_id)}">{e(a.task_id)}</a>' if staff else e(a.task_id))
    rows = [
        ("Delegated by", _person(a.user, a.user_name)),
        ("Agent", f"<code>{e(a.agent)}</code>"),
        ("Grant", f"<strong>{e(a.grant)}</strong>"),
        ("Vault path", f"<code>{e(a.path)}</code>"),
        ("TTL", f"{e(_dur(a.ttl))} ({e(a.ttl)} s)"),
        ("Task", f"{task_cell} (role {e(task.role) if task else '-'}, tenant {e(a.tenant)})"),
        ("Task reason", f"<q>{e(task.reason) if task else '-'}</q>"),
        ("Requested", e(_when(a.created_at))),
        ("Expires", f"{e(_when(a.expires_at))} (in {e(_dur(a.expires_at - now))})"),
        ("Approvals", f"{sum(1 for v in votes if v.get('decision') == 'approve')} of {e(a.required)} needed"),
    ]
    facts = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    vote_list = "".join(
        f"<li><strong>{_person(str(v.get('approver')), _opt(v.get('approver_name')))}</strong> {e(v.get('decision'))}d: <q>{e(v.get('reason'))}</q> "
        f"<span class=\"muted\">(signed in {e(_when(_float(v.get('auth_time'))))}, "
        f"at {e(_when(_float(v.get('decided_at'))))})</span></li>" for v in votes)
    votes_html = f'<h3>Votes so far</h3><ul class="votes">{vote_list}</ul>' if votes else ""
    decide = ""
    if can_decide:
        decide = (f'<form method="post" action="{PREFIX}/approvals/{e(a.id)}" class="decide">{_csrf_field(session)}'
                  f'<label for="reason-{e(a.id)}">Reason (recorded in the audit trail)</label>'
                  f'<input type="text" id="reason-{e(a.id)}" name="reason" required maxlength="{_MAX_REASON}" '
                  f'autocomplete="off">'
                  f'<div class="buttons"><button type="submit" name="decision" value="approve" class="approve">'
                  f'Approve</button><button type="submit" name="decision" value="deny" class="deny">Deny</button>'
                  f'</div></form>')
    return (f'<section class="card approval" id="{e(a.id)}"><h2>{e(a.grant)} for {e(a.user_name or a.user)} '
            f'<span class="badge">{e(a.state)}</span></h2><p class="muted">approval <code>{e(a.id)}</code></p>'
            f'<dl>{facts}</dl>{votes_html}{decide}</section>')


def _person(person: str | None, name: str | None) -> str:
    """A person for the page: the display name, with the stable id (what the broker compares) beside it."""
    if person is None:
        return "-"
    if not name or name == person:
        return f"<code>{e(person)}</code>"
    return f'{e(name)} <span class="muted"><code>{e(person)}</code></span>'


def _opt(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


async def approvals_page(request: web.Request) -> web.Response:
    """``GET /console``: every pending approval in full; approve/deny forms for approvers."""
    session = _session(request)
    catalog = request.app[api.CATALOG]
    if not _can_see_approvals(catalog, session.user):
        if _is_staff(catalog, session.user):
            return _redirect(f"{PREFIX}/tasks")
        raise Denied("approvers and auditors only", reason=f"{session.user.id} is not an approver")
    store = request.app[api.STORE]
    now = request.app[api.CLOCK]()
    can_decide = any_includes(catalog.approvers, session.user)
    staff = _is_staff(catalog, session.user)
    cards = []
    for a in await store.list_approvals(state="pending", now=now):
        task = await store.get_task(a.task_id)
        votes = await store.approval_votes(a.id)
        cards.append(_approval_card(a, task, votes, now=now, session=session,
                                    can_decide=can_decide and not is_same_person(
                                        session.user, a.user, task.user_email if task else None),
                                    staff=staff))
    age = "" if session.user.auth_time is None else f", signed in {_dur(now - session.user.auth_time)} ago"
    intro = (f'<p class="muted">{len(cards)} pending request(s). You are {e(session.user.name)}{e(age)}. '
             f'Deciding needs a recent sign-in; if yours is too old you will be asked to sign in again.</p>')
    empty = '<p class="card">Nothing is waiting for approval.</p>' if not cards else ""
    return _layout("Approvals waiting", intro + empty + "".join(cards), session=session, active="approvals",
                   catalog=catalog)


async def decide(request: web.Request) -> web.Response:
    """``POST /console/approvals/{id}``: one vote through ``ApprovalManager.decide`` as the session's person."""
    session = _session(request)
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
    session.flash = f"You {word} {row.grant} for {row.user_name or row.user} ({row.id}): now {row.state}{more}."
    return _redirect(PREFIX)


async def _reauthenticate(request: web.Request, session: Session, exc: InsufficientAuthentication
                          ) -> web.Response:
    """RFC 9470 step-up, in browser form: the decision was not recorded; sign in again with a fresh token."""
    now = request.app[api.CLOCK]()
    when = "" if session.user.auth_time is None else f" You signed in {_dur(now - session.user.auth_time)} ago."
    note = (f'<p class="error">Deciding an approval needs a sign-in no older than {e(_dur(exc.max_age))}.'
            f'{e(when)} Nothing was recorded: sign in again with a fresh token from your identity provider, '
            f'then decide.</p>')
    store = request.app[SESSIONS]
    cookies: list[tuple[str, str]] = []
    response = _layout("Re-authenticate", _login_form(store, cookies, note=note), status=401)
    for name, value in cookies:
        _set_cookie(request, response, name, value, max_age=1800)
    response.headers["WWW-Authenticate"] = (f'Bearer error="insufficient_user_authentication", '
                                            f'max_age={exc.max_age}')
    return response


# -- tasks -------------------------------------------------------------------------------------------


def _staff_or_denied(catalog: Catalog, user: UserIdentity) -> None:
    if not _is_staff(catalog, user):
        raise Denied("operators and auditors only", reason=f"{user.id} is not an operator")


def _lease_rows(rows: Sequence[tuple[LeaseRow, TaskRow | None]], *, now: float) -> str:
    if not rows:
        return '<p class="muted">No leases.</p>'
    body = "".join(
        f"<tr><td><code>{e(x.id)}</code></td>"
        + (f'<td><a href="{PREFIX}/tasks/{e(t.id)}">{e(t.id)}</a></td><td>{e(t.agent)}</td>' if t else "")
        + f"<td>{e(x.grant)}</td><td><code>{e(x.path)}</code></td>"
        f'<td><span class="state {e(x.state)}">{e(x.state)}</span></td><td>{e(_when(x.issued_at))}</td>'
        f"<td>{e(_when(x.expires_at))}</td></tr>" for x, t in rows)
    with_task = any(t is not None for _, t in rows)
    head = "<th>lease</th>" + ("<th>task</th><th>agent</th>" if with_task else "") + (
        "<th>grant</th><th>Vault path</th><th>state</th><th>issued</th><th>expires</th>")
    return f'<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


async def tasks_page(request: web.Request) -> web.Response:
    """``GET /console/tasks``: live tasks (with Revoke for operators) and live leases."""
    session = _session(request)
    catalog = request.app[api.CATALOG]
    _staff_or_denied(catalog, session.user)
    store = request.app[api.STORE]
    now = request.app[api.CLOCK]()
    operator = any_includes(catalog.operators, session.user)
    live = await store.find_tasks(states=("active",), limit=200)
    rows = []
    for t in live:
        revoke = ""
        if operator:
            revoke = (f'<form method="post" action="{PREFIX}/tasks/{e(t.id)}/revoke" class="revoke">'
                      f'{_csrf_field(session)}<input type="text" name="reason" required maxlength="{_MAX_REASON}" '
                      f'placeholder="reason" aria-label="reason for revoking {e(t.id)}">'
                      f'<button type="submit" class="deny">Revoke</button></form>')
        rows.append(f'<tr><td><a href="{PREFIX}/tasks/{e(t.id)}">{e(t.id)}</a></td><td>{_person(t.user, t.user_name)}</td>'
                    f"<td><code>{e(t.agent)}</code></td><td>{e(t.role)}</td><td>{e(t.tenant)}</td>"
                    f"<td>{e(t.reason)}</td><td>{e(_when(t.expires_at))} (in {e(_dur(t.expires_at - now))})</td>"
                    f"<td>{revoke}</td></tr>")
    tasks_html = ('<p class="muted">No live tasks.</p>' if not rows else
                  '<table><thead><tr><th>task</th><th>user</th><th>agent</th><th>role</th><th>tenant</th>'
                  f'<th>reason</th><th>expires</th><th></th></tr></thead><tbody>{"".join(rows)}</tbody></table>')
    leases = await store.find_leases(states=("active", "revoke_pending"), limit=500)
    body = (f'<h2>Live tasks ({len(rows)})</h2>{tasks_html}'
            f'<h2>Live leases ({len(leases)})</h2>{_lease_rows([(x, t) for x, t in leases], now=now)}')
    return _layout("Tasks and leases", body, session=session, active="tasks", catalog=catalog)


async def task_page(request: web.Request) -> web.Response:
    """``GET /console/tasks/{id}``: the task, its leases and its timeline from the audit records."""
    session = _session(request)
    catalog = request.app[api.CATALOG]
    _staff_or_denied(catalog, session.user)
    now = request.app[api.CLOCK]()
    task, leases = await request.app[api.TASKS].get(request.match_info["task_id"])
    records = await request.app[api.STORE].query_audit(task=task.id, limit=1000)
    facts = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in (
        ("User", _person(task.user, task.user_name)), ("Agent", f"<code>{e(task.agent)}</code>"), ("Role", e(task.role)),
        ("Tenant", e(task.tenant)), ("Reason", f"<q>{e(task.reason)}</q>"),
        ("State", f'<span class="state {e(task.state)}">{e(task.state)}</span>'),
        ("Started", e(_when(task.created_at))), ("Expires", e(_when(task.expires_at))),
        ("Ended", e(_when(task.ended_at)))))
    timeline = "".join(
        f"<tr><td>{e(r.seq)}</td><td>{e(_when(r.record.time))}</td><td><strong>{e(r.record.event)}</strong></td>"
        f'<td><span class="state {e(r.record.outcome)}">{e(r.record.outcome)}</span></td>'
        f"<td>{_person(r.record.user, r.record.user_name)}</td><td><code>{e(r.record.resource)}</code></td><td>{e(r.record.action)}</td>"
        f"<td>{e(r.record.reason)}</td></tr>" for r in records)
    body = (f'<section class="card"><dl>{facts}</dl></section>'
            f'<h2>Leases ({len(leases)})</h2>{_lease_rows([(x, None) for x in leases], now=now)}'
            f'<h2>Timeline ({len(records)} audit records)</h2>'
            '<table><thead><tr><th>seq</th><th>time</th><th>event</th><th>outcome</th><th>user</th>'
            f'<th>resource</th><th>action</th><th>reason</th></tr></thead><tbody>{timeline}</tbody></table>')
    return _layout(f"Task {task.id}", body, session=session, active="tasks", catalog=catalog)


async def revoke_task(request: web.Request) -> web.Response:
    """``POST /console/tasks/{id}/revoke``: ``Revocations.revoke(kind="task")`` with the operator's reason."""
    session = _session(request)
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
        session.flash = f"Task {task_id} revoked ({r.id}): {r.tasks} task(s), {st.revoked} lease(s), confirmed by Vault."
    else:
        session.flash = (f"Task {task_id} is being revoked ({r.id}): {st.pending} lease(s) still waiting for "
                         "Vault to confirm; the broker keeps retrying.")
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
    app.router.add_get(PREFIX, approvals_page)
    app.router.add_get(f"{PREFIX}/", approvals_page)
    app.router.add_get(f"{PREFIX}/login", _login_get)
    app.router.add_post(f"{PREFIX}/login", login)
    app.router.add_post(f"{PREFIX}/logout", logout)
    app.router.add_post(f"{PREFIX}/approvals/{{approval_id}}", decide)
    app.router.add_get(f"{PREFIX}/tasks", tasks_page)
    app.router.add_get(f"{PREFIX}/tasks/{{task_id}}", task_page)
    app.router.add_post(f"{PREFIX}/tasks/{{task_id}}/revoke", revoke_task)
    app.router.add_get(f"{PREFIX}/static/console.css", stylesheet)


__all__ = ["COOKIE", "SECURITY_HEADERS", "SESSIONS", "Session", "SessionStore", "add_console_routes",
           "check_same_origin"]
