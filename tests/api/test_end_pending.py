"""Ending a task that Vault is still revoking: 202 ``revoke_pending``, pollable, never a 503 while Vault answers.

Vault revokes a task token's leases after ``revoke-accessor`` answers. Here Vault is kept busy for real:
a PostgreSQL transaction holds a lock on the database login Vault must drop (``ALTER ROLE`` in an open
transaction), so Vault's ``DROP ROLE`` waits, exactly as it waits behind a slow database or a long
backlog. The end then answers 202 with ``revocation: revoke_pending``; ``GET /v1/tasks/{id}`` shows it;
once the lock is released Vault finishes and the maintenance loop confirms. Vault's own lease lookups
(root token) are the oracle.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg

from broker.api import STORE
from broker.app import make_app
from broker.sdk import AgentClient
from broker.states import TaskEvent
from broker.store.tasks import FENCE_CLAIM
from broker.vault import VaultClient
from tests.api.test_opscli import serve
from tests.api.test_task_flow import credential, start_task
from tests.conftest import BrokerSite, bearer

LEASES = 2


@contextlib.asynccontextmanager
async def busy_revoking(site: BrokerSite, username: str) -> AsyncIterator[None]:
    """Hold a lock on the login ``username`` until the block ends: Vault's DROP ROLE for it waits."""
    pg = site.engines.pg
    async with await psycopg.AsyncConnection.connect(host=pg.host, port=pg.port, dbname="postgres",
                                                     user=pg.superuser, password=pg.password) as conn:
        await conn.execute(f'ALTER ROLE "{username}" CONNECTION LIMIT 7')  # an open transaction: the row stays locked
        try:
            yield
        finally:
            await conn.rollback()


async def revoked_view(client: Any, site: BrokerSite, task_id: str) -> dict[str, Any]:
    """The task's view once it says ``revoked`` (the maintenance loop confirmed it), polled for at most 20 s."""
    for _ in range(100):
        view: dict[str, Any] = await (await client.get(f"/v1/tasks/{task_id}", headers=bearer(site.ids.agent()))).json()
        if view["revocation"] == "revoked":
            break
        await asyncio.sleep(0.2)
    assert view["revocation"] == "revoked", view
    return view


def quick(site: BrokerSite) -> Any:
    """The site's settings with a short confirmation window and a fast maintenance loop."""
    s = site.settings
    return s.model_copy(update={
        "vault": s.vault.model_copy(update={"revoke_confirm_timeout": 1.0}),
        "maintenance": s.maintenance.model_copy(update={"interval": 0.2, "max_backoff": 1.0}),
    })


class TestEndPending:
    async def test_end_before_vault_confirms_is_202_and_pollable(self, site: BrokerSite, aiohttp_client: Any,
                                                                 admin: VaultClient) -> None:
        """202 with revocation revoke_pending and the unconfirmed leases counted; the task view shows it; the
        maintenance loop confirms, after which Vault has no lease and the view says revoked."""
        client = await aiohttp_client(make_app(quick(site)))
        task = await start_task(client, site)
        creds = [await credential(client, site, task["id"], "tickets-db-ro") for _ in range(LEASES)]
        rows = [await client.app[STORE].get_lease(c["lease_id"]) for c in creds]
        async with busy_revoking(site, creds[0]["data"]["username"]):
            resp = await client.post(f"/v1/tasks/{task['id']}/end", headers=bearer(site.ids.agent()))
            body = await resp.json()
            assert resp.status == 202, body
            assert body == {"id": task["id"], "state": "ended", "revocation": "revoke_pending", "revoked": 0,
                            "pending": LEASES}
            view = await (await client.get(f"/v1/tasks/{task['id']}", headers=bearer(site.ids.agent()))).json()
            assert view["state"] == "ended" and view["revocation"] == "revoke_pending"
            assert rows[0] is not None and await admin.lookup_lease(rows[0].vault_lease_id) is not None

        view = await revoked_view(client, site, task["id"])
        assert {x["state"] for x in view["leases"]} == {"revoked"}
        for row in rows:
            assert row is not None and await admin.lookup_lease(row.vault_lease_id) is None

    async def test_sdk_follows_a_pending_end_until_vault_confirms(self, site: BrokerSite) -> None:
        """``end_task(wait=...)`` turns a 202 into the confirmed end; without ``wait`` it returns the 202's answer."""
        async with serve(site, quick(site)) as live, AgentClient(live.url, site.ids.agent) as agent:
            from broker.sdk import UserClient

            async with UserClient(live.url, site.ids.user()) as user:
                first = await user.start_task(agent="spiffe://example.org/agent/support-1", role="support-triage",
                                              ttl="10m", reason="sdk end")
                second = await user.start_task(agent="spiffe://example.org/agent/support-1", role="support-triage",
                                               ttl="10m", reason="sdk end")
            logins = {t.id: (await agent.credential(t.id, "tickets-db-ro")).data["username"] for t in (first, second)}
            async with busy_revoking(site, logins[first.id]):
                answered = await agent.end_task(first.id)
            assert answered.revocation == "revoke_pending" and answered.pending == 1
            async with busy_revoking(site, logins[second.id]):
                waiting = asyncio.create_task(agent.end_task(second.id, wait=30))
                await asyncio.sleep(2.0)  # past the end's confirmation window: the SDK is polling now
                assert not waiting.done()
            waited = await waiting
            assert waited.revocation == "revoked" and waited.pending == 0


