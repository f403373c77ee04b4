"""The operator CLI as an operator runs it: ``python -m broker ...`` in a subprocess against the real broker.

The broker serves on a real loopback port from this test's event loop (``AppRunner`` + ``TCPSite``), so
the subprocess is awaited with ``asyncio.create_subprocess_exec`` while the server keeps serving. Vault
lease lookups with the root token are the oracle for "revoked", never the CLI's own word.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest_asyncio
from aiohttp import web

from broker.api import STORE
from broker.app import make_app
from broker.config import Settings, load_settings
from broker.sdk import AgentClient, UserClient
from broker.server import BrokerRunner
from broker.vault import VaultClient
from tests.conftest import AGENT, USER, USER_ID, BrokerSite, bearer

REPO = Path(__file__).resolve().parents[2]
BOB = "bob@example.com"
OPERATOR = "olivia@example.com"
AUDITOR = "audrey@example.com"


@dataclass
class Live:
    """A broker serving on 127.0.0.1 from the test's loop."""

    url: str
    app: web.Application
    site: BrokerSite

    def operator(self) -> str:
        return self.site.ids.user(OPERATOR, ("secops",))

    async def vault_lease(self, lease_id: str) -> str:
        row = await self.app[STORE].get_lease(lease_id)
        assert row is not None
        return row.vault_lease_id


@dataclass
class Run:
    code: int
    out: str
    err: str


@contextlib.asynccontextmanager
async def serve(site: BrokerSite, settings: Settings) -> AsyncIterator[Live]:
    """The broker app on a free loopback port, served by the running loop until the block ends."""
    app = make_app(settings)
    runner = BrokerRunner(app)  # as `broker serve` runs it: its access log and parser-error answers
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield Live(url=f"http://127.0.0.1:{runner.addresses[0][1]}", app=app, site=site)
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def live(site: BrokerSite) -> AsyncIterator[Live]:
    async with serve(site, site.settings) as broker:
        yield broker


@pytest_asyncio.fixture
async def cut_off(live: Live) -> AsyncIterator[Live]:
    """A second broker on the same store whose Vault does not answer: its revocations stay pending."""
    settings = load_settings({"BROKER_STORE_URL": live.site.settings.store.url,
                              "BROKER_VAULT_ADDR": "http://127.0.0.1:9"}, live.site.root / "broker.toml")
    async with serve(live.site, settings) as broker:
        yield broker


async def spawn(live: Live, *args: str, token: str | None = None) -> asyncio.subprocess.Process:
    """Start ``python -m broker ARGS`` with BROKER_URL and BROKER_TOKEN (the operator's unless ``token``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(BROKER_URL=live.url, BROKER_TOKEN=live.operator() if token is None else token)
    if not env["BROKER_TOKEN"]:
        del env["BROKER_TOKEN"]
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "broker", *args, env=env, cwd=REPO,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def cli(live: Live, *args: str, token: str | None = None, timeout: float = 90) -> Run:
    """Run ``python -m broker ARGS`` to the end while this loop keeps serving the broker."""
    proc = await spawn(live, *args, token=token)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def task_with_leases(live: Live, grants: tuple[str, ...], *, user: str = USER) -> list[str]:
    """Start a support-triage task as ``user`` and fetch ``grants``; the broker's lease ids."""
    async with UserClient(live.url, live.site.ids.user(user, ("support",))) as person:
        task = await person.start_task(agent=AGENT, role="support-triage", ttl="10m", reason="ticket 7")
    async with AgentClient(live.url, live.site.ids.agent) as agent:
        return [(await agent.credential(task.id, grant)).lease_id for grant in grants]


async def start_task_status(live: Live) -> tuple[int, str]:
    """Try to start a task as alice; the status and problem code (empty on success)."""
    body = {"agent": AGENT, "role": "support-triage", "ttl": 60, "reason": "again"}
    async with aiohttp.ClientSession() as http, http.post(f"{live.url}/v1/tasks", json=body,
                                                          headers=bearer(live.site.ids.user())) as resp:
        payload = await resp.json()
        return resp.status, str(payload.get("code", ""))


def summary(out: str) -> dict[str, str]:
    return dict(line.split(None, 1) for line in out.splitlines() if line.strip())


