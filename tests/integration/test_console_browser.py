"""The web console in a real browser: Debian's chromium, driven by Playwright's async API, against a broker on loopback.

The broker runs on a real port in the test's own event loop (aiohttp ``AppRunner``/``TCPSite``), so the
browser, the waiting agent and the broker share one loop and every wait is bounded. Chromium is the
distribution's ``/usr/bin/chromium``; Playwright never downloads a browser here, and a missing chromium
fails the test rather than skipping it.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from playwright.async_api import BrowserContext, Page, async_playwright

from broker.api import STORE
from broker.app import make_app
from broker.console import COOKIE, SECURITY_HEADERS
from tests.api.test_revocation import can_login
from tests.conftest import AGENT, OTHER_AGENT, TD, USER, USER_ID, BrokerSite, bearer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# docs/console.png is rewritten only on request (BROKER_UPDATE_DOCS=1): a test run leaves the tree as it was.
DOCS = Path(__file__).resolve().parents[2] / "docs"
DOCS_SCREENSHOT = DOCS / "console.png"
LEAD = ("lena@example.com", ("secops-leads",))
OPERATOR = ("olga@example.com", ("secops",))
GRANT, GRANT_PATH, GRANT_TTL = "prod-write", "database/creds/tickets-rw", 240
TASK_REASON = "ticket 42: fix the duplicated refunds"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Live:
    """A broker serving on a loopback port, and what the tests need to talk to it."""

    url: str
    app: web.Application
    site: BrokerSite

    def token(self, who: tuple[str, tuple[str, ...]] = LEAD, *, auth_age: float = 5) -> str:
        return self.site.ids.user(who[0], who[1], auth_time=time.time() - auth_age)


@pytest_asyncio.fixture
async def live(site: BrokerSite) -> AsyncIterator[Live]:
    runner = web.AppRunner(make_app(site.settings), access_log=None)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    try:
        host, port = runner.addresses[0][:2]
        yield Live(url=f"http://{host}:{port}", app=runner.app, site=site)
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def browser(tmp_path: Path) -> AsyncIterator[BrowserContext]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (scripts/test.sh does)")
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900}, timeout=30_000)
        context.set_default_timeout(15_000)
        try:
            yield context
        finally:
            await context.close()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def pending_request(live: Live, http: aiohttp.ClientSession) -> tuple[str, str]:
    """alice starts a task; the agent asks for the high-risk grant and gets 202. Returns (task id, approval id)."""
    resp = await http.post(f"{live.url}/v1/tasks", headers=bearer(live.site.ids.user()),
                           json={"agent": AGENT, "role": "support-triage", "ttl": "10m", "reason": TASK_REASON})
    assert resp.status == 201, await resp.text()
    task = (await resp.json())["id"]
    resp = await http.post(f"{live.url}/v1/tasks/{task}/credentials", headers=bearer(live.site.ids.agent()),
                           json={"grant": GRANT, "ttl": GRANT_TTL})
    assert resp.status == 202, await resp.text()
    body = await resp.json()
    assert body["state"] == "pending"
    return task, body["approval_id"]


async def sign_in_browser(page: Page, live: Live, token: str) -> None:
    await page.goto(f"{live.url}/console")
    assert page.url.endswith("/console/login")  # no session: sent to sign in
    await page.fill("textarea[name=token]", token)
    await page.click("button[type=submit]")
    await page.wait_for_load_state()


async def sign_in_http(http: aiohttp.ClientSession, live: Live, token: str) -> str:
    """Sign in as a form post would; returns the approvals page's CSRF token."""
    page = await (await http.get(f"{live.url}/console/login")).text()
    csrf = _CSRF.search(page)
    assert csrf is not None
    resp = await http.post(f"{live.url}/console/login", data={"csrf": csrf.group(1), "token": token},
                           headers={"Origin": live.url}, allow_redirects=False)
    assert resp.status == 303, await resp.text()
    queue = await (await http.get(f"{live.url}/console")).text()
    found = _CSRF.search(queue)
    assert found is not None
    return found.group(1)


