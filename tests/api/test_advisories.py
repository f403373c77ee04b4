"""Regressions for the findings of the outside attack on the broker (issue 8), one test per finding.

Each test is named after its finding and runs against the real stack: OpenBao, the SCRAM PostgreSQL,
the broker app (served by ``broker.server.BrokerRunner`` where the HTTP parser or the access log is
what is tested). People are minted with a subject that is *not* their email, as real IdPs do, so that a
test can tell "the same person" (issuer, subject) from "the same name".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from broker.api import STORE
from broker.app import make_app
from broker.config import Settings, UserIssuer
from tests.api.test_opscli import Live, serve
from tests.api.test_revocation import can_login
from tests.api.test_task_flow import credential
from tests.conftest import AGENT, AUDIENCE, IDP, BrokerSite, bearer

Client = TestClient[Any, Any]
IDP2 = "https://idp2.test.example"
CANARY = "s.CANARYcanaryCANARYcanary42"  # shaped like a Vault token: no body or log line may hold it


def token(site: BrokerSite, sub: str, *, email: str | None = None, verified: bool | None = True,
          groups: tuple[str, ...] = ("support",), auth_age: float = 5, issuer: str = IDP) -> str:
    """An ID token for (issuer, sub) with the email claims given; issuer 2 signs with the second key."""
    signer = site.ids.stranger if issuer == IDP2 else site.ids.idp
    return signer.mint_id_token(issuer=issuer, subject=sub, audience=AUDIENCE, email=email, email_verified=verified,
                                groups=groups, auth_time=time.time() - auth_age)


def h(tok: str) -> dict[str, str]:
    return bearer(tok)


def tuned(site: BrokerSite, **limits: Any) -> Settings:
    return site.settings.model_copy(update={"limits": site.settings.limits.model_copy(update=limits)})


def with_second_issuer(site: BrokerSite, settings: Settings | None = None) -> Settings:
    """The test settings plus a second IdP (signed by the ``stranger`` key): two issuers, two name spaces."""
    jwks = site.root / "idp2.jwks"
    site.ids.stranger.write_jwks(jwks)
    base = settings or site.settings
    users = base.users.model_copy(update={"issuers": (*base.users.issuers, UserIssuer(issuer=IDP2, jwks_file=jwks))})
    return base.model_copy(update={"users": users})


@contextlib.asynccontextmanager
async def app_client(aiohttp_client: Any, settings: Settings) -> AsyncIterator[Client]:
    yield await aiohttp_client(make_app(settings))


async def start(client: Client, tok: str, *, status: int = 201) -> dict[str, Any]:
    resp = await client.post("/v1/tasks", json={"agent": AGENT, "role": "support-triage", "ttl": "10m",
                                                "reason": "ticket 7"}, headers=h(tok))
    assert resp.status == status, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def vote(client: Client, approval_id: str, tok: str, *, status: int) -> dict[str, Any]:
    resp = await client.post(f"/v1/approvals/{approval_id}", json={"decision": "approve", "reason": "change 7"},
                             headers=h(tok))
    assert resp.status == status, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


def assert_problem(body: str, resp: aiohttp.ClientResponse | Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, body
    assert resp.headers["Content-Type"].startswith("application/problem+json"), body
    problem = json.loads(body)
    assert problem["code"] == code and problem["status"] == status
    return problem  # type: ignore[no-any-return]


def _task_body(*, ttl: str = "60", extra: str = "", encoding: str = "utf-8") -> bytes:
    text = f'{{"agent": {json.dumps(AGENT)}, "role": "support-triage", "ttl": {ttl}, "reason": "r"{extra}}}'
    return text.encode(encoding)


# -- 1-3: a person is (issuer, subject), never a name their token can change --------------------------------


class TestPeopleAreIssuerAndSubject:
    async def test_finding_1_self_approval_with_unverified_email(self, client: Client, site: BrokerSite) -> None:
        """Sam cannot approve his own request by unverifying his email, nor after changing it at the IdP."""
        sam = ("support", "secops-leads")
        task = await start(client, token(site, "u-sam", email="sam@example.com", groups=sam))
        pending = await credential(client, site, task["id"], "prod-write", status=202)
        for disguise in (token(site, "u-sam", email="sam@example.com", verified=False, groups=sam),
                         token(site, "u-sam", email="samuel@elsewhere.example", groups=sam),
                         token(site, "u-sam", groups=sam)):
            body = await vote(client, pending["approval_id"], disguise, status=403)
            assert body["code"] == "not_approver"
        approval = await client.app[STORE].get_approval(pending["approval_id"])
        assert approval is not None and approval.state == "pending"
        resp = await client.post(f"/v1/tasks/{task['id']}/credentials",
                                 json={"grant": "prod-write", "approval_id": pending["approval_id"]},
                                 headers=bearer(site.ids.agent()))
        assert resp.status == 409  # nothing to use: no approval was given
        assert await client.app[STORE].list_leases(task_id=task["id"]) == []

    async def test_finding_2_two_person_rule_second_vote(self, client: Client, site: BrokerSite) -> None:
        """Lena's second vote under another name does not count: N-of-M counts people, not names."""
        task = await start(client, token(site, "u-alice", email="alice@example.com"))
        pending = await credential(client, site, task["id"], "prod-cert", status=202)
        lead = ("secops-leads",)
        first = await vote(client, pending["approval_id"], token(site, "u-lena", email="lena@example.com", groups=lead),
                           status=200)
        assert first["state"] == "pending"
        for again in (token(site, "u-lena", email="lena@example.com", verified=False, groups=lead),
                      token(site, "u-lena", email="lena.new@example.com", groups=lead)):
            body = await vote(client, pending["approval_id"], again, status=409)
            assert body["code"] == "conflict"
        approval = await client.app[STORE].get_approval(pending["approval_id"])
        assert approval is not None and approval.state == "pending"
        second = await vote(client, pending["approval_id"], token(site, "u-leo", email="leo@example.com", groups=lead),
                            status=200)
        assert second["state"] == "approved"
        assert [v["approver"] for v in second["votes"]] == [f"{IDP}#u-lena", f"{IDP}#u-leo"]
        assert [v["approver_name"] for v in second["votes"]] == ["lena@example.com", "leo@example.com"]

    @pytest.mark.parametrize("selector", ["zoe@example.test", "ZOE@example.test", f"{IDP}#u-zoe"])
    async def test_finding_3_offboarding_lock_holds_the_person(self, client: Client, site: BrokerSite,
                                                               selector: str) -> None:
        """A lock by email (any case) or by id holds Zoe whatever her next token says; her login stops working."""
        zoe = token(site, "u-zoe", email="zoe@example.test")
        task = await start(client, zoe)
        cred = await credential(client, site, task["id"], "tickets-db-ro")
        resp = await client.post("/v1/revocations", json={"user": selector, "reason": "offboarding", "wait": 30},
                                 headers=h(token(site, "u-olivia", email="olivia@example.com", groups=("secops",))))
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["tasks"] == 1
        assert not await can_login(site, cred["data"])
        for evasion in (token(site, "u-zoe", email="zoe@example.test", verified=False),
                        token(site, "u-zoe", email="zoe.private@example.net"),
                        token(site, "u-zoe")):
            body = await start(client, evasion, status=403)
            assert body["code"] == "locked"

    async def test_lock_by_email_holds_a_person_whose_idp_never_verifies(self, client: Client,
                                                                          site: BrokerSite) -> None:
        """An IdP that leaves out email_verified (Entra ID, ADFS): a lock by the claimed address still holds.

        A claim can only lock its presenter out, so locks match every address a person claimed."""
        zoe = token(site, "u-zoe-entra", email="Zoe.E@example.test", verified=None)
        task = await start(client, zoe)
        resp = await client.post("/v1/revocations", json={"user": " zoe.e@EXAMPLE.test ", "reason": "offboarding"},
                                 headers=h(token(site, "u-olivia", email="olivia@example.com", groups=("secops",))))
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["tasks"] == 1  # her live task was fenced too
        assert (await client.get(f"/v1/tasks/{task['id']}", headers=h(zoe))).status == 200
        for evasion in (zoe, token(site, "u-zoe-entra"), token(site, "u-zoe-entra", email="other@example.net")):
            assert (await start(client, evasion, status=403))["code"] == "locked"

    async def test_a_locked_operator_acts_no_more(self, client: Client, site: BrokerSite) -> None:
        """Offboarding holds staff too: a locked operator can neither lift their own lock nor read as staff."""
        ops = ("secops", "audit")
        oscar = token(site, "u-oscar", email="oscar@example.com", groups=ops)
        olivia = token(site, "u-olivia", email="olivia@example.com", groups=ops)
        assert (await client.get("/v1/tasks", headers=h(oscar))).status == 200
        resp = await client.post("/v1/revocations", json={"user": f"{IDP}#u-oscar", "reason": "offboarding"},
                                 headers=h(olivia))
        lock = (await resp.json())["id"]
        for method, url in (("DELETE", f"/v1/revocations/{lock}"), ("GET", "/v1/tasks"), ("GET", "/v1/audit"),
                            ("GET", "/v1/revocations")):
            r = await client.request(method, url, json={"reason": "let me back in"} if method == "DELETE" else None,
                                     headers=h(token(site, "u-oscar", groups=ops)))
            assert r.status == 403 and (await r.json())["code"] == "locked", (method, url, await r.text())
        assert (await client.get("/v1/tasks", headers=h(olivia))).status == 200

    async def test_self_approval_through_a_second_issuer(self, aiohttp_client: Any, site: BrokerSite) -> None:
        """Alice starts a task without a verified email, then approves it as her account at another issuer:
        refused, because both ids claimed one address (now or before)."""
        both = ("support", "secops-leads")
        async with app_client(aiohttp_client, with_second_issuer(site)) as client:
            await start(client, token(site, "u-alice", email="alice@example.com", groups=both))  # seen verified
            task = await start(client, token(site, "u-alice", email="alice@example.com", verified=False, groups=both))
            pending = await credential(client, site, task["id"], "prod-cert", status=202)
            twin = token(site, "alice-b", email="alice@example.com", groups=both, issuer=IDP2)
            assert (await vote(client, pending["approval_id"], twin, status=403))["code"] == "not_approver"
            # And one person's two accounts are one vote.
            lead = ("secops-leads",)
            await vote(client, pending["approval_id"],
                       token(site, "u-lena", email="lena@example.com", verified=False, groups=lead), status=200)
            lena_b = token(site, "lena-b", email="lena@example.com", groups=lead, issuer=IDP2)
            assert (await vote(client, pending["approval_id"], lena_b, status=409))["code"] == "conflict"

    async def test_missing_email_verified_is_not_trusted(self, aiohttp_client: Any, site: BrokerSite) -> None:
        """An email without email_verified matches no `user:EMAIL` principal; the verified one does."""
        people = site.settings.people.model_copy(update={"approvers": ("user:vera@example.com",)})
        async with app_client(aiohttp_client, site.settings.model_copy(update={"people": people})) as client:
            task = await start(client, token(site, "u-alice", email="alice@example.com"))
            pending = await credential(client, site, task["id"], "prod-write", status=202)
            unverified = token(site, "u-vera", email="vera@example.com", verified=None)
            assert (await vote(client, pending["approval_id"], unverified, status=403))["code"] == "not_approver"
            verified = token(site, "u-vera", email="vera@example.com")
            assert (await vote(client, pending["approval_id"], verified, status=200))["state"] == "approved"

    async def test_two_issuers_never_share_a_name_space(self, aiohttp_client: Any, site: BrokerSite) -> None:
        """sub "alice" at another issuer is another person: not the task's owner; one email is one voter."""
        async with app_client(aiohttp_client, with_second_issuer(site)) as client:
            task = await start(client, token(site, "alice", email="alice@example.com"))
            other = token(site, "alice", email="alice@idp2.example", issuer=IDP2)
            assert (await client.get(f"/v1/tasks/{task['id']}", headers=h(other))).status == 404
            assert (await client.post(f"/v1/tasks/{task['id']}/end", headers=h(other))).status == 404
            assert (await client.get(f"/v1/tasks/{task['id']}", headers=h(token(site, "alice")))).status == 200
            # The same verified address through two issuers is one person when it comes to voting.
            pending = await credential(client, site, task["id"], "prod-cert", status=202)
            lead = ("secops-leads",)
            await vote(client, pending["approval_id"], token(site, "u-lena", email="lena@example.com", groups=lead),
                       status=200)
            twin = token(site, "lena-2", email="lena@example.com", groups=lead, issuer=IDP2)
            assert (await vote(client, pending["approval_id"], twin, status=409))["code"] == "conflict"

    async def test_api_and_audit_show_id_and_display_name(self, client: Client, site: BrokerSite) -> None:
        """Tasks and audit records carry the stable id and, beside it, the display name."""
        task = await start(client, token(site, "u-alice", email="alice@example.com"))
        assert (task["user"], task["user_name"]) == (f"{IDP}#u-alice", "alice@example.com")
        auditor = h(token(site, "u-audrey", email="audrey@example.com", groups=("audit",)))
        for query in (f"user={IDP}%23u-alice", "user=alice@example.com"):
            records = (await (await client.get(f"/v1/audit?{query}", headers=auditor)).json())["records"]
            started = [r for r in records if r["event"] == "task.started" and r["task"] == task["id"]]
            assert [(r["user"], r["user_name"]) for r in started] == [(f"{IDP}#u-alice", "alice@example.com")]