class TestRevoke:
    async def test_revoke_by_user_follows_to_done(self, live: Live, admin: VaultClient) -> None:
        """Every lease of the user's tasks is revoked in Vault; progress on stderr; exit 0; right counts."""
        alice = await task_with_leases(live, ("agent-cert", "tickets-db-ro")) + await task_with_leases(
            live, ("agent-cert",))
        bob = await task_with_leases(live, ("agent-cert",), user=BOB)
        run = await cli(live, "revoke", "--user", USER, "--reason", "offboarding")
        assert run.code == 0, run.err
        assert "revoked 3/3 leases (0 pending)" in run.err
        fields = summary(run.out)
        assert fields["selector"] == f"user {USER}"
        assert fields["state"] == "done"
        assert fields["tasks"] == "2"
        assert fields["leases"].startswith("3 ") and fields["revoked"].startswith("3 ")
        assert fields["pending"].startswith("0 ")
        for lease in alice:
            assert await admin.lookup_lease(await live.vault_lease(lease)) is None
        assert await admin.lookup_lease(await live.vault_lease(bob[0])) is not None

    async def test_revoke_one_task_json(self, live: Live) -> None:
        """--task revokes one task; --json prints the RevocationOut on stdout."""
        leases = await task_with_leases(live, ("agent-cert",))
        row = await live.app[STORE].get_lease(leases[0])
        assert row is not None
        run = await cli(live, "revoke", "--task", row.task_id, "--reason", "stuck agent", "--json")
        assert run.code == 0, run.err
        rev = json.loads(run.out)
        assert (rev["kind"], rev["value"], rev["state"]) == ("task", row.task_id, "done")
        assert (rev["leases"], rev["revoked"], rev["pending"]) == (1, 1, 0)
        assert rev["id"].startswith("rvk_")

    async def test_no_wait_returns_once_accepted(self, live: Live) -> None:
        """--no-wait exits 0 as soon as the broker accepted the revocation, which then completes on its own."""
        await task_with_leases(live, ("agent-cert",))
        run = await cli(live, "revoke", "--tenant", "acme", "--reason", "incident", "--no-wait", "--json")
        assert run.code == 0, run.err
        rev = json.loads(run.out)
        for _ in range(60):
            if rev["state"] == "done":
                break
            await asyncio.sleep(0.5)
            rev = json.loads((await cli(live, "revocations", rev["id"], "--json")).out)
        assert (rev["kind"], rev["value"], rev["state"], rev["revoked"]) == ("tenant", "acme", "done", 1)

    async def test_exactly_one_selector(self, live: Live) -> None:
        """Two selectors (or none) is a usage error, exit 2, and nothing is sent."""
        run = await cli(live, "revoke", "--user", USER, "--tenant", "acme", "--reason", "x")
        assert run.code == 2 and "exactly one of" in run.err


class TestListings:
    async def test_leases_table_lists_the_users_leases_as_revoked(self, live: Live) -> None:
        """After a revoke, `broker leases --user` shows each of that user's leases, state revoked."""
        alice = await task_with_leases(live, ("agent-cert", "child-token"))
        bob = await task_with_leases(live, ("agent-cert",), user=BOB)
        assert (await cli(live, "revoke", "--user", USER, "--reason", "offboarding")).code == 0
        run = await cli(live, "leases", "--user", USER)
        assert run.code == 0, run.err
        header, *rows = run.out.splitlines()
        assert header.split()[:3] == ["LEASE", "TASK", "USER"]
        assert {r.split()[0] for r in rows} == set(alice)
        assert all(r.split()[6] == "revoked" for r in rows)
        assert bob[0] not in run.out
        assert run.err.strip() == "2 leases"

    async def test_json_output_parses(self, live: Live) -> None:
        """--json gives the API's shape: leases with their fields, tasks with their states."""
        alice = await task_with_leases(live, ("agent-cert",))
        run = await cli(live, "leases", "--user", USER, "--state", "active", "--json")
        assert run.code == 0, run.err
        page = json.loads(run.out)
        assert [x["id"] for x in page["leases"]] == alice and page["next_after"] is None
        assert page["leases"][0]["user"] == USER_ID and page["leases"][0]["user_name"] == USER and page["leases"][0]["state"] == "active"
        tasks = json.loads((await cli(live, "tasks", "--user", USER, "--json")).out)["tasks"]
        assert [t["state"] for t in tasks] == ["active"] and tasks[0]["user"] == USER_ID

    async def test_pages_are_followed_up_to_the_limit(self, live: Live) -> None:
        """--limit collects across next_after pages and says when more remain."""
        leases = await task_with_leases(live, ("agent-cert", "agent-cert", "agent-cert"))
        run = await cli(live, "leases", "--user", USER, "--json", "--page-size", "1", "--limit", "3")
        assert sorted(x["id"] for x in json.loads(run.out)["leases"]) == sorted(leases)
        run = await cli(live, "leases", "--user", USER, "--page-size", "1", "--limit", "2")
        assert len(run.out.splitlines()) == 3 and "more after" in run.err

    async def test_tasks_table(self, live: Live) -> None:
        """`broker tasks` shows the user's tasks with role and state, times as HH:MM:SS."""
        await task_with_leases(live, ("agent-cert",))
        run = await cli(live, "tasks", "--user", USER)
        assert run.code == 0, run.err
        row = run.out.splitlines()[1].split()
        assert row[1:6] == [USER, AGENT, "support-triage", "acme", "active"]
        assert row[6].count(":") == 2


