"""The same broker on a PostgreSQL store (the scale-out option): migrations, the task flow, revocation."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.api import STORE
from broker.app import make_app
from broker.audit import AuditRecord
from broker.audit.checkpoints import Checkpointer, StoreVerifier
from broker.audit.verify import VerifyReport
from broker.config import load_settings
from broker.intents import IntentEvent, IntentState
from broker.store import Intent, Person, open_store
from broker.vault import VaultClient
from tests.api.test_revocation import can_login, revoke
from tests.api.test_task_flow import credential, end, start_task
from tests.conftest import USER, BrokerSite
from tests.support.pg import scratch_database


@pytest_asyncio.fixture
async def pg_client(site: BrokerSite, aiohttp_client: Callable[..., Any]) -> AsyncIterator[Any]:
    pg = site.engines.pg
    async with scratch_database(pg) as name:
        settings = load_settings({"BROKER_STORE_URL": pg.dsn(name)}, site.root / "broker.toml")
        client = await aiohttp_client(make_app(settings))
        yield client
        await client.close()


class TestPostgresStore:
    async def test_task_flow_and_revocation(self, pg_client: Any, site: BrokerSite, admin: VaultClient) -> None:
        """Start, issue, end and revoke by user work on PostgreSQL exactly as on SQLite."""
        client = pg_client
        task = await start_task(client, site)
        cred = await credential(client, site, task["id"], "tickets-db-ro")
        assert await can_login(site, cred["data"])
        assert (await end(client, site, task["id"]))["revoked"] == 1
        assert not await can_login(site, cred["data"])

        other = await start_task(client, site)
        cred2 = await credential(client, site, other["id"], "agent-cert")
        out = await revoke(client, site, user=USER)
        assert (out["tasks"], out["revoked"], out["state"]) == (1, 1, "done")
        row = await client.app[STORE].get_lease(cred2["lease_id"])
        assert row is not None and row.state == "revoked"
        assert await admin.lookup_lease(row.vault_lease_id) is None
        events = [r.record.event for r in await client.app[STORE].query_audit(limit=100)]
        assert events.count("lease.issued") == 2 and events.count("lease.revoked") == 2

    async def test_intent_retries_and_write_probe(self, pg_client: Any) -> None:
        """The intent table's compare-and-set, the due-intent query and readiness's write probe on PostgreSQL."""
        store = pg_client.app[STORE]
        # Real times, far enough ahead that the app's own maintenance loop leaves this intent alone.
        t = time.time()
        intent = Intent(id="lse_pg_retry", kind="lease", task_id="tsk_none", grant="g", accessor="acc", created_at=t)
        await store.begin_task(intent, user=Person("https://idp#u", "u", None), agent="a", tenant="t")
        assert await store.move_intent(intent.id, from_state=IntentState.OPEN, event=IntentEvent.ABANDONED, now=t,
                                       next_attempt_at=t + 3600)
        assert not await store.move_intent(intent.id, from_state=IntentState.OPEN, event=IntentEvent.RECORDED, now=t)
        assert [i.id for i in await store.intents_due(now=t + 1200, open_before=t - 60)] == []
        assert await store.move_intent(intent.id, from_state=IntentState.ABORTING,
                                       event=IntentEvent.CLEANUP_FAILED, now=t, attempts=1, next_attempt_at=t + 600)
        due = await store.intents_due(now=t + 1200, open_before=t - 60)
        assert [(i.id, i.state, i.attempts) for i in due] == [(intent.id, "aborting", 1)]
        assert await store.move_intent(intent.id, from_state=IntentState.ABORTING,
                                       event=IntentEvent.VAULT_CONFIRMED, now=t)
        assert await store.intents_due(now=t + 1200, open_before=t - 60) == []
        await store.probe_write(now=t)
        await store.probe_write(now=t + 1)
        health = await pg_client.get("/v1/health")
        assert health.status == 200 and (await health.json())["store"] == "ok"


class TestPostgresVerify:
    async def test_parallel_verify_reads_postgres(self, site: BrokerSite, caplog: pytest.LogCaptureFixture) -> None:
        """The parallel verifier's workers read PostgreSQL: the same report as one pass, clean and tampered."""
        key = Ed25519PrivateKey.generate()
        clock = [1_795_877_000.0]
        async with scratch_database(site.engines.pg) as name:
            store = await open_store(site.engines.pg.dsn(name))
            try:
                checkpointer = Checkpointer(store=store, key=key, origin="pg", every=40, interval=1e9, witness_file=None,
                                            clock=lambda: clock[0])
                for i in range(1, 301):
                    clock[0] += 1
                    await store.append_audit(AuditRecord(clock[0], "access.denied", "denied", user=f"u{i}",
                                                         reason="r" * (i % 7), caller_address=None))
                    await checkpointer.maybe_checkpoint()

                async def both() -> tuple[VerifyReport, VerifyReport]:
                    one = await StoreVerifier(store, key.public_key(), "pg").verify()
                    parallel = await StoreVerifier(store, key.public_key(), "pg", parallel_from=0, workers=2,
                                                   stretch=50).verify()
                    return one, parallel

                one, parallel = await both()
                assert one.ok and one.records == 300 and one.checkpoints >= 5
                assert parallel == one

                def tamper() -> None:
                    with store._tx() as conn:
                        conn.exec_driver_sql("UPDATE audit_events SET reason = 'x' WHERE seq = 77")
                await store._run(tamper)
                one, parallel = await both()
                assert (one.ok, one.first_bad_seq) == (False, 77)
                assert parallel == one
                assert "verifying in this process" not in caplog.text  # the workers did read it
            finally:
                await store.close()