# -- 4-7: no input reaches a 500 or echoes a secret ------------------------------------------------------------


class TestInput:
    @pytest.mark.parametrize("depth", [33, 5000, 10000])
    async def test_finding_4_deeply_nested_body(self, client: Client, site: BrokerSite,
                                                caplog: pytest.LogCaptureFixture, depth: int) -> None:
        """A body nested thousands deep (well under the size limit) is a 400 json_too_deep, no traceback."""
        body = b'{"agent": ' + b"[" * depth + b"]" * depth + b"}"
        with caplog.at_level(logging.DEBUG):
            resp = await client.post("/v1/tasks", data=body, headers={**h(token(site, "u-alice")),
                                                                      "Content-Type": "application/json"})
            assert_problem(await resp.text(), resp, 400, "json_too_deep")
        assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text

    @pytest.mark.parametrize("query", ["after=99999999999999999999", "after=-1", "after=1e3", "limit=0",
                                       "limit=99999999999999999999", "since=nan", "until=inf", "since=1e400"])
    async def test_finding_5_audit_numbers_out_of_range(self, client: Client, site: BrokerSite, query: str) -> None:
        """Query numbers are bounded integers or finite numbers: out of range is a 400, never SQLite's OverflowError."""
        auditor = h(token(site, "u-audrey", email="audrey@example.com", groups=("audit",)))
        resp = await client.get(f"/v1/audit?{query}", headers=auditor)
        assert_problem(await resp.text(), resp, 400, "number_out_of_range")

    @pytest.mark.parametrize("field", ["ttl", "role", "agent", "tenant"])
    async def test_finding_6_validation_errors_do_not_echo(self, client: Client, site: BrokerSite,
                                                          caplog: pytest.LogCaptureFixture, field: str) -> None:
        """A token or password pasted into any field comes back as the field's name and rule, never the value."""
        jwt_canary = site.ids.agent()  # a real JWT-SVID, as an agent might paste by mistake
        for canary in (CANARY, jwt_canary, "hunter2-Passw0rd!"):
            body = {"agent": AGENT, "role": "support-triage", "ttl": "10m", "reason": "r", field: canary}
            with caplog.at_level(logging.DEBUG):
                resp = await client.post("/v1/tasks", json=body, headers=h(token(site, "u-alice")))
                text = await resp.text()
            assert resp.status == 400, text
            assert canary not in text and canary not in caplog.text
            assert field in json.loads(text)["detail"]
        # An unknown member name is the caller's input too.
        resp = await client.post("/v1/tasks", json={"agent": AGENT, "role": "support-triage", "ttl": 60,
                                                    "reason": "r", CANARY: 1}, headers=h(token(site, "u-alice")))
        assert resp.status == 400 and CANARY not in await resp.text()

    @pytest.mark.parametrize("url", ["/v1/tasks/%00", "/v1/tasks?user=%00", "/v1/leases?agent=a%0d%0ab",
                                     "/v1/tasks?after=1:%00", "/v1/audit?limit=--5", "/v1/tasks?limit=--5"])
    async def test_control_characters_and_malformed_numbers(self, client: Client, site: BrokerSite,
                                                            caplog: pytest.LogCaptureFixture, url: str) -> None:
        """NUL or CR-LF in a path or query, a number like --5: a 400 problem before any store work, nothing
        of it in the log (PostgreSQL refuses NUL with an error, and a CR-LF would forge a log line)."""
        staff = h(token(site, "u-oscar", email="oscar@example.com", groups=("secops", "audit")))
        with caplog.at_level(logging.DEBUG):
            resp = await client.get(url, headers=staff)
            body = await resp.text()
        assert 400 <= resp.status < 500 and resp.status != 404, body
        assert resp.headers["Content-Type"].startswith("application/problem+json")
        # The test server's own access log (aiohttp's, not the broker's) repeats the request line.
        ours = "\n".join(r.getMessage() for r in caplog.records if r.name != "aiohttp.access")
        assert "\x00" not in ours and "Traceback" not in ours and "--5" not in ours

    async def test_undecodable_body(self, site: BrokerSite, caplog: pytest.LogCaptureFixture) -> None:
        """Content-Encoding: gzip over junk is a 400, not a 500, and the served broker logs no traceback."""
        async with serve(site, site.settings) as live, aiohttp.ClientSession() as http:
            with caplog.at_level(logging.DEBUG):
                resp = await http.post(f"{live.url}/v1/tasks", data=b"\x1f\x8bnot gzip at all",
                                       headers={**h(token(site, "u-alice")), "Content-Type": "application/json",
                                                "Content-Encoding": "gzip"})
                assert_problem(await resp.text(), resp, 400, "bad_request")
                await asyncio.sleep(0.2)  # aiohttp drains the rest of the body after the answer
        assert "Traceback" not in caplog.text

    @pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded; charset=nosuch",
                                              "application/x-www-form-urlencoded; charset=utf-16",
                                              "multipart/form-data", "text/plain"])
    async def test_console_forms_are_urlencoded_utf8(self, client: Client, site: BrokerSite,
                                                     caplog: pytest.LogCaptureFixture, content_type: str) -> None:
        """The sign-in form refuses any other encoding with a 4xx page, and logs none of the body."""
        with caplog.at_level(logging.DEBUG):
            resp = await client.post("/console/login", data=f"csrf=x&token={CANARY}".encode(),
                                     headers={"Content-Type": content_type, "Sec-Fetch-Site": "same-origin"})
        assert resp.status in (400, 403, 415), await resp.text()
        ours = "\n".join(r.getMessage() for r in caplog.records if r.name != "aiohttp.access")
        assert CANARY not in ours and "Traceback" not in caplog.text

    @pytest.mark.parametrize("wait", ["nan", "NaN", "inf", "-inf", "1e309", "-1", "61", "x"])
    async def test_finding_7_approval_wait_bounds(self, client: Client, site: BrokerSite, wait: str) -> None:
        """?wait= is a finite number of seconds from 0 to 60: NaN and Infinity are refused at once."""
        task = await start(client, token(site, "u-alice"))
        pending = await credential(client, site, task["id"], "prod-write", status=202)
        started = time.monotonic()
        resp = await client.get(f"/v1/approvals/{pending['approval_id']}?wait={wait}",
                                headers=bearer(site.ids.agent()))
        assert_problem(await resp.text(), resp, 400, "number_out_of_range")
        assert time.monotonic() - started < 5

    @pytest.mark.parametrize(("body", "content_type", "status", "code"), [
        (_task_body(), "text/plain", 415, "unsupported_media_type"),
        (_task_body(), None, 415, "unsupported_media_type"),
        (_task_body(), "application/json; charset=latin-1", 415, "unsupported_media_type"),
        (_task_body(encoding="utf-16"), "application/json", 400, "invalid_json"),
        (b"\xef\xbb\xbf" + _task_body(), "application/json", 400, "invalid_json"),
        (_task_body(ttl="NaN"), "application/json", 400, "number_out_of_range"),
        (_task_body(ttl="Infinity"), "application/json", 400, "number_out_of_range"),
        (_task_body(ttl="1e400"), "application/json", 400, "number_out_of_range"),
        (_task_body(ttl="99999999999999999999"), "application/json", 400, "number_out_of_range"),
        (_task_body(extra=', "agent": "spiffe://example.org/agent/support-2"'), "application/json", 400,
         "invalid_json"),
    ])
    async def test_content_type_and_encoding(self, client: Client, site: BrokerSite, body: bytes,
                                             content_type: str | None, status: int, code: str) -> None:
        """Bodies are application/json in UTF-8 with real numbers and unique names; nothing else starts a task."""
        headers = h(token(site, "u-alice"))
        if content_type is not None:
            headers["Content-Type"] = content_type
        resp = await client.post("/v1/tasks", data=body, headers=headers)
        assert_problem(await resp.text(), resp, status, code)
        assert await client.app[STORE].find_tasks(user=f"{IDP}#u-alice") == []
        # The same body, sent right, does start the task: the refusals above are about the framing alone.
        if code == "unsupported_media_type":
            ok = await client.post("/v1/tasks", data=body, headers={**headers, "Content-Type": "application/json"})
            assert ok.status == 201, await ok.text()