async def approval_state(live: Live, approval_id: str) -> str:
    row = await live.app[STORE].get_approval(approval_id)
    assert row is not None
    return row.state


class TestApproverInBrowser:
    async def test_sign_in_see_details_approve_and_the_waiting_agent_gets_its_credential(
            self, live: Live, browser: BrowserContext, http: aiohttp.ClientSession, tmp_path: Path) -> None:
        """An approver signs in, sees the request in full, approves; the long-polling agent then holds a working login."""
        task, apr = await pending_request(live, http)

        async def agent_waits() -> dict[str, Any]:
            resp = await http.get(f"{live.url}/v1/approvals/{apr}?wait=30", headers=bearer(live.site.ids.agent()))
            assert resp.status == 200, await resp.text()
            return await resp.json()  # type: ignore[no-any-return]

        waiter = asyncio.create_task(agent_waits())
        page = await browser.new_page()
        await sign_in_browser(page, live, live.token())
        assert await page.title() == "Approvals waiting - agent secrets broker"
        card = page.locator(f"section.approval#{apr}")
        text = await card.inner_text()
        for detail in (USER, AGENT, GRANT, GRANT_PATH, "4 min (240 s)", TASK_REASON, task, "0 of 1 needed"):
            assert detail in text, detail
        shot = DOCS_SCREENSHOT if os.environ.get("BROKER_UPDATE_DOCS") == "1" else tmp_path / "console.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000  # a rendered page, not an empty image
        assert not waiter.done()  # the agent is still waiting

        await card.locator("input[name=reason]").fill("change CHG-1234, reviewed")
        await card.locator("button[value=approve]").click()
        await page.wait_for_load_state()
        assert "You approved prod-write" in await page.inner_text("p.flash")
        assert await page.locator(f"section.approval#{apr}").count() == 0

        polled = await asyncio.wait_for(waiter, timeout=30)
        assert polled["state"] == "approved"
        resp = await http.post(f"{live.url}/v1/tasks/{task}/credentials", headers=bearer(live.site.ids.agent()),
                               json={"grant": GRANT, "ttl": GRANT_TTL, "approval_id": apr})
        assert resp.status == 200, await resp.text()
        assert await can_login(live.site, (await resp.json())["data"])
        events = [r.record for r in await live.app[STORE].query_audit(task=task, limit=100)]
        approved = next(r for r in events if r.event == "approval.approved")
        assert LEAD[0] in (approved.reason or "") and "change CHG-1234" in (approved.reason or "")

    async def test_the_tasks_own_user_gets_no_buttons(self, live: Live, browser: BrowserContext,
                                                      http: aiohttp.ClientSession) -> None:
        """A person who is both the task's user and an approver sees the request but cannot decide it."""
        _, apr = await pending_request(live, http)
        page = await browser.new_page()
        await sign_in_browser(page, live, live.token((USER, ("support", "secops-leads"))))
        card = page.locator(f"section.approval#{apr}")
        assert await card.count() == 1
        assert await card.locator("button").count() == 0


class TestStepUp:
    async def test_stale_sign_in_is_sent_to_re_authenticate_and_nothing_is_recorded(
            self, live: Live, browser: BrowserContext, http: aiohttp.ClientSession) -> None:
        """Approving with a 10-minute-old sign-in shows the re-authenticate page; after a fresh sign-in it works."""
        _, apr = await pending_request(live, http)
        page = await browser.new_page()
        await sign_in_browser(page, live, live.token(auth_age=600))
        card = page.locator(f"section.approval#{apr}")
        await card.locator("input[name=reason]").fill("looks fine")
        await card.locator("button[value=approve]").click()
        await page.wait_for_load_state()
        assert await page.title() == "Re-authenticate - agent secrets broker"
        assert "sign in again" in await page.inner_text("main")
        assert await approval_state(live, apr) == "pending"

        await page.fill("textarea[name=token]", live.token())
        await page.click("button[type=submit]")
        await page.wait_for_load_state()
        card = page.locator(f"section.approval#{apr}")
        await card.locator("input[name=reason]").fill("looks fine")
        await card.locator("button[value=approve]").click()
        await page.wait_for_load_state()
        assert await approval_state(live, apr) == "approved"


