"""The SSF transmitter end to end: tasks end against the real OpenBao, and a receiver on loopback gets the SETs.

The receiver is an aiohttp server on 127.0.0.1. It does what a receiver would: reads the broker's
``/.well-known/ssf-configuration`` over HTTP, fetches the JWKS its ``jwks_uri`` names, and verifies each
SET with joserfc (not PyJWT, which signs them), then checks every claim against what the task was.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws
from joserfc.jwk import KeySet

from broker.api import STORE
from broker.app import MAINTENANCE, make_app
from broker.config import Settings, SignalsSettings
from broker.signals.events import SESSION_REVOKED
from broker.store import Store, open_store
from tests.conftest import AGENT, IDP, USER, BrokerSite, bearer

Client = TestClient[Any, Any]
OPERATOR = ("olga@example.com", ("secops",))
AUTHORIZATION = "Bearer receiver-canary-7c1f0d"  # what the receiver wants in every push; never in a SET
_VAULT_TOKEN = re.compile(r"\b(?:hv[sbr]|[sbr])\.[A-Za-z0-9_-]{20,}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Receiver:
    """An RFC 8935 push endpoint on loopback: records each request, answers what ``answers`` says next."""

    port: int
    answers: list[tuple[int, dict[str, Any] | None]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/caep/events"

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append({"headers": dict(request.headers), "body": await request.text(),
                              "at": time.monotonic()})
        status, body = self.answers.pop(0) if self.answers else (202, None)
        if body is None:
            return web.Response(status=status)
        return web.json_response(body, status=status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/caep/events", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(port=free_port())
    await r.start()
    yield r
    await r.stop()


def ssf_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def with_signals(site: BrokerSite, tmp_path: Path, receiver: Receiver, broker_port: int, **extra: Any) -> Settings:
    auth = tmp_path / "receiver-auth"
    auth.write_text(AUTHORIZATION + "\n")
    auth.chmod(0o600)
    signals = SignalsSettings.model_validate({
        "issuer": f"http://127.0.0.1:{broker_port}",
        "signing_key_file": str(ssf_key(tmp_path / "ssf.key")),
        "receivers": [{"name": "gateway", "url": receiver.url, "audience": "https://gateway.example/caep",
                       "authorization_file": str(auth), "timeout": 2}],
        "poll_interval": 0.1, **extra})
    return site.settings.model_copy(update={"signals": signals})


@pytest_asyncio.fixture
async def broker_port() -> int:
    return free_port()


async def serve(settings: Settings, port: int, clock: Callable[[], float] = time.time) -> Client:
    client: Client = TestClient(TestServer(make_app(settings, clock=clock), host="127.0.0.1", port=port))
    await client.start_server()
    return client


async def start_task(client: Client, site: BrokerSite, ttl: str = "10m") -> str:
    resp = await client.post("/v1/tasks", json={"agent": AGENT, "role": "support-triage", "ttl": ttl,
                                                 "reason": "ticket 42"}, headers=bearer(site.ids.user()))
    assert resp.status == 201, await resp.text()
    return str((await resp.json())["id"])


async def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def receiver_keys(broker_url: str) -> tuple[dict[str, Any], KeySet]:
    """What a receiver does first: the transmitter's metadata, then the keys its jwks_uri names (over HTTP)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{broker_url}/.well-known/ssf-configuration") as resp:
            assert resp.status == 200 and resp.content_type == "application/json"
            meta = await resp.json()
        async with http.get(meta["jwks_uri"]) as resp:
            assert resp.status == 200
            jwks = await resp.json()
    return meta, KeySet.import_key_set(jwks)


