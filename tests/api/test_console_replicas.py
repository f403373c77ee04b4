"""Console sessions across replicas: two apps on one PostgreSQL store, no session affinity.

A session begun on replica A holds on replica B (its cookie and its synchronizer token), signing out on B
ends it on A, a sign-in form served by A is accepted by B (its double-submit key is derived from the
store key file both share), the store holds the session id's hash only, and the caps hold across both.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest_asyncio
from aiohttp.test_utils import TestClient

from broker.app import make_app
from broker.config import load_settings
from broker.console import COOKIE, LOGIN_COOKIE, SESSIONS
from tests.api.test_approvals import requested
from tests.api.test_console_escaping import mint
from tests.conftest import BrokerSite

Client = TestClient  # type: ignore[type-arg]
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
LEAD = ("console-lead", ("secops-leads",))
OPERATOR = ("console-operator", ("secops",))


@pytest_asyncio.fixture
async def replicas(site: BrokerSite, aiohttp_client: Callable[..., Any]) -> AsyncIterator[tuple[Client, Client, str]]:
    """Replicas A and B on a fresh PostgreSQL database (dropped afterwards). Yields (A, B, the database's DSN)."""
    pg = site.engines.pg
    name = "broker_console_" + secrets.token_hex(4)
    async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"')
    try:
        settings = load_settings({"BROKER_STORE_URL": pg.dsn(name)}, site.root / "broker.toml")
        a = await aiohttp_client(make_app(settings))
        b = await aiohttp_client(make_app(settings))
        yield a, b, pg.dsn(name)
        await a.close()
        await b.close()
    finally:
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _headers(client: Client, cookies: dict[str, str]) -> dict[str, str]:
    """Same-origin evidence for ``client`` and the given cookies, sent by hand (no jar carries them across)."""
    return {"Origin": str(client.make_url("/").origin()),
            "Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())}


async def _login_form(client: Client) -> tuple[str, str]:
    """GET the sign-in form. Returns (its CSRF token, the pre-login cookie's nonce)."""
    client.session.cookie_jar.clear()
    resp = await client.get("/console/login")
    found = _CSRF.search(await resp.text())
    assert resp.status == 200 and found is not None
    return found.group(1), resp.cookies[LOGIN_COOKIE].value


async def _sign_in(form_from: Client, post_to: Client, site: BrokerSite, who: tuple[str, tuple[str, ...]],
                   *, status: int = 303) -> str:
    """Sign in with a form served by ``form_from`` and posted to ``post_to``. Returns the session cookie's value."""
    csrf, nonce = await _login_form(form_from)
    post_to.session.cookie_jar.clear()
    resp = await post_to.post("/console/login", data={"csrf": csrf, "token": mint(site, *who)},
                              headers=_headers(post_to, {LOGIN_COOKIE: nonce}), allow_redirects=False)
    assert resp.status == status, await resp.text()
    post_to.session.cookie_jar.clear()
    return resp.cookies[COOKIE].value if status == 303 else ""


async def _page(client: Client, session_id: str, path: str = "/console") -> tuple[int, str]:
    client.session.cookie_jar.clear()
    resp = await client.get(path, headers=_headers(client, {COOKIE: session_id}), allow_redirects=False)
    return resp.status, await resp.text()


async def _rows(dsn: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT key, person, identity, csrf, flash, created_at, expires_at "
                                 "FROM console_sessions ORDER BY created_at")
        return await cur.fetchall()


class TestConsoleAcrossReplicas:
    async def test_a_session_from_a_serves_on_b_and_signing_out_on_b_ends_it_on_a(
            self, replicas: tuple[Client, Client, str], site: BrokerSite) -> None:
        a, b, _ = replicas
        _task, apr = await requested(a, site)
        sid = await _sign_in(a, a, site, LEAD)
        status, page = await _page(b, sid)
        assert status == 200, page
        assert "Signed in as console-lead." in page  # the sign-in's flash, shown by the replica that served the page
        found = _CSRF.search(page)
        assert found is not None
        csrf = found.group(1)
        # The decision posted to B with A's session and its synchronizer token.
        b.session.cookie_jar.clear()
        resp = await b.post(f"/console/approvals/{apr}", data={"csrf": csrf, "decision": "approve", "reason": "ok"},
                            headers=_headers(b, {COOKIE: sid}), allow_redirects=False)
        assert resp.status == 303, await resp.text()
        status, page = await _page(a, sid)  # the decision's flash, set on B, shows once on A
        assert status == 200 and "You approved prod-write" in page and "now approved" in page
        assert "You approved" not in (await _page(b, sid))[1]
        # A wrong token is refused on either replica.
        resp = await b.post(f"/console/approvals/{apr}", data={"csrf": csrf[:-2] + "xx", "decision": "deny",
                                                                "reason": "no"}, headers=_headers(b, {COOKIE: sid}))
        assert resp.status == 403
        # Sign out on B: A no longer knows the session.
        resp = await b.post("/console/logout", data={"csrf": csrf}, headers=_headers(b, {COOKIE: sid}),
                            allow_redirects=False)
        assert resp.status == 303
        assert (await _page(a, sid))[0] == 303  # back to the sign-in form
        assert (await _page(b, sid))[0] == 303

    async def test_a_revoke_form_posted_to_the_other_replica(self, replicas: tuple[Client, Client, str],
                                                             site: BrokerSite) -> None:
        a, b, _ = replicas
        sid = await _sign_in(b, b, site, OPERATOR)
        status, page = await _page(a, sid, "/console/tasks")
        found = _CSRF.search(page)
        assert status == 200 and found is not None
        resp = await a.post("/console/revoke", data={"csrf": found.group(1), "kind": "agent",
                                                     "value": "spiffe://example.org/nobody", "reason": "check"},
                            headers=_headers(a, {COOKIE: sid}))
        assert resp.status == 200, await resp.text()
        assert "Revoke this agent?" in await resp.text()  # the confirmation page, from A for B's session

    async def test_a_sign_in_form_served_by_a_is_accepted_by_b(self, replicas: tuple[Client, Client, str],
                                                                site: BrokerSite) -> None:
        a, b, _ = replicas
        sid = await _sign_in(a, b, site, LEAD)
        assert (await _page(a, sid))[0] == 200
        # The key is shared, not absent: a token signed for another nonce is refused by both.
        csrf, _nonce = await _login_form(a)
        other_csrf, other_nonce = await _login_form(b)
        assert csrf != other_csrf
        for client in (a, b):
            client.session.cookie_jar.clear()
            resp = await client.post("/console/login", data={"csrf": csrf, "token": mint(site, *LEAD)},
                                     headers=_headers(client, {LOGIN_COOKIE: other_nonce}), allow_redirects=False)
            assert resp.status == 403, await resp.text()

    async def test_the_store_holds_hashes_and_the_caps_hold_across_replicas(
            self, replicas: tuple[Client, Client, str], site: BrokerSite) -> None:
        a, b, dsn = replicas
        per_person = a.app[SESSIONS].per_person
        sids = [await _sign_in(a, (a, b)[i % 2], site, LEAD) for i in range(per_person + 1)]
        rows = await _rows(dsn)
        assert len(rows) == per_person  # signing in past the cap ended the person's own oldest session
        keys = {r[0] for r in rows}
        assert keys == {hashlib.sha256(s.encode()).hexdigest() for s in sids[1:]}
        for sid in sids:
            assert all(sid not in str(col) for r in rows for col in r), "a session id is stored in clear"
        assert (await _page(b, sids[0]))[0] == 303
        for sid in sids[1:]:
            assert (await _page(a, sid))[0] == 200
        # The global cap: with it reached, a new sign-in is refused on either replica, and nobody is evicted.
        for client in (a, b):
            client.app[SESSIONS].limit = per_person
        await _sign_in(a, b, site, OPERATOR, status=429)
        await _sign_in(b, a, site, OPERATOR, status=429)
        assert {r[0] for r in await _rows(dsn)} == keys