class TestCsrf:
    async def test_posts_without_or_with_a_wrong_token_or_from_elsewhere_are_refused(
            self, live: Live, http: aiohttp.ClientSession) -> None:
        """No CSRF token, a wrong one, a foreign Origin or no origin evidence at all: 403, and the approval stays pending."""
        _, apr = await pending_request(live, http)
        csrf = await sign_in_http(http, live, live.token())
        url = f"{live.url}/console/approvals/{apr}"
        form = {"decision": "approve", "reason": "csrf"}
        for data, headers in (
                (form, {"Origin": live.url}),
                ({**form, "csrf": "x" * len(csrf)}, {"Origin": live.url}),
                ({**form, "csrf": csrf}, {"Origin": "http://evil.example"}),
                ({**form, "csrf": csrf}, {"Origin": live.url, "Sec-Fetch-Site": "cross-site"}),
                ({**form, "csrf": csrf}, {})):
            resp = await http.post(url, data=data, headers=headers, allow_redirects=False)
            assert resp.status == 403, (data.keys(), headers)
            assert "text/html" in resp.headers["Content-Type"]
        assert await approval_state(live, apr) == "pending"
        resp = await http.post(url, data={**form, "csrf": csrf}, headers={"Origin": live.url}, allow_redirects=False)
        assert resp.status == 303
        assert await approval_state(live, apr) == "approved"

    async def test_sign_in_form_needs_its_own_token(self, live: Live, http: aiohttp.ClientSession) -> None:
        """A login post without the login form's cookie and token is refused and starts no session."""
        resp = await http.post(f"{live.url}/console/login", data={"token": live.token()},
                               headers={"Origin": live.url}, allow_redirects=False)
        assert resp.status == 403
        assert COOKIE not in resp.cookies


class TestSessionsAndHeaders:
    async def test_every_console_response_carries_the_security_headers(self, live: Live,
                                                                       http: aiohttp.ClientSession) -> None:
        """Pages, redirects, errors, 404s and the stylesheet all carry CSP, nosniff, no-referrer, no-store, DENY."""
        token = live.token()
        await sign_in_http(http, live, token)
        async with aiohttp.ClientSession() as anonymous:
            anon = await anonymous.get(f"{live.url}/console", allow_redirects=False)
            assert anon.status == 303 and anon.headers["Location"] == "/console/login"
            checked = [anon]
        for path in ("/console", "/console/login", "/console/tasks", "/console/tasks/tsk_nope", "/console/nothing",
                     "/console/static/console.css"):
            checked.append(await http.get(live.url + path, allow_redirects=False))
        for resp in checked:
            for name, value in SECURITY_HEADERS.items():
                assert resp.headers.get(name) == value, (resp.url, name)
            assert token not in await resp.text()
        assert [r.status for r in checked[1:]] == [200, 200, 403, 403, 404, 200]
        assert "Traceback" not in await checked[-2].text()

    async def test_the_session_cookie_is_server_side_and_strict(self, live: Live,
                                                                 http: aiohttp.ClientSession) -> None:
        """The cookie is a random id (HttpOnly, SameSite=Strict, Path=/console), not the token; sign-out ends it."""
        page = await (await http.get(f"{live.url}/console/login")).text()
        csrf = _CSRF.search(page)
        assert csrf is not None
        token = live.token()
        resp = await http.post(f"{live.url}/console/login", data={"csrf": csrf.group(1), "token": token},
                               headers={"Origin": live.url}, allow_redirects=False)
        morsel = resp.cookies[COOKIE]
        assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/console"
        assert not morsel["secure"]  # plain http on loopback; Secure over https
        assert token not in morsel.value and len(morsel.value) >= 43
        assert "token=" not in resp.headers.get("Location", "")
        queue = await (await http.get(f"{live.url}/console")).text()
        session_csrf = _CSRF.search(queue)
        assert session_csrf is not None
        out = await http.post(f"{live.url}/console/logout", data={"csrf": session_csrf.group(1)},
                              headers={"Origin": live.url}, allow_redirects=False)
        assert out.status == 303
        http.cookie_jar.update_cookies({COOKIE: morsel.value})  # replaying the old cookie after sign-out
        again = await http.get(f"{live.url}/console", allow_redirects=False)
        assert again.status == 303 and again.headers["Location"] == "/console/login"

    async def test_people_without_a_console_role_cannot_sign_in(self, live: Live,
                                                                 http: aiohttp.ClientSession) -> None:
        """A valid token of a plain user (no approver, operator or auditor role) starts no session."""
        page = await (await http.get(f"{live.url}/console/login")).text()
        csrf = _CSRF.search(page)
        assert csrf is not None
        resp = await http.post(f"{live.url}/console/login", data={"csrf": csrf.group(1),
                                                                  "token": live.site.ids.user()},
                               headers={"Origin": live.url}, allow_redirects=False)
        assert resp.status == 403 and COOKIE not in resp.cookies


