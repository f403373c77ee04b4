"""The console escapes what agents and people typed, on every page that shows it (issue 9).

Task reasons, people's names (an IdP's ``sub`` is any string), approval and revocation reasons and the
audit records built from them reach the console's pages. Here each of them is hostile: markup that would
run script, break out of an attribute or a ``<textarea>``, or be evaluated if a template ever rendered
data as a template. The stack is the real one (OpenBao, the broker app, its templates); each page is
parsed as a browser would and must hold no element or attribute the data smuggled in, and must show the
hostile text intact, as text.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from html.parser import HTMLParser
from importlib import resources
from typing import Any

import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient

from broker.app import make_app
from broker.errors import BadRequest
from tests.conftest import AGENT, AUDIENCE, IDP, BrokerSite, bearer

Client = TestClient[Any, Any]

# One string that tries every context at once: an element, an attribute break-out with a handler, a
# template expression (a server-side template injection would print 49) and a <textarea> break-out.
HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(1)>{{7*7}}</textarea>'
OWNER = HOSTILE  # the task's user: their name is their sub (no email claim)
VOTER = "voter" + HOSTILE
LEAD = "lead" + HOSTILE
OPERATOR = "operator" + HOSTILE
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class _Page(HTMLParser):
    """What a browser would build from a page: its elements, their attributes, its text."""

    def __init__(self, body: str) -> None:
        super().__init__(convert_charrefs=True)
        self.starts: list[str] = []
        self.ends: list[str] = []
        self.attributes: list[str] = []
        self.chunks: list[str] = []
        self.feed(body)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.starts.append(tag)
        self.attributes += [name for name, _ in attrs]
        self.chunks.append("\x00")  # text on either side of an element is not one string

    def handle_endtag(self, tag: str) -> None:
        self.ends.append(tag)
        self.chunks.append("\x00")

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def assert_shown_as_text(body: str, value: str = HOSTILE, *, times: int = 1) -> None:
    """``value`` appears ``times`` or more as one piece of text, and added no element or attribute."""
    page = _Page(body)
    assert "script" not in page.starts and "img" not in page.starts, page.starts
    assert not [a for a in page.attributes if a.startswith("on")], page.attributes
    assert page.ends.count("textarea") == page.starts.count("textarea")
    assert page.text.count(value) >= times, (value, page.text)


def mint(site: BrokerSite, sub: str, groups: tuple[str, ...]) -> str:
    """An ID token whose person is ``sub`` and whose display name is ``sub`` too (no email claim)."""
    return site.ids.idp.mint_id_token(issuer=IDP, subject=sub, audience=AUDIENCE, email=None, groups=groups,
                                      auth_time=time.time() - 5)


async def boom(request: web.Request) -> web.Response:
    """A console route whose error carries hostile text in its public message."""
    raise BadRequest(f"no such thing: {HOSTILE}")


@pytest_asyncio.fixture
async def console(site: BrokerSite, aiohttp_client: Callable[..., Any]) -> Client:
    """The broker app, plus one console route that fails with a hostile message (no console error echoes
    input today; the error page must escape it if one ever does)."""
    app = make_app(site.settings)
    app.router.add_get("/console/test-error", boom)
    return await aiohttp_client(app)  # type: ignore[no-any-return]


def origin(client: Client) -> dict[str, str]:
    return {"Origin": str(client.make_url("/").origin())}


async def sign_in(client: Client, tok: str) -> tuple[str, str]:
    """A fresh sign-in (the cookie jar cleared first). Returns (the page it lands on, the session's CSRF token)."""
    client.session.cookie_jar.clear()
    login = await (await client.get("/console/login")).text()
    found = _CSRF.search(login)
    assert found is not None
    resp = await client.post("/console/login", data={"csrf": found.group(1), "token": tok}, headers=origin(client))
    assert resp.status == 200, await resp.text()
    page = await resp.text()
    csrf = _CSRF.search(page)
    assert csrf is not None
    return page, csrf.group(1)


async def hostile_requests(site: BrokerSite, client: Client) -> tuple[str, str, str]:
    """The hostile owner starts a task with a hostile reason; the agent asks for two high-risk grants and a
    hostile voter casts the first of prod-cert's two votes with a hostile reason. Returns (task, prod-write
    approval, prod-cert approval)."""
    resp = await client.post("/v1/tasks", headers=bearer(mint(site, OWNER, ("support",))),
                             json={"agent": AGENT, "role": "support-triage", "ttl": "10m", "reason": HOSTILE})
    assert resp.status == 201, await resp.text()
    task = (await resp.json())["id"]
    approvals = []
    for grant in ("prod-write", "prod-cert"):
        resp = await client.post(f"/v1/tasks/{task}/credentials", headers=bearer(site.ids.agent()),
                                 json={"grant": grant, "ttl": 120})
        assert resp.status == 202, await resp.text()
        approvals.append((await resp.json())["approval_id"])
    resp = await client.post(f"/v1/approvals/{approvals[1]}", headers=bearer(mint(site, VOTER, ("secops-leads",))),
                             json={"decision": "approve", "reason": HOSTILE})
    assert resp.status == 200, await resp.text()
    return task, approvals[0], approvals[1]


class TestHostileTextIsEscaped:
    async def test_approvals_queue_and_its_flash_messages(self, site: BrokerSite, console: Client) -> None:
        """The queue (names, person ids, task reason, votes), the sign-in flash and the decision's flash escape it all."""
        _, write, _ = await hostile_requests(site, console)
        page, csrf = await sign_in(console, mint(site, LEAD, ("secops-leads",)))
        assert_shown_as_text(page, f"Signed in as {LEAD}.")  # the flash
        assert_shown_as_text(page, f"You are {LEAD}")
        assert_shown_as_text(page, f"{IDP}#{OWNER}", times=2)  # "Delegated by" of both requests
        assert_shown_as_text(page, f"{IDP}#{VOTER}")  # the vote
        # The viewer's name thrice (flash, header, "You are"); for each request the owner in its heading, the
        # owner's name and id under "Delegated by" and the task's reason; the voter's name, id and reason.
        assert_shown_as_text(page, times=3 + 2 * 4 + 3)
        resp = await console.post(f"/console/approvals/{write}", data={"csrf": csrf, "decision": "approve",
                                                                       "reason": "reviewed"}, headers=origin(console))
        assert resp.status == 200
        assert_shown_as_text(await resp.text(), f"You approved prod-write for {OWNER} ({write}): now approved.")

    async def test_tasks_page_task_page_and_timeline(self, site: BrokerSite, console: Client) -> None:
        """The tasks list, the task's facts and its timeline (records of hostile people and reasons) escape it all."""
        task, _, _ = await hostile_requests(site, console)
        _, csrf = await sign_in(console, mint(site, OPERATOR, ("secops",)))
        tasks = await (await console.get("/console/tasks")).text()
        assert_shown_as_text(tasks, OPERATOR)  # the header's name
        assert_shown_as_text(tasks, f"{IDP}#{OWNER}")
        assert_shown_as_text(tasks, times=1 + 3)  # the header; the owner's name and person id, the task's reason
        resp = await console.post(f"/console/tasks/{task}/revoke", data={"csrf": csrf, "reason": HOSTILE},
                                  headers=origin(console))
        assert resp.status == 200
        assert_shown_as_text(await resp.text(), f"Task {task} revoked")
        page = await (await console.get(f"/console/tasks/{task}")).text()
        assert_shown_as_text(page, f"{IDP}#{OWNER}")
        assert_shown_as_text(page, f"{IDP}#{VOTER}")  # the vote's record
        assert_shown_as_text(page, f"{IDP}#{OPERATOR}")  # the revocation's record
        assert_shown_as_text(page, "task.revoked")
        # The header; the facts (the owner's name and id, the reason); in the timeline at least one record
        # each by the owner, the voter and the operator (name and id).
        assert_shown_as_text(page, times=1 + 3 + 3 * 2)

    async def test_pictures_history_and_the_revoke_confirmation(self, site: BrokerSite, console: Client) -> None:
        """The SVG pictures (whose titles name the hostile owner), the owner's
        history page and the confirmation of revoking them escape it all; so does the flash after."""
        task, _, _ = await hostile_requests(site, console)
        _, csrf = await sign_in(console, mint(site, OPERATOR, ("secops",)))
        page = await (await console.get(f"/console/tasks/{task}")).text()
        svg = page[page.index("<svg"):page.index("</svg>")]
        assert_shown_as_text(svg)  # the task bar's title names its owner
        assert HOSTILE not in svg  # only ever escaped
        who = f"{IDP}#{OWNER}"
        history = await (await console.get("/console/history", params={"kind": "user", "value": who})).text()
        assert "<svg" in history
        assert_shown_as_text(history, who)  # the heading (the form's field holds it as a value)
        assert_shown_as_text(history, times=1 + 1 + 1)  # the header; the heading; the task bar's title
        resp = await console.post("/console/revoke", data={"csrf": csrf, "kind": "user", "value": who,
                                                           "reason": HOSTILE}, headers=origin(console))
        assert resp.status == 200
        confirm = await resp.text()
        assert "Confirm: revoke and lock" in confirm
        assert_shown_as_text(confirm, who)
        assert_shown_as_text(confirm, times=1 + 2 + 1)  # the header; the value and the reason; the task's owner
        resp = await console.post("/console/revoke", data={"csrf": csrf, "kind": "user", "value": who,
                                                           "reason": HOSTILE, "confirm": "yes"},
                                  headers=origin(console))
        assert resp.status == 200
        assert_shown_as_text(await resp.text(), f"Revoked user {who}")

    async def test_error_pages(self, site: BrokerSite, console: Client) -> None:
        """An error whose public message holds hostile text is shown escaped, with its status."""
        resp = await console.get("/console/test-error")
        assert resp.status == 400 and "text/html" in resp.headers["Content-Type"]
        assert_shown_as_text(await resp.text(), f"no such thing: {HOSTILE}")


class TestTemplates:
    def test_every_template_escapes_and_none_opts_out(self, site: BrokerSite) -> None:
        """The console's environment autoescapes every template, and no template turns it off or marks a value safe."""
        from broker.console import TEMPLATES

        app = make_app(site.settings)
        env = app[TEMPLATES]
        templates = resources.files("broker").joinpath("templates/console")
        names = sorted(p.name for p in templates.iterdir() if p.name.endswith(".html"))
        assert {"base.html", "approvals.html", "tasks.html", "task.html", "login.html", "error.html", "history.html",
                "revoke_confirm.html"} <= set(names)
        for name in names:
            assert env.autoescape is True or (callable(env.autoescape) and env.autoescape(name)), name
            source = templates.joinpath(name).read_text()
            assert not re.search(r"\|\s*safe\b|autoescape\s+false|Markup", source), name
