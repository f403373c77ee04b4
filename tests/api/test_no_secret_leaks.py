"""No password, private key, Vault token or bearer token ends up in the broker's logs, store or audit rows."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from broker.api import STORE
from broker.sealing import TokenSealer
from tests.api.test_task_flow import credential, end, start_task
from tests.conftest import BrokerSite, bearer
from tests.support.engines import ExternalEngines

Client = TestClient[Any, Any]


class TestNoSecretLeaks:
    async def test_secrets_appear_in_no_log_store_or_audit_row(
        self, client: Client, site: BrokerSite, caplog: pytest.LogCaptureFixture, tmp_path: Path
    ) -> None:
        """After a full task (three credentials, a refusal, a renewal, an end), grep every sink for every secret."""
        caplog.set_level(logging.DEBUG)
        task = await start_task(client, site)
        db = await credential(client, site, task["id"], "tickets-db-ro")
        cert = await credential(client, site, task["id"], "agent-cert")
        child = await credential(client, site, task["id"], "child-token")
        await credential(client, site, task["id"], "tickets-db-rw", status=403)
        svid, user_token = site.ids.agent(), site.ids.user()
        resp = await client.post(f"/v1/leases/{db['lease_id']}/renew", json={}, headers=bearer(svid))
        assert resp.status == 200
        # A bad request carrying something token-shaped must not be echoed or logged either.
        await client.post("/v1/tasks", json={"agent": "x", "role": "support-triage", "ttl": 60,
                                             "reason": "s.ZZZZZZZZZZZZZZZZZZZZZZZZ"}, headers=bearer(user_token))
        row = await client.app[STORE].get_task(task["id"])
        assert row is not None
        task_token = TokenSealer.from_file(site.root / "store.key").open(row.sealed_token, task_id=row.id).reveal()
        await end(client, site, task["id"])

        secrets = {
            "database password": db["data"]["password"],
            "certificate private key": cert["data"]["private_key"].splitlines()[1],
            "child token": child["data"]["token"],
            "task token": task_token,
            "agent SVID": svid,
            "user ID token": user_token,
            "broker Vault token": (site.root / "vault-token").read_text().strip(),
        }
        records = await client.app[STORE].query_audit(limit=1000)
        assert len(records) >= 8
        sinks = {
            "logs": caplog.text,
            "audit rows": "\n".join(repr(r.record) for r in records),
            "store file": _store_bytes(site),
        }
        leaks = [(what, where) for what, value in secrets.items() for where, text in sinks.items() if value in text]
        assert leaks == []
        assert task_token.startswith("s.") and len(task_token) > 20  # the probe is a real token

    async def test_new_engines_secrets_appear_nowhere(self, client: Client, site: BrokerSite,
                                                      caplog: pytest.LogCaptureFixture,
                                                      external_engines: ExternalEngines) -> None:
        """MariaDB, Redis and RabbitMQ passwords and a KV value: in no log line, audit row or store byte."""
        caplog.set_level(logging.DEBUG)
        task = await start_task(client, site, role="engines")
        creds = {g: await credential(client, site, task["id"], g) for g in ("app-db-ro", "cache-rw", "queue", "api-key")}
        await end(client, site, task["id"])
        secrets = {f"{g} password": c["data"]["password"] for g, c in creds.items() if "password" in c["data"]}
        secrets["KV value"] = creds["api-key"]["data"]["api_key"]
        assert len(secrets) == 4
        records = await client.app[STORE].query_audit(limit=1000)
        sinks = {"logs": caplog.text, "audit rows": "\n".join(repr(r.record) for r in records),
                 "store file": _store_bytes(site)}
        assert [(what, where) for what, value in secrets.items() for where, text in sinks.items()
                if value in text] == []


def _store_bytes(site: BrokerSite) -> str:
    url = site.settings.store.url
    path = Path(url.removeprefix("sqlite:///"))
    data = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    return data.decode("latin-1")