# -- the HTTP layer: what aiohttp does before a handler runs ------------------------------------------------------


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


class TestHttpLayer:
    async def test_access_log_holds_no_query_string(self, site: BrokerSite, access_log: pytest.LogCaptureFixture
                                                    ) -> None:
        """GET /console/login?token=<ID token> logs the path only, and signs nobody in (POST only)."""
        id_token = token(site, "u-lena", email="lena@example.com", groups=("secops-leads",))
        async with serve(site, site.settings) as live, aiohttp.ClientSession() as http:
            resp = await http.get(f"{live.url}/console/login?token={id_token}", allow_redirects=False)
            assert resp.status == 200
            assert "broker_session" not in resp.cookies
            await http.get(f"{live.url}/v1/health?secret={CANARY}")
        lines = [r.getMessage() for r in access_log.records if r.name == "aiohttp.access"]
        assert any('"GET /console/login"' in line for line in lines), lines
        assert any('"GET /v1/health"' in line for line in lines), lines
        assert id_token not in access_log.text and CANARY not in access_log.text
        assert "token=" not in access_log.text

    @pytest.mark.parametrize("size", [9000, 20000, 70000])
    async def test_oversized_header_is_the_brokers_problem(self, site: BrokerSite,
                                                           access_log: pytest.LogCaptureFixture, size: int) -> None:
        """A header over 8 KiB gets the broker's 431 problem+json; nothing of it in the body or the log."""
        filler = ("eyJ" + "A" * size)[:size]
        async with serve(site, site.settings) as live:
            port = int(live.url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {filler}\r\n\r\n"
                         .encode())
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(65536), 10)
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == b"431", head
        assert b"application/problem+json" in head
        problem = json.loads(body)
        assert problem["code"] == "header_too_large"
        assert b"AAAAAAAA" not in raw and "AAAAAAAA" not in access_log.text and "eyJ" not in access_log.text
        assert "Traceback" not in access_log.text


