"""The approver's terminal commands and the CLI's other machine outputs, run as people run them.

``python -m broker ...`` in a subprocess against a real broker on loopback (``tests.api.test_opscli``):
``approvals list|approve|deny`` with the approver's own token, ``audit verify --json``, and ``vault
sync`` from a configuration that has none of what only the serving broker needs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from broker.sdk import AgentClient, ApprovalPending, UserClient
from tests.api.test_opscli import REPO, Live, cli, serve
from tests.conftest import AGENT, BrokerSite

APPROVER = "lena@example.com"
APPROVERS = ("secops-leads",)


@pytest_asyncio.fixture(name="live")
async def live_broker(site: BrokerSite) -> AsyncIterator[Live]:
    async with serve(site, site.settings) as broker:
        yield broker


async def pending_approval(live: Live) -> str:
    """A task whose agent asked for the high-risk grant prod-write: the approval id it got."""
    async with UserClient(live.url, live.site.ids.user()) as person:
        task = await person.start_task(agent=AGENT, role="support-triage", ttl="10m", reason="hotfix 12")
    async with AgentClient(live.url, live.site.ids.agent) as agent:
        try:
            await agent.credential(task.id, "prod-write")
        except ApprovalPending as pending:
            return pending.approval_id
    raise AssertionError("prod-write did not ask for an approval")


def approver(live: Live, *, signed_in_ago: float = 0.0) -> str:
    return live.site.ids.user(APPROVER, APPROVERS, auth_time=time.time() - signed_in_ago)


async def run_cli(*args: str, env: dict[str, str], timeout: float = 120) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "VAULT_", "BAO_"))}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "broker", *args, env={**base, **env}, cwd=REPO,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class TestApprovalsCli:
    async def test_list_shows_the_queue_as_a_table_and_as_json(self, live: Live) -> None:
        """`approvals list` is a table of the pending queue (count on stderr); --json is the API's answer."""
        approval = await pending_approval(live)
        run = await cli(live, "approvals", "list", token=approver(live))
        assert run.code == 0, run.err
        header, *rows = run.out.splitlines()
        assert header.split()[:3] == ["APPROVAL", "STATE", "GRANT"]
        row = next(r for r in rows if r.startswith(approval))
        assert row.split()[1:3] == ["pending", "prod-write"] and "0/1" in row
        assert re.fullmatch(r"\d+ pending approvals?", run.err.strip())
        listed = json.loads((await cli(live, "approvals", "list", "--json", token=approver(live))).out)
        assert approval in [a["id"] for a in listed["approvals"]]

    async def test_approve_with_a_fresh_sign_in_unlocks_the_grant(self, live: Live) -> None:
        """`approvals approve` with a fresh token records the vote; the approval is then approved."""
        approval = await pending_approval(live)
        run = await cli(live, "approvals", "approve", approval, "--reason", "change 881 approved",
                        "--json", token=approver(live))
        assert run.code == 0, run.err
        decided = json.loads(run.out)
        assert decided["state"] == "approved"
        assert [v["decision"] for v in decided["votes"]] == ["approve"]

    async def test_deny_prints_what_was_decided(self, live: Live) -> None:
        """`approvals deny` prints the approval as name/value lines for the person who decided."""
        approval = await pending_approval(live)
        run = await cli(live, "approvals", "deny", approval, "--reason", "not during the freeze", token=approver(live))
        assert run.code == 0, run.err
        lines = dict(line.split(None, 1) for line in run.out.splitlines())
        assert lines["state"] == "denied" and lines["grant"].startswith("prod-write")
        assert "not during the freeze" in lines["vote"]

    async def test_a_stale_sign_in_is_told_to_sign_in_again(self, live: Live) -> None:
        """The broker refuses a sign-in older than people.approval_max_auth_age; the CLI says so in words, exit 2,
        and the approval stays pending. The token never shows."""
        approval = await pending_approval(live)
        stale = approver(live, signed_in_ago=3600)
        run = await cli(live, "approvals", "approve", approval, "--reason", "ok", token=stale)
        assert run.code == 2
        assert "fresh sign-in" in run.err and "insufficient_user_authentication" in run.err
        assert re.search(r"no more than \d+ s ago", run.err)
        assert stale not in run.err and stale not in run.out
        listed = json.loads((await cli(live, "approvals", "list", "--json", token=approver(live))).out)
        assert approval in [a["id"] for a in listed["approvals"]]

    async def test_people_who_are_not_approvers_are_refused(self, live: Live) -> None:
        """Someone outside [people].approvers gets the broker's 403 as one line, exit 2."""
        run = await cli(live, "approvals", "list", token=live.site.ids.user("mallory@example.com", ("support",)))
        assert run.code == 2 and run.err.startswith("error:") and "(denied)" in run.err


class TestMachineOutput:
    async def test_audit_verify_json(self, live: Live) -> None:
        """`audit verify --json` is one object with the verdict and the counts, exit 0 on a sound log."""
        await pending_approval(live)
        code, out, err = await run_cli("audit", "verify", "--config", str(live.site.root / "broker.toml"), "--json",
                                       env={"BROKER_STORE_URL": live.site.settings.store.url})
        assert code == 0, err
        verdict = json.loads(out)
        assert verdict["ok"] is True and verdict["records"] >= 2 and verdict["first_bad_seq"] is None

    async def test_vault_sync_needs_only_what_it_uses(self, site: BrokerSite, tmp_path: Path) -> None:
        """A configuration without [server].audience, [vault].token_file and [store].key_file syncs (--json)."""
        text = (site.root / "broker.toml").read_text()
        kept = [line for line in text.splitlines()
                if not line.startswith(("audience =", "token_file =", "key_file ="))]
        config = tmp_path / "vault-only.toml"
        config.write_text("\n".join(kept).replace('jwks_file = "', f'jwks_file = "{site.root}/') + "\n")
        bao = site.engines.bao
        code, out, err = await run_cli("vault", "sync", "--config", str(config), "--json",
                                       env={"VAULT_ADDR": bao.addr, "VAULT_TOKEN": bao.root_token.reveal()})
        assert code == 0, err
        changes = json.loads(out)["changes"]
        assert {"kind": "policy", "name": "agent-broker", "action": "unchanged"} in changes