class TestOperatorPages:
    async def test_operator_sees_live_tasks_revokes_one_and_reads_its_timeline(
            self, live: Live, http: aiohttp.ClientSession) -> None:
        """The tasks page lists the live task; Revoke ends it (Vault-confirmed); its timeline shows every record."""
        task, apr = await pending_request(live, http)
        csrf = await sign_in_http(http, live, live.token(OPERATOR))
        tasks = await (await http.get(f"{live.url}/console/tasks")).text()
        assert task in tasks and TASK_REASON in tasks
        resp = await http.post(f"{live.url}/console/tasks/{task}/revoke", data={"csrf": csrf, "reason": "incident 9"},
                               headers={"Origin": live.url})
        assert resp.status == 200 and f"Task {task} revoked" in await resp.text()
        row = await live.app[STORE].get_task(task)
        assert row is not None and row.state == "revoked"
        timeline = await (await http.get(f"{live.url}/console/tasks/{task}")).text()
        for event in ("task.started", "approval.requested", "task.revoked"):
            assert event in timeline
        assert apr in timeline


def screenshot_path(name: str, tmp_path: Path) -> Path:
    """docs/<name> when BROKER_UPDATE_DOCS=1, else a throwaway file."""
    return DOCS / name if os.environ.get("BROKER_UPDATE_DOCS") == "1" else tmp_path / name


async def csp_violations(page: Page) -> list[str]:
    """Collect console messages about the Content Security Policy from here on (a list the page fills)."""
    found: list[str] = []
    page.on("console", lambda m: found.append(m.text) if "Content Security Policy" in m.text else None)
    return found


# When the screenshots are rewritten, the session takes a few seconds so that its pictures show its steps
# apart; a plain test run does not wait.
_PAUSE = 1.5 if os.environ.get("BROKER_UPDATE_DOCS") == "1" else 0.0