def verified(token: str, keys: KeySet) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a SET whose signature verifies under ``keys`` (ES256 only)."""
    obj = jws.deserialize_compact(token, keys, algorithms=["ES256"])
    return dict(obj.headers()), json.loads(obj.payload)


async def audit_of(store: Store, task: str, event: str) -> list[Any]:
    return [r.record for r in await store.query_audit(task=task, limit=1000) if r.record.event == event]


class TestDelivery:
    async def test_receiver_verifies_every_claim(self, site: BrokerSite, tmp_path: Path, receiver: Receiver,
                                                 broker_port: int) -> None:
        """A task ended by its user, one revoked by an operator and one that expired: three SETs, each signed
        with a key the JWKS publishes, typ secevent+jwt, every claim exactly what the task was, no sub/exp,
        and no secret anywhere in them; each delivery is a signal.delivered audit record naming its jti."""
        offset = [0.0]
        client = await serve(with_signals(site, tmp_path, receiver, broker_port), broker_port,
                             clock=lambda: time.time() + offset[0])
        try:
            store = client.app[STORE]
            ended, revoked, expired = (await start_task(client, site), await start_task(client, site),
                                       await start_task(client, site, ttl="60s"))
            cred = await client.post(f"/v1/tasks/{ended}/credentials", json={"grant": "tickets-db-ro"},
                                     headers=bearer(site.ids.agent()))
            assert cred.status == 200
            secret = (await cred.json())["data"]
            before, sent = time.time(), time.monotonic()
            assert (await client.post(f"/v1/tasks/{ended}/end", headers=bearer(site.ids.user()))).status == 200
            await wait_for(lambda: len(receiver.received) >= 1)
            latency = receiver.received[0]["at"] - sent
            print(f"task end request -> SET at the receiver: {latency * 1000:.0f} ms")
            assert latency < 5.0  # "at once": the fence wakes the worker; the end itself waits for Vault
            resp = await client.post("/v1/revocations", json={"task": revoked, "reason": "incident 7", "wait": 30},
                                     headers=bearer(site.ids.user(*OPERATOR)))
            assert resp.status == 200, await resp.text()
            offset[0] = 120.0  # past the third task's deadline; the maintenance loop expires it
            await client.app[MAINTENANCE].tick()
            await wait_for(lambda: len(receiver.received) >= 3)

            meta, keys = await receiver_keys(f"http://127.0.0.1:{broker_port}")
            assert meta == {"spec_version": "1_0", "issuer": f"http://127.0.0.1:{broker_port}",
                            "jwks_uri": f"http://127.0.0.1:{broker_port}/v1/signals/jwks.json",
                            "delivery_methods_supported": ["urn:ietf:rfc:8935"],
                            "critical_subject_members": ["application", "user"]}
            by_task: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
            for push in receiver.received:
                h = push["headers"]
                assert h["Content-Type"] == "application/secevent+jwt" and h["Accept"] == "application/json"
                assert h["Authorization"] == AUTHORIZATION
                header, claims = verified(push["body"], keys)
                by_task[claims["sub_id"]["session"]["id"]] = (header, claims)
                # No secret: not the credential, not the task token or its accessor, not the receiver's header.
                task_row = await store.get_task(claims["sub_id"]["session"]["id"])
                assert task_row is not None
                text = push["body"] + json.dumps(claims)
                for canary in (secret["password"], secret["username"], task_row.token_accessor, AUTHORIZATION,
                               "receiver-canary", "lse_"):
                    assert canary not in text, canary
                assert not _VAULT_TOKEN.search(text)
            assert set(by_task) == {ended, revoked, expired}

            jwks_kid = keys.keys[0].kid
            for task, initiator, state in ((ended, "user", "ended"), (revoked, "admin", "revoked"),
                                           (expired, "policy", "expired")):
                header, claims = by_task[task]
                assert header == {"alg": "ES256", "typ": "secevent+jwt", "kid": jwks_kid}
                row = await store.get_task(task)
                assert row is not None and row.ended_at is not None
                deliveries = await store.list_signals(task_id=task)
                assert [d.state for d in deliveries] == ["delivered"]
                issuer, _, subject = row.user.partition("#")
                assert issuer == IDP and subject == USER
                assert claims == {
                    "iss": f"http://127.0.0.1:{broker_port}",
                    "aud": "https://gateway.example/caep",
                    "iat": int(deliveries[0].created_at),
                    "jti": deliveries[0].id,
                    "txn": f"{task}/{state}",
                    "sub_id": {"format": "complex",
                               "session": {"format": "opaque", "id": task},
                               "user": {"format": "iss_sub", "iss": IDP, "sub": USER},
                               "application": {"format": "uri", "uri": AGENT},
                               "tenant": {"format": "opaque", "id": "acme"}},
                    "events": {SESSION_REVOKED: {"event_timestamp": int(row.ended_at),
                                                 "initiating_entity": initiator,
                                                 "reason_admin": claims["events"][SESSION_REVOKED]["reason_admin"]}},
                }
                assert before - 1 <= claims["iat"] <= time.time() + offset[0] + 1
                assert "sub" not in claims and "exp" not in claims
                records = await audit_of(store, task, "signal.delivered")
                assert len(records) == 1 and deliveries[0].id in (records[0].reason or "")
                assert records[0].resource == "receiver:gateway" and records[0].outcome == "success"
            reasons = {t: by_task[t][1]["events"][SESSION_REVOKED]["reason_admin"]["en"]
                       for t in (ended, revoked, expired)}
            assert "incident 7" in reasons[revoked] and reasons[expired] == "deadline reached"
            assert reasons[ended].startswith("by ")
            assert len({c["jti"] for _, c in by_task.values()}) == 3
        finally:
            await client.close()


class TestRetries:
    async def test_failures_then_a_restart_then_delivered(self, site: BrokerSite, tmp_path: Path,
                                                          receiver: Receiver, broker_port: int) -> None:
        """The receiver answers 500, then is down; the broker stops with the signal pending and starts again
        on the same store; the receiver comes back and the SET is delivered, with the same jti as every earlier
        attempt. Each failure and the delivery are audit records, in order."""
        settings = with_signals(site, tmp_path, receiver, broker_port, max_backoff=2)
        receiver.answers = [(500, None)]
        client = await serve(settings, broker_port)
        task = await start_task(client, site)
        store = client.app[STORE]
        assert (await client.post(f"/v1/tasks/{task}/end", headers=bearer(site.ids.user()))).status == 200
        await wait_for(lambda: len(receiver.received) == 1)
        await receiver.stop()  # down: the next attempt meets a refused connection
        failed = []
        deadline = time.monotonic() + 15
        while len(failed) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
            failed = await audit_of(store, task, "signal.failed")
        await client.close()  # the broker stops with the delivery pending
        reader = await open_store(settings.store.url)  # what an operator sees between the two brokers
        try:
            [pending] = await reader.list_signals(task_id=task)
        finally:
            await reader.close()
        # Pending; or sending, if the stop caught a push in flight (its claim lapses, the next broker takes it).
        assert pending.state in ("pending", "sending") and pending.attempts >= 2

        await receiver.start()
        client = await serve(settings, broker_port)
        try:
            store = client.app[STORE]
            await wait_for(lambda: len(receiver.received) == 2)
            await wait_for_state(store, task, "delivered")
            jtis = {json.loads(_payload(p["body"]))["jti"] for p in receiver.received}
            assert jtis == {pending.id}
            records = [r.record for r in await store.query_audit(task=task, limit=1000)
                       if r.record.event.startswith("signal.")]
            assert [r.event for r in records] == ["signal.failed"] * (len(records) - 1) + ["signal.delivered"]
            assert "HTTP 500" in (records[0].reason or "") and "retry in" in (records[0].reason or "")
            assert "could not reach the receiver" in (records[1].reason or "")
            metrics = await (await client.get("/metrics")).text()
            assert _sample(metrics, "broker_signals_delivered_total") == 1
        finally:
            await client.close()

    async def test_a_400_with_err_is_not_retried(self, site: BrokerSite, tmp_path: Path, receiver: Receiver,
                                                 broker_port: int) -> None:
        """RFC 8935 section 2.3: a 400 with an err object is the receiver refusing the SET: one attempt, the
        delivery failed, one signal.failed record with the err code, and no second push."""
        receiver.answers = [(400, {"err": "invalid_audience", "description": "not for us"})]
        client = await serve(with_signals(site, tmp_path, receiver, broker_port), broker_port)
        try:
            store = client.app[STORE]
            task = await start_task(client, site)
            assert (await client.post(f"/v1/tasks/{task}/end", headers=bearer(site.ids.user()))).status == 200
            await wait_for_state(store, task, "failed")
            await asyncio.sleep(2.5)  # longer than the first two backoffs: a retry would have come by now
            assert len(receiver.received) == 1
            [record] = await audit_of(store, task, "signal.failed")
            assert "invalid_audience: not for us" in (record.reason or "") and "not retried" in (record.reason or "")
            assert await audit_of(store, task, "signal.delivered") == []
            metrics = await (await client.get("/metrics")).text()
            assert _sample(metrics, "broker_signals_failed_total") == 1
            assert _sample(metrics, "broker_signals_retried_total") == 0
        finally:
            await client.close()


class TestPostgres:
    async def test_delivered_on_postgresql(self, site: BrokerSite, tmp_path: Path, receiver: Receiver,
                                           broker_port: int) -> None:
        """The same enqueue, claim and settle on a PostgreSQL store: a 503 then a 202, two records, one jti."""
        pg = site.engines.pg
        name = "broker_ssf_" + secrets.token_hex(4)
        async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as conn:
            await conn.execute(f'CREATE DATABASE "{name}"')
        try:
            settings = with_signals(site, tmp_path, receiver, broker_port, max_backoff=1)
            settings = settings.model_copy(update={"store": settings.store.model_copy(update={"url": pg.dsn(name)})})
            receiver.answers = [(503, None)]
            client = await serve(settings, broker_port)
            try:
                store = client.app[STORE]
                task = await start_task(client, site)
                assert (await client.post(f"/v1/tasks/{task}/end", headers=bearer(site.ids.user()))).status == 200
                await wait_for_state(store, task, "delivered")
                assert [r.event for r in [x.record for x in await store.query_audit(task=task, limit=100)]
                        if r.event.startswith("signal.")] == ["signal.failed", "signal.delivered"]
                assert len({json.loads(_payload(p["body"]))["jti"] for p in receiver.received}) == 1
            finally:
                await client.close()
        finally:
            async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as conn:
                await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


class TestMetadata:
    async def test_no_transmitter_without_signals(self, client: Client) -> None:
        """Without [signals] the broker is no transmitter: both documents are a 404 problem."""
        for path in ("/.well-known/ssf-configuration", "/v1/signals/jwks.json"):
            resp = await client.get(path)
            assert resp.status == 404 and resp.content_type == "application/problem+json"


def _payload(token: str) -> bytes:
    part = token.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


async def wait_for_state(store: Store, task: str, state: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rows = await store.list_signals(task_id=task)
        if rows and all(r.state == state for r in rows):
            return
        assert time.monotonic() < deadline, [r.state for r in rows]
        await asyncio.sleep(0.05)


def _sample(text: str, name: str) -> float | None:
    """One unlabelled sample's value in a Prometheus text scrape (``1`` and ``1.0`` alike)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return None
