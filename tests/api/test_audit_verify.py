"""``GET /v1/audit/verify`` and ``broker audit verify`` over a real task flow, before and after tampering."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from broker.app import make_app
from broker.audit.signing import load_public_key, load_signing_key, public_key_pem
from broker.cli import main
from broker.config import Settings
from tests.api.test_task_flow import credential, end, start_task
from tests.conftest import BrokerSite, bearer

Client = TestClient[Any, Any]
AUDITOR = ("audrey@example.com", ("audit",))


def with_witness(settings: Settings, witness: Path) -> Settings:
    audit = settings.audit.model_copy(update={"witness_file": witness, "checkpoint_interval": 0.5})
    return settings.model_copy(update={"audit": audit})


async def verify(client: Client, site: BrokerSite) -> dict[str, Any]:
    resp = await client.get("/v1/audit/verify", headers=bearer(site.ids.user(*AUDITOR)))
    assert resp.status == 200, await resp.text()
    return await resp.json()  # type: ignore[no-any-return]


async def cli(*args: str) -> tuple[int, str]:
    result = await asyncio.to_thread(CliRunner().invoke, main, list(args))
    return result.exit_code, result.output


class TestAuditVerify:
    async def test_flow_verifies_then_tampering_is_found(self, site: BrokerSite, aiohttp_client: Any, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
        """After a task flow the log verifies with a signed, witnessed checkpoint; an edited row is named."""
        witness = tmp_path / "witness.txt"
        client: Client = await aiohttp_client(make_app(with_witness(site.settings, witness)))
        task = await start_task(client, site)
        await credential(client, site, task["id"], "agent-cert")
        await end(client, site, task["id"])
        deadline = time.monotonic() + 15
        while (out := await verify(client, site))["checkpoints"] < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.3)  # the maintenance loop signs the head within a tick or two
        assert out["ok"] is True and out["first_bad_seq"] is None
        assert out["records"] >= 3 and out["checkpoints"] >= 1 and out["witnessed"] >= 1

        monkeypatch.setenv("BROKER_STORE_URL", site.settings.store.url)
        config = str(site.root / "broker.toml")
        code, text = await cli("audit", "verify", "--config", config, "--witness", str(witness))
        assert code == 0, text
        assert "result         ok" in text

        db = site.settings.store.url.removeprefix("sqlite:///")
        with sqlite3.connect(db) as con:
            con.execute("UPDATE audit_events SET user = 'x' WHERE seq = 3")
        out = await verify(client, site)
        assert (out["ok"], out["first_bad_seq"]) == (False, 3)
        assert "does not match its hash" in out["reason"]

        code, text = await cli("audit", "verify", "--config", config, "--witness", str(witness))
        assert code == 1
        assert "first bad seq  3" in text and "FAILED" in text

    async def test_auditors_only(self, client: Client, site: BrokerSite) -> None:
        """A user who is not an auditor gets 403; no token gets 401."""
        resp = await client.get("/v1/audit/verify", headers=bearer(site.ids.user()))
        assert resp.status == 403
        assert (await resp.json())["code"] == "denied"
        assert (await client.get("/v1/audit/verify")).status == 401

    async def test_public_key_command(self, site: BrokerSite) -> None:
        """`broker audit public-key` prints the PEM of the configured signing key."""
        code, text = await cli("audit", "public-key", "--config", str(site.root / "broker.toml"))
        assert code == 0, text
        key = load_signing_key(site.root / "audit-signing.key").public_key()
        pem = text[text.index("-----BEGIN"):text.index("-----END PUBLIC KEY-----") + 24] + "\n"
        assert pem == public_key_pem(key)
        assert load_public_key(pem.encode()) == key


class TestVerifyAgainstVaultLog:
    async def test_every_task_token_request_is_in_the_chain(self, client: Client, site: BrokerSite,
                                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """--vault-log: every request Vault logged for this store's task tokens is in the chain; a forged one is not."""
        import json

        from tests.api.test_vault_merge import tailer_started, window

        start = await tailer_started(client)
        task = await start_task(client, site)
        await credential(client, site, task["id"], "agent-cert")
        await end(client, site, task["id"])
        vault_log = site.engines.bao.audit_log
        mine = [e for e in window(vault_log, start) if e.get("type") == "response"
                and ((e.get("auth") or {}).get("metadata") or {}).get("task") == task["id"]]
        assert len(mine) >= 3  # task token renew, issuance token create, the read, ...
        monkeypatch.setenv("BROKER_STORE_URL", site.settings.store.url)
        config = str(site.root / "broker.toml")
        deadline = time.monotonic() + 15
        while True:
            code, text = await cli("audit", "verify", "--config", config, "--vault-log", str(vault_log))
            if code == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
        assert code == 0, text
        assert f"{len(mine)} task-token requests, 0 missing" in text or "0 missing from the chain" in text

        forged = dict(mine[-1], request=dict(mine[-1]["request"], id="00000000-dead-beef-0000-000000000000"))
        extra = tmp_path / "forged.log"
        extra.write_text(json.dumps(forged) + "\n")
        code, text = await cli("audit", "verify", "--config", config, "--vault-log", str(vault_log),
                               "--vault-log", str(extra))
        assert code == 1 and "1 missing from the chain" in text and "dead-beef" in text