# -- floods: a limit per person or per agent on everything that costs Vault or store work --------------------------


class TestLimits:
    async def test_task_start_flood(self, aiohttp_client: Any, site: BrokerSite) -> None:
        """Past its burst a person's task starts get 429 + Retry-After, before any Vault token or audit row."""
        settings = tuned(site, task_start_burst_per_user=2, task_start_rate_per_user=0.01)
        async with app_client(aiohttp_client, settings) as client:
            alice = token(site, "u-alice")
            await start(client, alice)
            await start(client, alice)
            resp = await client.post("/v1/tasks", json={"agent": AGENT, "role": "nope", "ttl": 60, "reason": "r"},
                                     headers=h(alice))
            assert_problem(await resp.text(), resp, 429, "rate_limited")
            assert int(resp.headers["Retry-After"]) >= 1
            # Refused before any work: no Vault token, not even an access.denied row for the unknown role.
            records = await client.app[STORE].query_audit(user=f"{IDP}#u-alice")
            assert [r.record.event for r in records if not r.record.event.startswith("vault.")] == \
                ["task.started", "task.started"]
            await start(client, token(site, "u-bob"))  # another person is not held back

    async def test_any_authenticated_request_flood(self, aiohttp_client: Any, site: BrokerSite) -> None:
        """Every authenticated route spends from its identity's bucket: reads and ends too, not only issuance."""
        async with app_client(aiohttp_client, tuned(site, request_burst_per_identity=5,
                                                    request_rate_per_identity=0.01)) as client:
            task = await start(client, token(site, "u-alice"))
            agent = bearer(site.ids.agent())
            codes = [(await client.get(f"/v1/tasks/{task['id']}", headers=agent)).status for _ in range(6)]
            assert codes == [200] * 5 + [429]
            resp = await client.post(f"/v1/tasks/{task['id']}/end", headers=agent)
            assert_problem(await resp.text(), resp, 429, "rate_limited")
            # The person who started it is another identity, with a bucket of their own.
            assert (await client.get(f"/v1/tasks/{task['id']}", headers=h(token(site, "u-alice")))).status == 200

    async def test_renew_flood(self, aiohttp_client: Any, site: BrokerSite) -> None:
        """An agent's renewals past its burst get 429."""
        async with app_client(aiohttp_client, tuned(site, renew_burst_per_agent=1, renew_rate_per_agent=0.01)
                              ) as client:
            task = await start(client, token(site, "u-alice"))
            cred = await credential(client, site, task["id"], "tickets-db-ro")
            agent = bearer(site.ids.agent())
            assert (await client.post(f"/v1/leases/{cred['lease_id']}/renew", json={}, headers=agent)).status == 200
            resp = await client.post(f"/v1/leases/{cred['lease_id']}/renew", json={}, headers=agent)
            assert_problem(await resp.text(), resp, 429, "rate_limited")
            assert "Retry-After" in resp.headers

    async def test_approval_decision_flood(self, aiohttp_client: Any, site: BrokerSite) -> None:
        """An approver's decisions past their burst get 429."""
        async with app_client(aiohttp_client, tuned(site, decide_burst_per_approver=1,
                                                    decide_rate_per_approver=0.01)) as client:
            task = await start(client, token(site, "u-alice"))
            first = await credential(client, site, task["id"], "prod-write", status=202)
            second = await credential(client, site, task["id"], "prod-write", ttl=60, status=202)
            lena = token(site, "u-lena", email="lena@example.com", groups=("secops-leads",))
            await vote(client, first["approval_id"], lena, status=200)
            assert (await vote(client, second["approval_id"], lena, status=429))["code"] == "rate_limited"

    async def test_concurrent_long_polls(self, aiohttp_client: Any, site: BrokerSite) -> None:
        """One identity holds at most long_polls_per_identity long polls; the next is a 429 at once."""
        async with app_client(aiohttp_client, tuned(site, long_polls_per_identity=2)) as client:
            task = await start(client, token(site, "u-alice"))
            pending = await credential(client, site, task["id"], "prod-write", status=202)
            url = f"/v1/approvals/{pending['approval_id']}?wait=3"
            agent = bearer(site.ids.agent())
            polls = [asyncio.ensure_future(client.get(url, headers=agent)) for _ in range(2)]
            await asyncio.sleep(0.5)
            resp = await client.get(url, headers=agent)
            assert_problem(await resp.text(), resp, 429, "rate_limited")
            assert [r.status for r in await asyncio.gather(*polls)] == [200, 200]
            assert (await client.get(url.replace("wait=3", "wait=0.1"), headers=agent)).status == 200

    async def test_console_sign_in_flood_and_eviction(self, site: BrokerSite) -> None:
        """Sign-ins are limited per person, and a person signing in again and again ends only their own sessions."""
        settings = tuned(site, sign_in_burst_per_person=4, sign_in_rate_per_person=0.01,
                         console_sessions_per_person=2)
        lead = ("secops-leads",)
        async with serve(site, settings) as live, browser() as other:
            assert await console_sign_in(live, other, token(site, "u-leo", groups=lead)) == 303
            jars = []
            for _ in range(4):
                jar = browser()
                jars.append(jar)
                assert await console_sign_in(live, jar, token(site, "u-lena", groups=lead)) == 303
            try:
                flood = browser()
                jars.append(flood)
                assert await console_sign_in(live, flood, token(site, "u-lena", groups=lead)) == 429
                # Leo was never signed out; of Lena's four sessions, the two oldest were.
                assert await console_page(live, other) == 200
                assert [await console_page(live, j) for j in jars[:4]] == [303, 303, 200, 200]  # 303: to sign-in
            finally:
                for jar in jars:
                    await jar.close()


_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def browser() -> aiohttp.ClientSession:
    """A client with its own cookie jar that keeps cookies of 127.0.0.1 (as a browser would)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def console_sign_in(live: Live, http: aiohttp.ClientSession, tok: str) -> int:
    page = await (await http.get(f"{live.url}/console/login")).text()
    csrf = _CSRF.search(page)
    assert csrf is not None
    resp = await http.post(f"{live.url}/console/login", data={"csrf": csrf.group(1), "token": tok},
                           headers={"Origin": live.url}, allow_redirects=False)
    return resp.status


async def console_page(live: Live, http: aiohttp.ClientSession) -> int:
    return (await http.get(f"{live.url}/console", allow_redirects=False)).status
