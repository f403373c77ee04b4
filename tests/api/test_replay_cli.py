"""``broker audit replay`` as an auditor runs it: ``python -m broker`` in a subprocess against the broker on loopback.

The oracle is the store's own chain (and, for Vault requests, the records the tailer merged), never the
command's word.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest_asyncio

from broker.api import STORE
from broker.audit import canonical_bytes
from broker.sdk import AgentClient, UserClient
from broker.store import AuditRow
from broker.vault import VaultClient
from tests.api.test_opscli import Live, cli, serve
from tests.conftest import AGENT, USER, USER_ID, BrokerSite

AUDITOR = "audrey@example.com"


@pytest_asyncio.fixture
async def live(site: BrokerSite) -> AsyncIterator[Live]:
    """The broker on a free loopback port, served by this test's loop."""
    async with serve(site, site.settings) as broker:
        yield broker


def auditor(live: Live) -> str:
    return live.site.ids.user(AUDITOR, ("audit",))


async def session_with_vault_requests(live: Live) -> tuple[str, dict[str, str]]:
    """A task with three credentials, two Vault requests made with the child token, then its end; wait until
    the tailer merged those requests. The task id and {grant: lease id}."""
    async with UserClient(live.url, live.site.ids.user(USER, ("support",))) as person:
        task = await person.start_task(agent=AGENT, role="support-triage", ttl="10m", reason="ticket 9")
    async with AgentClient(live.url, live.site.ids.agent) as agent:
        creds = {g: await agent.credential(task.id, g) for g in ("tickets-db-ro", "agent-cert", "child-token")}
        async with aiohttp.ClientSession() as session:
            child = VaultClient(session, live.site.engines.bao.addr, token=creds["child-token"].data["token"])
            await child.lookup_self()
            await child.lookup_self()
        await agent.end_task(task.id)
    leases = {g: c.lease_id for g, c in creds.items()}
    store = live.app[STORE]
    for _ in range(150):
        rows = await store.query_audit(task=task.id, limit=1000)
        if sum(r.record.event == "vault.request" and r.record.lease == leases["child-token"] for r in rows) >= 2:
            break
        await asyncio.sleep(0.1)
    return task.id, leases


async def task_rows(live: Live, task_id: str) -> list[AuditRow]:
    return await live.app[STORE].query_audit(task=task_id, limit=1000)


class TestReplay:
    async def test_table_is_the_delegation_timeline(self, live: Live) -> None:
        """The table shows who delegated to which agent and role, each credential with the Vault requests made
        with it indented beneath, and the end; exit 0."""
        task_id, leases = await session_with_vault_requests(live)
        run = await cli(live, "audit", "replay", "--task", task_id, "--iso", token=auditor(live))
        assert run.code == 0, run.err
        lines = run.out.splitlines()
        assert lines[0].startswith(f"task {task_id}  user {USER} <{USER_ID}>  agent {AGENT}  role support-triage  "
                                   "tenant acme")
        assert "  ended " in lines[0]
        for grant, lease in leases.items():
            assert any("lease.issued" in l and f"lease {lease}" in l for l in lines), grant
        at = next(i for i, l in enumerate(lines) if "lease.issued" in l and f"lease {leases['child-token']}" in l)
        nested = [l for l in lines[at + 1:] if l.startswith("      ") and "vault.request" in l]
        assert len(nested) >= 2 and any("auth/token/lookup-self" in l for l in nested)
        assert any("task.ended" in l for l in lines)
        rows = await task_rows(live, task_id)
        assert lines[-1] == f"{len(rows)} records, 1 task"
        print(run.out)
        print(f"replay_table_lines={len(lines)} records={len(rows)}")

    async def test_jsonl_and_ocsf(self, live: Live) -> None:
        """jsonl is the chain's canonical record per line; ocsf one OCSF event per record, correlated by task."""
        task_id, _ = await session_with_vault_requests(live)
        rows = await task_rows(live, task_id)
        run = await cli(live, "audit", "replay", "--task", task_id, "--format", "jsonl", token=auditor(live))
        assert run.code == 0, run.err
        assert run.out.encode() == b"".join(canonical_bytes(r.record, r.seq) + b"\n" for r in rows)
        run = await cli(live, "audit", "replay", "--task", task_id, "--format", "ocsf", token=auditor(live))
        assert run.code == 0, run.err
        events = [json.loads(l) for l in run.out.splitlines()]
        assert [e["metadata"]["uid"] for e in events] == [str(r.seq) for r in rows]
        assert {e["metadata"]["correlation_uid"] for e in events} == {task_id}
        assert {e["class_uid"] for e in events} == {6003}
        assert any(e["unmapped"].get("agent", {}).get("uid") == AGENT for e in events)
        assert any(e["api"]["service"]["name"] == "vault" for e in events)

    async def test_filters_by_user_and_time(self, live: Live) -> None:
        """--user covers the user's tasks; a --since in the future matches nothing (exit 0, a note on stderr)."""
        task_id, _ = await session_with_vault_requests(live)
        run = await cli(live, "audit", "replay", "--user", USER, "--format", "jsonl", token=auditor(live))
        assert run.code == 0, run.err
        assert {json.loads(l)["task"] for l in run.out.splitlines()} >= {task_id}
        assert all(json.loads(l)["user"] == USER_ID for l in run.out.splitlines())
        run = await cli(live, "audit", "replay", "--task", task_id, "--since", "2999-01-01", token=auditor(live))
        assert (run.code, run.out) == (0, "") and "no audit records match" in run.err

    async def test_refusals(self, live: Live) -> None:
        """No selector is a usage error (2); a non-auditor gets exit 2 and one line, never a traceback."""
        run = await cli(live, "audit", "replay", token=auditor(live))
        assert run.code == 2 and "--user, --agent or --task" in run.err
        run = await cli(live, "audit", "replay", "--task", "tsk_x", token=live.site.ids.user(USER, ("support",)))
        assert run.code == 2 and run.err.startswith("error: ") and "Traceback" not in run.err