class TestRetryRevokesWhatTheTreeMissed:
    async def test_a_child_token_outside_the_tasks_tree_is_revoked_by_its_accessor_on_the_retry(
            self, site: BrokerSite, aiohttp_client: Any, admin: VaultClient, hvac_admin: Any) -> None:
        """A child token that revoking the task token does not reach (Vault lost its parent link: a revocation
        cut short by the active node's death) is revoked by its own accessor when the maintenance loop tries
        again; the task is then confirmed revoked, and Vault no longer has the token."""
        client = await aiohttp_client(make_app(quick(site)))
        task = await start_task(client, site)
        cred = await credential(client, site, task["id"], "child-token")
        # Stand-in for the lost parent link: the lease now names an orphan token, which no tree holds.
        orphan = await asyncio.to_thread(hvac_admin.create_token, policies=["default"], ttl="10m", no_parent=True)
        store = client.app[STORE]

        def point_at_orphan() -> None:
            with store._tx() as conn:
                conn.exec_driver_sql("UPDATE leases SET vault_lease_id = ? WHERE id = ?",
                                     (orphan.accessor, cred["lease_id"]))
        await store._run(point_at_orphan)

        resp = await client.post(f"/v1/tasks/{task['id']}/end", headers=bearer(site.ids.agent()))
        assert resp.status == 202, await resp.text()  # the tree did not take it: not confirmed yet
        await revoked_view(client, site, task["id"])
        assert await admin.lookup_accessor(orphan.accessor) is None


class TestRestartTakesOverADeadEndersClaim:
    async def test_a_restarted_broker_revokes_at_once_what_the_dead_one_had_fenced(
            self, site: BrokerSite, aiohttp_client: Any, admin: VaultClient) -> None:
        """An ender that dies right after its fence leaves the task claimed for ``FENCE_CLAIM`` (so that no
        other replica revokes beside a live ender): the broker that fenced it leaves it alone meanwhile. On
        SQLite the next broker is the only one, so its first maintenance pass takes the dead one's claim
        over: the lease is gone in Vault seconds after the restart, not a minute later."""
        first = await aiohttp_client(make_app(quick(site)))
        task = await start_task(first, site)
        cred = await credential(first, site, task["id"], "tickets-db-ro")
        store = first.app[STORE]
        row = await store.get_lease(cred["lease_id"])
        assert row is not None
        # What `POST /end` commits before it revokes: broker.tasks' end.after_fence crash point.
        await store.fence_tasks([task["id"]], event=TaskEvent.END, now=time.time(), records=[])
        await asyncio.sleep(1.5)  # several maintenance ticks of the fencing broker: its claim holds
        assert await admin.lookup_lease(row.vault_lease_id) is not None
        await first.close()

        restarted = await aiohttp_client(make_app(quick(site)))
        started = time.monotonic()
        view = await revoked_view(restarted, site, task["id"])
        assert time.monotonic() - started < FENCE_CLAIM / 3
        assert [x["state"] for x in view["leases"]] == ["revoked"]
        assert await admin.lookup_lease(row.vault_lease_id) is None