class TestPending:
    async def test_exit_3_while_vault_has_not_confirmed(self, live: Live, cut_off: Live, admin: VaultClient) -> None:
        """Unconfirmed leases end the wait with exit 3 and a 'keeps retrying' note; the broker then finishes."""
        leases = await task_with_leases(live, ("agent-cert",))
        run = await cli(cut_off, "revoke", "--user", USER, "--reason", "offboarding", "--timeout", "1")
        assert run.code == 3, run.err
        assert "revoked 0/1 leases (1 pending)" in run.err
        assert "1 of 1 lease not yet confirmed" in run.err and "keeps retrying" in run.err
        assert summary(run.out)["state"] == "in_progress"
        rvk = summary(run.out)["revocation"]
        # The broker that can reach Vault retries on its own (maintenance loop, with backoff).
        for _ in range(60):
            rev = json.loads((await cli(live, "revocations", rvk, "--json")).out)
            if rev["state"] == "done":
                break
            await asyncio.sleep(0.5)
        assert (rev["state"], rev["revoked"], rev["pending"]) == ("done", 1, 0)
        assert await admin.lookup_lease(await live.vault_lease(leases[0])) is None

    async def test_ctrl_c_names_the_revocation(self, live: Live, cut_off: Live) -> None:
        """Ctrl-C while following exits 130 and says how to follow the revocation, which carries on."""
        await task_with_leases(live, ("agent-cert",))
        proc = await spawn(cut_off, "revoke", "--user", USER, "--reason", "offboarding", "--timeout", "60")
        assert proc.stderr is not None
        first = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert first.decode().startswith("revoked 0/1 leases")
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 130
        assert "interrupted" in err.decode() and "broker revocations rvk_" in err.decode()
        assert "Traceback" not in err.decode()


class TestLocks:
    async def test_unlock_lifts_the_lock(self, live: Live) -> None:
        """A user revocation locks the user out of new tasks until `broker unlock`."""
        await task_with_leases(live, ("agent-cert",))
        revoked = await cli(live, "revoke", "--user", USER, "--reason", "offboarding", "--json")
        rev = json.loads(revoked.out)
        assert rev["lock"] is True
        listed = await cli(live, "revocations")
        assert rev["id"] in listed.out and listed.out.splitlines()[1].split()[3] == "yes"
        refused = await start_task_status(live)
        assert refused == (403, "locked")
        run = await cli(live, "unlock", rev["id"], "--reason", "back from leave")
        assert run.code == 0, run.err
        assert summary(run.out)["lock"].startswith("lifted at ") and OPERATOR in run.out
        assert rev["id"] not in (await cli(live, "revocations")).out
        assert rev["id"] in (await cli(live, "revocations", "--all")).out
        assert len(await task_with_leases(live, ("agent-cert",))) == 1


class TestRefusals:
    async def test_non_operator_gets_exit_2_and_one_line(self, live: Live, admin: VaultClient) -> None:
        """A delegating user cannot revoke: exit 2, one 'error:' line, no token echoed, nothing revoked."""
        leases = await task_with_leases(live, ("agent-cert",))
        token = live.site.ids.user()
        run = await cli(live, "revoke", "--user", USER, "--reason", "mine", token=token)
        assert run.code == 2
        assert run.out == "" and len(run.err.splitlines()) == 1 and run.err.startswith("error: ")
        assert "Traceback" not in run.err and token not in run.err + run.out
        assert token.split(".")[2] not in run.err + run.out
        assert await admin.lookup_lease(await live.vault_lease(leases[0])) is not None

    async def test_auditor_lists_but_cannot_revoke(self, live: Live) -> None:
        """Auditors read leases; a revoke by them is a 403, exit 2."""
        await task_with_leases(live, ("agent-cert",))
        token = live.site.ids.user(AUDITOR, ("audit",))
        assert (await cli(live, "leases", token=token)).code == 0
        assert (await cli(live, "revoke", "--agent", AGENT, "--reason", "x", token=token)).code == 2

    async def test_bad_token_is_exit_2_without_the_token(self, live: Live) -> None:
        """A token nobody trusts gets the generic 401 line, exit 2, and is never echoed."""
        token = live.site.ids.stranger.mint_id_token(issuer="https://idp.test.example", subject=OPERATOR,
                                                     email=OPERATOR, groups=("secops",), audience="agent-broker")
        run = await cli(live, "leases", token=token)
        assert run.code == 2 and run.err.startswith("error: ") and "(invalid_token)" in run.err
        assert token not in run.err + run.out

    async def test_token_file_and_missing_token(self, live: Live, tmp_path: Path) -> None:
        """--token-file works instead of BROKER_TOKEN; with neither, a usage error (exit 2)."""
        path = tmp_path / "token"
        path.write_text(live.operator() + "\n")
        assert (await cli(live, "revocations", "--token-file", str(path), token="")).code == 0
        run = await cli(live, "revocations", token="")
        assert run.code == 2 and "BROKER_TOKEN" in run.err

    async def test_unreachable_broker(self, live: Live) -> None:
        """A broker that does not answer gives one line and exit 1."""
        run = await cli(live, "leases", "--url", "http://127.0.0.1:9")
        assert run.code == 1 and run.err.startswith("error: cannot reach the broker at http://127.0.0.1:9")