async def picture_session(live: Live, http: aiohttp.ClientSession) -> tuple[str, str]:
    """alice's morning: a task whose credential is renewed and whose high-risk request is approved and used,
    and a second task for another agent. Returns (the first task, the second)."""
    task, apr = await pending_request(live, http)
    await asyncio.sleep(_PAUSE)
    resp = await http.post(f"{live.url}/v1/tasks/{task}/credentials", headers=bearer(live.site.ids.agent()),
                           json={"grant": "tickets-db-ro", "ttl": 300})
    assert resp.status == 200, await resp.text()
    lease = (await resp.json())["lease_id"]
    await asyncio.sleep(_PAUSE)
    resp = await http.post(f"{live.url}/v1/leases/{lease}/renew", headers=bearer(live.site.ids.agent()), json={})
    assert resp.status == 200, await resp.text()
    await asyncio.sleep(_PAUSE)
    resp = await http.post(f"{live.url}/v1/approvals/{apr}", headers=bearer(live.token()),
                           json={"decision": "approve", "reason": "CHG-1234"})
    assert resp.status == 200, await resp.text()
    await asyncio.sleep(_PAUSE)
    resp = await http.post(f"{live.url}/v1/tasks/{task}/credentials", headers=bearer(live.site.ids.agent()),
                           json={"grant": GRANT, "ttl": GRANT_TTL, "approval_id": apr})
    assert resp.status == 200, await resp.text()
    await asyncio.sleep(_PAUSE)
    resp = await http.post(f"{live.url}/v1/tasks", headers=bearer(live.site.ids.user()),
                           json={"agent": OTHER_AGENT, "role": "support-triage", "ttl": "15m", "reason": "ticket 43"})
    assert resp.status == 201, await resp.text()
    other = (await resp.json())["id"]
    for _ in range(3):
        resp = await http.post(f"{live.url}/v1/tasks/{other}/credentials", json={"grant": "agent-cert"},
                               headers=bearer(live.site.ids.agent(OTHER_AGENT)))
        assert resp.status == 200, await resp.text()
    # Another tenant's task, by another person: on the lease chart, not in alice's history.
    billing = f"spiffe://{TD}/agent/billing-1"
    resp = await http.post(f"{live.url}/v1/tasks", headers=bearer(live.site.ids.user("dave@example.com", ("billing",))),
                           json={"agent": billing, "role": "billing-report", "ttl": "10m", "reason": "month end"})
    assert resp.status == 201, await resp.text()
    resp = await http.post(f"{live.url}/v1/tasks/{(await resp.json())['id']}/credentials",
                           json={"grant": "tickets-db-rw"}, headers=bearer(live.site.ids.agent(billing)))
    assert resp.status == 200, await resp.text()
    return task, other


