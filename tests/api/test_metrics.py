"""``GET /metrics`` after a real flow: parsed by Prometheus's own ``promtool`` and by prometheus_client's parser.

The flow runs against the real OpenBao: a task starts, the agent gets a credential, a stranger agent is
refused one, the task ends. The scrape must be clean for ``promtool check metrics`` (the lint Prometheus
runs), and the counters must have moved by exactly what the flow did.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from broker import __version__
from broker.api import METRICS
from broker.metrics import OTHER_GRANT, UNMATCHED
from tests.api.test_task_flow import credential, end, start_task
from tests.conftest import OTHER_AGENT, BrokerSite, bearer

Client = TestClient[Any, Any]
PROMTOOL = shutil.which("promtool")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, keyed by name and label set (prometheus_client's own parser)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(parsed: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return parsed.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: Client) -> str:
    client.app[METRICS].snapshot_ttl = 0.0  # each scrape reads the store (a broker caches it for 1 s)
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return await resp.text()


async def flow(client: Client, site: BrokerSite) -> str:
    """Task, credential, denial, end; the task's id."""
    task = await start_task(client, site)
    await credential(client, site, task["id"], "tickets-db-ro")
    await credential(client, site, task["id"], "tickets-db-ro", agent=OTHER_AGENT, status=403)
    await credential(client, site, task["id"], "no-such-grant-" + "x" * 20, status=403)
    await end(client, site, task["id"])
    return str(task["id"])


class TestScrape:
    async def test_promtool_finds_nothing_to_lint_after_a_real_flow(self, client: Client, site: BrokerSite) -> None:
        """`promtool check metrics` reads the scrape taken after task, credential, denial and end, and is silent."""
        await flow(client, site)
        text = await scrape(client)
        assert PROMTOOL is not None, "promtool is not installed: scripts/test.sh installs it (Debian package prometheus)"
        run = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60,
                             check=False)
        assert run.returncode == 0 and not run.stdout.strip() and not run.stderr.strip(), (run.stdout, run.stderr)

    async def test_counters_move_by_what_the_flow_did(self, client: Client, site: BrokerSite) -> None:
        """One issued, two refused (by their error codes), the requests by route template and status, Vault and
        store latencies observed, and the gauges read from the store."""
        before = samples(await scrape(client))
        task_id = await flow(client, site)
        after = samples(await scrape(client))

        def moved(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert moved("broker_credentials_issued_total", grant="tickets-db-ro") == 1
        assert moved("broker_credentials_denied_total", grant="tickets-db-ro", reason="not_task_agent") == 1
        # A grant the catalog does not name is one label value, whatever the caller sent.
        assert moved("broker_credentials_denied_total", grant=OTHER_GRANT, reason="grant_not_in_role") == 1
        route = "/v1/tasks/{task_id}/credentials"
        assert moved("broker_http_requests_total", route=route, method="POST", status="200") == 1
        assert moved("broker_http_requests_total", route=route, method="POST", status="403") == 2
        assert moved("broker_http_requests_total", route="/v1/tasks", method="POST", status="201") == 1
        assert moved("broker_http_request_duration_seconds_count", route=route, method="POST") == 3
        assert moved("broker_vault_request_duration_seconds_count", operation="read credential") == 1
        assert moved("broker_vault_request_duration_seconds_count", operation="create token") == 1
        assert moved("broker_store_transaction_duration_seconds_count") > 5
        assert value(after, "broker_tasks_live") == 0
        assert value(after, "broker_leases_live") == 0
        assert value(after, "broker_leases_revoke_pending") == 0
        assert value(after, "broker_audit_chain_head_seq") > value(before, "broker_audit_chain_head_seq")
        assert value(after, "broker_build_info", version=__version__, python=platform.python_version()) == 1
        assert value(after, "process_resident_memory_bytes") > 0
        # Never an id: not the task's, not an agent's, not the path as sent.
        text = "".join(f"{k}" for k in after)
        assert task_id not in text and "spiffe://" not in text and "x" * 20 not in text

    async def test_unmatched_paths_are_one_series(self, client: Client) -> None:
        """Requests to paths no route matches count under one route label: a scanner cannot grow the series."""
        for i in range(5):
            assert (await client.get(f"/nope-{i}?token=t{i}")).status == 404
        after = samples(await scrape(client))
        assert value(after, "broker_http_requests_total", route=UNMATCHED, method="GET", status="404") == 5
        assert not any("nope" in str(k) for k in after)

    async def test_live_gauges_follow_the_store(self, client: Client, site: BrokerSite) -> None:
        """A live task and lease show as 1 each, and 0 again once the task ended and Vault confirmed."""
        task = await start_task(client, site)
        await credential(client, site, task["id"], "tickets-db-ro")
        live = samples(await scrape(client))
        assert value(live, "broker_tasks_live") == 1 and value(live, "broker_leases_live") == 1
        await end(client, site, task["id"])
        done = samples(await scrape(client))
        assert value(done, "broker_tasks_live") == 0 and value(done, "broker_leases_live") == 0

    async def test_denials_before_the_grant_is_checked_are_labelled_too(self, client: Client,
                                                                         site: BrokerSite) -> None:
        """A credential request for a task that does not exist counts as denied with reason not_found."""
        resp = await client.post("/v1/tasks/tsk_nothere/credentials", json={"grant": "tickets-db-ro"},
                                 headers=bearer(site.ids.agent()))
        assert resp.status == 404
        after = samples(await scrape(client))
        assert value(after, "broker_credentials_denied_total", grant="tickets-db-ro", reason="not_found") == 1