class TestPictures:
    async def test_timelines_lease_chart_and_revoking_a_user_with_confirmation(
            self, live: Live, browser: BrowserContext, http: aiohttp.ClientSession, tmp_path: Path) -> None:
        """An operator reads a task's timeline (its span, each lease, the approval, the renewal), alice's
        history over a window, the live leases by tenant and grant; then revokes alice from her history,
        through a confirmation page, and her tasks end in Vault. Every picture is inline SVG under the
        console's CSP: no script, no style attribute, no CSP violation."""
        began = time.time()
        task, other = await picture_session(live, http)
        await asyncio.sleep(_PAUSE)
        page = await browser.new_page()
        violations = await csp_violations(page)
        await sign_in_browser(page, live, live.token(OPERATOR))

        await page.goto(f"{live.url}/console/tasks/{task}")
        svg = page.locator("figure.chart svg")
        assert await svg.count() == 1
        assert await svg.locator("rect.task").count() == 1 and await svg.locator("rect.lease").count() == 2
        for cls in ("asked", "approved", "renewed"):
            assert await svg.locator(f"polygon.mark.{cls}").count() == 1, cls
        assert "CHG-1234" in (await svg.locator("polygon.mark.approved title").text_content() or "")
        box = await svg.bounding_box()
        assert box is not None and box["width"] > 600 and box["height"] > 80
        await page.screenshot(path=str(screenshot_path("console-task-timeline.png", tmp_path)))

        await page.goto(f"{live.url}/console/tasks")
        chart = page.locator("figure.chart svg")
        labels = await chart.locator("text.lane").all_text_contents()
        assert labels == ["acme / agent-cert", "acme / prod-write", "acme / tickets-db-ro", "globex / tickets-db-rw"]
        assert await chart.locator("text.count").all_text_contents() == ["3", "1", "1", "1"]
        widths = [float(await r.get_attribute("width") or 0) for r in await chart.locator("rect.lease").all()]
        assert widths[0] == max(widths) and widths[1] == widths[2] == widths[3] < widths[0] / 2
        await page.screenshot(path=str(screenshot_path("console-leases.png", tmp_path)), full_page=True)

        await page.goto(f"{live.url}/console/history")
        await page.select_option("select[name=kind]", "user")
        await page.fill("input[name=value]", USER_ID)
        await page.fill("input[name=from]", time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(began - 2)))
        await page.click("form.window button[type=submit]")
        await page.wait_for_load_state()
        history = page.locator("figure.chart svg")
        assert await history.locator("rect.task").count() == 2
        links = await history.locator("a").evaluate_all("els => els.map(e => e.getAttribute('href'))")
        assert links == [f"/console/tasks/{task}", f"/console/tasks/{other}"]
        await page.screenshot(path=str(screenshot_path("console-history.png", tmp_path)), full_page=True)
        # A window that ends before anything happened shows nothing.
        await page.fill("input[name=until]", "2020-01-01T00:00")
        await page.fill("input[name=from]", "2019-12-31T00:00")
        await page.click("form.window button[type=submit]")
        await page.wait_for_load_state()
        assert await page.locator("figure.chart svg rect.task").count() == 0
        await page.go_back()
        await page.wait_for_load_state()

        await page.fill("form.revoke input[name=reason]", "laptop stolen, incident 12")
        await page.click("form.revoke button[type=submit]")
        await page.wait_for_load_state()
        assert await page.title() == "Revoke this user? - agent secrets broker"
        text = await page.inner_text("section.confirm")
        assert "2 task(s)" in text and "5 lease(s)" in text and "laptop stolen" in text
        assert (await live.app[STORE].get_task(task)).state == "active"  # type: ignore[union-attr]
        await page.screenshot(path=str(screenshot_path("console-revoke-confirm.png", tmp_path)), full_page=True)
        await page.click("button[name=confirm]")
        await page.wait_for_load_state()
        assert f"Revoked user {USER_ID}" in await page.inner_text("p.flash")
        for t in (task, other):
            row = await live.app[STORE].get_task(t)
            assert row is not None and row.state == "revoked", t
        assert await page.locator("figure.chart svg polygon.mark.revoked").count() == 2

        html = await page.content()
        assert "<script" not in html and " style=" not in html
        assert violations == []

    async def test_revoking_needs_an_operator_a_token_and_the_confirmation(
            self, live: Live, http: aiohttp.ClientSession) -> None:
        """An auditor sees the history but gets no revoke form and a 403 on posting one; an operator's first post
        only asks to confirm (nothing is revoked), a post without the session token is refused."""
        task, _ = await picture_session(live, http)
        auditor = ("audrey@example.com", ("audit",))
        csrf = await sign_in_http(http, live, live.token(auditor))
        page = await (await http.get(f"{live.url}/console/history", params={"kind": "user", "value": USER_ID})).text()
        assert "<svg" in page and 'action="/console/revoke"' not in page
        tasks = await (await http.get(f"{live.url}/console/tasks")).text()
        tasks_csrf = _CSRF.search(tasks)
        assert tasks_csrf is not None
        form = {"kind": "user", "value": USER_ID, "reason": "x", "csrf": tasks_csrf.group(1), "confirm": "yes"}
        resp = await http.post(f"{live.url}/console/revoke", data=form, headers={"Origin": live.url})
        assert resp.status == 403
        http.cookie_jar.clear()
        csrf = await sign_in_http(http, live, live.token(OPERATOR))
        tasks = await (await http.get(f"{live.url}/console/tasks")).text()
        found = _CSRF.search(tasks)
        assert found is not None
        csrf = found.group(1)
        resp = await http.post(f"{live.url}/console/revoke", data={**form, "csrf": csrf, "confirm": ""},
                               headers={"Origin": live.url})
        assert resp.status == 200 and "Confirm: revoke and lock" in await resp.text()
        assert (await live.app[STORE].get_task(task)).state == "active"  # type: ignore[union-attr]
        resp = await http.post(f"{live.url}/console/revoke", data={**form, "csrf": "x" * len(csrf)},
                               headers={"Origin": live.url})
        assert resp.status == 403
        assert (await live.app[STORE].get_task(task)).state == "active"  # type: ignore[union-attr]
        resp = await http.post(f"{live.url}/console/revoke", data={**form, "csrf": csrf}, headers={"Origin": live.url})
        assert resp.status == 200 and "Revoked user" in await resp.text()
        assert (await live.app[STORE].get_task(task)).state == "revoked"  # type: ignore[union-attr]
