"""The SSF transmitter's rules, without sockets: the delivery table through the store, how a receiver's answer
is read, the retry bounds, the SET's claims and signature, the keys and JWKS, the configuration's URL rules,
and the enqueue that commits with a task's end."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc import jws
from joserfc.jwk import ECKey, KeySet, RSAKey
from sqlalchemy import insert, select

from broker.app import _authorization
from broker.audit import AuditRecord
from broker.audit.ocsf import to_ocsf
from broker.config import SignalReceiver, SignalsSettings, load_settings
from broker.errors import ConfigError
from broker.signals.deliveries import (
    DELIVERIES,
    Accepted,
    DeliveryEvent,
    DeliveryState,
    Rejected,
    Transient,
    plan_retry,
    read_answer,
)
from broker.signals.events import SESSION_REVOKED, RevokedSession, encode_set, session_revoked_claims
from broker.signals.keys import jwks, load_public_key_file, load_signing_key, public_jwk, thumbprint
from broker.signals.transmitter import Transmitter
from broker.states import TaskEvent, TransitionError
from broker.store import Store, open_store
from broker.store.schema import signal_deliveries, tasks

NOW = 1_800_000_000.0
TASK = "tsk_t"
AGENT = "spiffe://example.org/agent/support-1"
PERSON = "https://idp.example#alice"


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_store(f"sqlite:///{tmp_path / 's.db'}")
    yield s
    await s.close()


def _write(store: Store, statement: Any) -> None:
    with store._engine.begin() as conn:  # test set-up: place a row in its starting state
        conn.execute(statement)


def place_task(store: Store, state: str = "active") -> None:
    _write(store, insert(tasks).values(
        id=TASK, user=PERSON, agent=AGENT, role="r", tenant="acme", reason="x", created_at=NOW, expires_at=NOW + 600,
        state=state, ended_at=None, token_accessor="acc", sealed_token=b"\0", token_state="live"))


def place_delivery(store: Store, state: str, *, next_attempt_at: float | None = NOW) -> None:
    _write(store, insert(signal_deliveries).values(
        id="set_1", receiver="gw", event="session-revoked", task_id=TASK, initiator="user", reason="r",
        occurred_at=NOW, created_at=NOW, state=state, attempts=0, next_attempt_at=next_attempt_at))


def delivery_state(store: Store) -> str:
    with store._engine.connect() as conn:
        return str(conn.execute(select(signal_deliveries.c.state)).scalar_one())


def es256_file(path: Path, *, mode: int = 0o600, key: Any = None) -> Path:
    key = key or ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(mode)
    return path


def session(**kw: Any) -> RevokedSession:
    base: dict[str, Any] = dict(jti="set_abc", issuer="https://broker.example", audience="https://gw.example",
                                issued_at=NOW + 0.7, task=TASK, task_state="ended", user=PERSON, agent=AGENT,
                                tenant="acme", revoked_at=NOW + 0.5, initiator="user", reason="by alice")
    base.update(kw)
    return RevokedSession(**base)


class TestDeliveryTable:
    def test_every_event_has_one_target_and_final_states_never_move(self) -> None:
        """One UPDATE carries any event; delivered and failed are final."""
        for event in DeliveryEvent:
            assert DELIVERIES.target(event) in DeliveryState
        assert DELIVERIES.final == {DeliveryState.DELIVERED, DeliveryState.FAILED}

    @pytest.mark.parametrize(("state", "event"), list(itertools.product(DeliveryState, DeliveryEvent)))
    async def test_every_pair_through_the_store(self, store: Store, state: DeliveryState,
                                                event: DeliveryEvent) -> None:
        """The store's claim and settle move a delivery exactly as DELIVERIES says, and refuse every other pair
        (a settle also only with the claim it took: ``next_attempt_at`` as the claim left it)."""
        place_task(store, "ended")
        place_delivery(store, state.value)
        record = AuditRecord(NOW, "signal.failed", "failure", task=TASK)
        if event is DeliveryEvent.CLAIMED:
            moved = await store.claim_signal("set_1", now=NOW, until=NOW + 7)
        else:
            try:
                moved = await store.settle_signal("set_1", event, claimed_until=NOW, now=NOW, attempts=1,
                                                  record=record, next_attempt_at=NOW + 3)
            except TransitionError:
                moved = False
        if DELIVERIES.allows(state, event):
            assert moved and delivery_state(store) == DELIVERIES.next_state(state, event)
        else:
            assert not moved and delivery_state(store) == state

    async def test_one_claim_wins_and_a_lapsed_claim_is_taken_again(self, store: Store) -> None:
        """Two workers claim the same due delivery: one wins. Once its claim lapses, the other may take it, and
        the first can no longer settle it (nor write its audit record)."""
        place_task(store, "ended")
        place_delivery(store, "pending")
        assert await store.claim_signal("set_1", now=NOW, until=NOW + 7)
        assert not await store.claim_signal("set_1", now=NOW + 1, until=NOW + 8)
        assert [d.id for d in await store.signals_due(now=NOW + 6)] == []
        assert [d.id for d in await store.signals_due(now=NOW + 7)] == ["set_1"]
        assert await store.claim_signal("set_1", now=NOW + 7, until=NOW + 14)
        record = AuditRecord(NOW, "signal.delivered", "success", task=TASK)
        assert not await store.settle_signal("set_1", DeliveryEvent.ACCEPTED, claimed_until=NOW + 7, now=NOW + 8,
                                             attempts=1, record=record)
        assert [r.record.event for r in await store.query_audit(task=TASK)] == []
        assert await store.settle_signal("set_1", DeliveryEvent.ACCEPTED, claimed_until=NOW + 14, now=NOW + 8,
                                         attempts=1, record=record)
        assert [r.record.event for r in await store.query_audit(task=TASK)] == ["signal.delivered"]


class TestEnqueue:
    @pytest.mark.parametrize(("event", "initiator"), [(TaskEvent.END, "user"), (TaskEvent.EXPIRE, "policy"),
                                                      (TaskEvent.REVOKE, "system")])
    async def test_the_fence_writes_one_delivery_per_receiver(self, store: Store, event: TaskEvent,
                                                              initiator: str) -> None:
        """The transaction that ends a task writes one pending delivery per receiver, due at once, with the
        record's reason and who made it end; a second fence of the same task writes none."""
        place_task(store)
        store.signal_receivers = ("gw", "siem")
        rec = AuditRecord(NOW, "task.ended", "success", task=TASK, reason="by alice")
        assert await store.fence_tasks([TASK], event=event, now=NOW, records=[rec])
        assert not await store.fence_tasks([TASK], event=event, now=NOW + 1, records=[rec])
        rows = await store.list_signals(task_id=TASK)
        assert sorted(r.receiver for r in rows) == ["gw", "siem"]
        assert {(r.state, r.initiator, r.reason, r.next_attempt_at, r.occurred_at, r.agent, r.user) for r in rows} == {
            ("pending", initiator, "by alice", NOW, NOW, AGENT, PERSON)}
        assert len({r.id for r in rows}) == 2

    async def test_no_receivers_no_rows(self, store: Store) -> None:
        """Without receivers a task's end writes no delivery."""
        place_task(store)
        assert await store.fence_tasks([TASK], event=TaskEvent.END, now=NOW, records=[])
        assert await store.list_signals() == []


class TestAnswers:
    def test_only_202_is_a_delivery(self) -> None:
        """RFC 8935 section 2.2: 202 Accepted; a 200 or 204 is not the receiver's acknowledgement."""
        assert read_answer(202, "", b"") == Accepted()
        for status in (200, 201, 204):
            assert isinstance(read_answer(status, "application/json", b"{}"), Transient)

    def test_a_400_with_err_is_a_refusal(self) -> None:
        """Section 2.3: 400 with {err, description} is final; the description is cut to printable text."""
        body = json.dumps({"err": "invalid_key", "description": "unknown kid\n\x00" + "x" * 500}).encode()
        answer = read_answer(400, "application/json; charset=utf-8", body)
        assert isinstance(answer, Rejected) and answer.err == "invalid_key"
        assert len(answer.description) == 200 and "\n" not in answer.description

    @pytest.mark.parametrize(("status", "ctype", "body"), [
        (400, "text/html", b"<h1>bad request</h1>"),
        (400, "application/json", b"{\"error\": \"x\"}"),
        (400, "application/json", b"{\"err\": \"has space and more\"}"),
        (400, "application/json", b"not json"),
        (401, "application/json", b"{\"err\": \"authentication_failed\"}"),
        (500, "", b""), (503, "", b""), (302, "", b""), (307, "", b""),
    ])
    def test_everything_else_is_retried(self, status: int, ctype: str, body: bytes) -> None:
        """A 400 that is not the RFC's error object (a proxy's), an auth failure, a 5xx, a redirect: retried."""
        answer = read_answer(status, ctype, body)
        assert isinstance(answer, Transient) and f"HTTP {status}" in answer.what


class TestRetryPlan:
    def test_backoff_grows_with_jitter_up_to_the_cap(self) -> None:
        """From about 1 s, doubling, jittered into [0.5, 1) of the step, never over max_backoff."""
        for attempts, lo, hi in ((1, 0.5, 1.0), (2, 1.0, 2.0), (3, 2.0, 4.0), (20, 30.0, 60.0)):
            for rand in (0.0, 0.999):
                plan = plan_retry(attempts=attempts, created_at=NOW, now=NOW, max_attempts=50, max_age=1e6,
                                  max_backoff=60, rand=rand)
                assert plan.at is not None and lo <= plan.at - NOW < hi

    def test_attempts_and_age_are_bounded(self) -> None:
        """No next attempt once max_attempts are spent, or when it would come after max_age."""
        assert plan_retry(attempts=5, created_at=NOW, now=NOW, max_attempts=5, max_age=1e6, max_backoff=60,
                          rand=0.5).at is None
        late = plan_retry(attempts=2, created_at=NOW, now=NOW + 99.5, max_attempts=50, max_age=100, max_backoff=60,
                          rand=0.5)
        assert late.at is None and "older than 100 s" in late.why


class TestSet:
    def test_claims(self) -> None:
        """RFC 8417 / SSF 1.0 / CAEP 1.0: iss, aud, iat, jti, txn, complex sub_id, one session-revoked event;
        no sub and no exp."""
        claims = session_revoked_claims(session())
        assert claims == {
            "iss": "https://broker.example", "aud": "https://gw.example", "iat": int(NOW), "jti": "set_abc",
            "txn": f"{TASK}/ended",
            "sub_id": {"format": "complex", "session": {"format": "opaque", "id": TASK},
                       "user": {"format": "iss_sub", "iss": "https://idp.example", "sub": "alice"},
                       "application": {"format": "uri", "uri": AGENT},
                       "tenant": {"format": "opaque", "id": "acme"}},
            "events": {SESSION_REVOKED: {"event_timestamp": int(NOW), "initiating_entity": "user",
                                         "reason_admin": {"en": "by alice"}}},
        }

    def test_a_subject_with_hash_and_a_legacy_user(self) -> None:
        """The subject after the issuer's '#' is kept verbatim; a pre-person-id name is an opaque user."""
        assert session_revoked_claims(session(user="https://idp.example#a#b"))["sub_id"]["user"] == {
            "format": "iss_sub", "iss": "https://idp.example", "sub": "a#b"}
        assert session_revoked_claims(session(user="alice"))["sub_id"]["user"] == {"format": "opaque", "id": "alice"}

    def test_no_reason_no_reason_admin(self) -> None:
        assert "reason_admin" not in session_revoked_claims(session(reason=""))["events"][SESSION_REVOKED]

    @pytest.mark.parametrize("kind", ["ec", "rsa"])
    def test_signed_with_typ_and_kid(self, tmp_path: Path, kind: str) -> None:
        """The header is typ secevent+jwt with the key's alg and thumbprint kid; it verifies with the JWKS key."""
        priv = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
        key = load_signing_key(es256_file(tmp_path / "k.pem", key=priv))
        token = encode_set(session_revoked_claims(session()), key)
        header = jwt.get_unverified_header(token)
        assert header == {"alg": "ES256" if kind == "ec" else "RS256", "typ": "secevent+jwt", "kid": key.kid}
        jwk = jwks(key)["keys"][0]
        pub = jwt.PyJWK(jwk).key
        claims = jwt.decode(token, pub, algorithms=[key.alg], audience="https://gw.example",
                            options={"verify_iat": False})  # NOW is a fixed future instant
        assert claims["jti"] == "set_abc"
        # And with joserfc, from the JWKS document alone, as a receiver in another stack would.
        obj = jws.deserialize_compact(token, KeySet.import_key_set(jwks(key)), algorithms=[key.alg])
        assert json.loads(obj.payload) == claims


class TestKeys:
    @pytest.mark.parametrize("kind", ["ec", "rsa"])
    def test_kid_is_the_rfc7638_thumbprint(self, kind: str) -> None:
        """Our thumbprint agrees with joserfc's RFC 7638 implementation (an independent one)."""
        priv = ec.generate_private_key(ec.SECP256R1()) if kind == "ec" else rsa.generate_private_key(65537, 2048)
        pem = priv.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        theirs = (ECKey if kind == "ec" else RSAKey).import_key(pem).thumbprint()
        assert thumbprint(priv.public_key()) == theirs == public_jwk(priv.public_key())["kid"]

    @pytest.mark.parametrize(("key", "says"), [
        (ec.generate_private_key(ec.SECP384R1()), "P-256"),
        (rsa.generate_private_key(65537, 1024), "2048"),  # noqa: S505 -- the weak key is the point
        (ed25519.Ed25519PrivateKey.generate(), "EC P-256"),
    ], ids=["p384", "rsa1024", "ed25519"])
    def test_other_keys_are_refused(self, tmp_path: Path, key: Any, says: str) -> None:
        with pytest.raises(ConfigError, match=says):
            load_signing_key(es256_file(tmp_path / "k.pem", key=key))

    def test_a_key_others_can_read_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="chmod 600"):
            load_signing_key(es256_file(tmp_path / "k.pem", mode=0o644))

    def test_jwks_publishes_retired_keys_after_the_current_one(self, tmp_path: Path) -> None:
        """Rotation: the signing key first, then each retired key once (public halves only)."""
        current = load_signing_key(es256_file(tmp_path / "new.pem"))
        old = ec.generate_private_key(ec.SECP256R1())
        pub_file = tmp_path / "old.pub"
        pub_file.write_bytes(old.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
        retired = load_public_key_file(pub_file)
        doc = jwks(current, (retired, retired, current.key.public_key()))
        assert [k["kid"] for k in doc["keys"]] == [current.kid, thumbprint(old.public_key())]
        assert all(set(k) == {"kty", "crv", "x", "y", "kid", "alg", "use"} for k in doc["keys"])  # no "d"


class TestConfig:
    def _receiver(self, url: str, **kw: Any) -> SignalReceiver:
        return SignalReceiver.model_validate({"name": "gw", "url": url, **kw})

    @pytest.mark.parametrize("url", ["https://gw.example/caep", "http://127.0.0.1:9/x", "http://[::1]:9/x",
                                     "http://localhost:9/x"])
    def test_https_or_loopback_http(self, url: str) -> None:
        assert self._receiver(url).url == url

    @pytest.mark.parametrize("url", ["http://gw.example/caep", "http://127.evil.example/x", "ftp://gw.example/",
                                     "https://user:pw@gw.example/x", "https://gw.example/x#f", "https:///x"])
    def test_anything_else_is_refused(self, url: str) -> None:
        with pytest.raises(ValueError, match="receiver's url"):
            self._receiver(url)

    def test_audience_defaults_to_the_origin(self) -> None:
        assert self._receiver("https://gw.example:8443/caep/events?x=1").aud == "https://gw.example:8443"
        assert self._receiver("https://gw.example/c", audience="urn:gw").aud == "urn:gw"

    def test_receivers_need_issuer_and_key_and_unique_names(self, tmp_path: Path) -> None:
        gw = {"name": "gw", "url": "https://gw.example/c"}
        with pytest.raises(ValueError, match=r"need signals\.issuer"):
            SignalsSettings.model_validate({"receivers": [gw]})
        with pytest.raises(ValueError, match="unique"):
            SignalsSettings.model_validate({"issuer": "https://b.example", "signing_key_file": str(tmp_path / "k"),
                                            "receivers": [gw, gw]})

    @pytest.mark.parametrize("issuer", ["https://b.example/ssf", "https://b.example?x=1", "http://b.example"])
    def test_issuer_is_an_https_origin(self, issuer: str) -> None:
        with pytest.raises(ValueError, match=r"signals\.issuer"):
            SignalsSettings.model_validate({"issuer": issuer})

    def test_issuer_trailing_slash_is_dropped(self) -> None:
        """The issuer is every SET's iss and must equal what the metadata says, byte for byte."""
        assert SignalsSettings.model_validate({"issuer": "https://b.example/"}).issuer == "https://b.example"


class TestOcsf:
    def test_signal_records_map_to_api_activity_on_the_receiver(self) -> None:
        """signal.delivered / signal.failed are API Activity Create on a broker.receiver resource."""
        rec = AuditRecord(NOW, "signal.failed", "failure", task=TASK, agent=AGENT, resource="receiver:gw",
                          action="signal.push", reason="HTTP 500; retry in 1.0 s")
        event = to_ocsf(rec, 9)
        assert (event["activity_id"], event["status_id"]) == (1, 2)
        assert event["resources"] == [{"name": "gw", "type": "broker.receiver", "uid": "receiver:gw"}]


class TestLoading:
    def test_relative_paths_are_the_config_files(self, tmp_path: Path) -> None:
        """[signals] key files and a receiver's authorization_file are relative to the configuration file."""
        cfg = tmp_path / "broker.toml"
        cfg.write_text(
            '[server]\naudience = "a"\n[vault]\ntoken_file = "t"\n[store]\nkey_file = "k"\n'
            '[signals]\nissuer = "https://b.example"\nsigning_key_file = "ssf.pem"\nretired_key_files = ["old.pem"]\n'
            '[[signals.receivers]]\nname = "gw"\nurl = "https://gw.example/caep"\nauthorization_file = "gw-auth"\n')
        sig = load_settings({}, cfg).signals
        assert sig.signing_key_file == tmp_path / "ssf.pem" and sig.retired_key_files == (tmp_path / "old.pem",)
        assert sig.receivers[0].authorization_file == tmp_path / "gw-auth"
        assert sig.receivers[0].events == ("session-revoked",) and sig.receivers[0].aud == "https://gw.example"

    def test_a_plain_http_receiver_stops_the_start_and_says_why(self, tmp_path: Path) -> None:
        cfg = tmp_path / "broker.toml"
        cfg.write_text('[server]\naudience = "a"\n[vault]\ntoken_file = "t"\n[store]\nkey_file = "k"\n'
                       '[signals]\nissuer = "https://b.example"\nsigning_key_file = "ssf.pem"\n'
                       '[[signals.receivers]]\nname = "gw"\nurl = "http://gw.example/caep"\n')
        with pytest.raises(ConfigError, match="acknowledged and dropped"):
            load_settings({}, cfg)

    @pytest.mark.parametrize(("text", "mode", "says"), [
        ("Bearer abc\n", 0o644, "chmod 600"),
        ("\n", 0o600, "one non-empty line"),
        ("Bearer abc\nX-Injected: 1\n", 0o600, "one non-empty line"),
    ])
    def test_authorization_file(self, tmp_path: Path, text: str, mode: int, says: str) -> None:
        """The header value is one line from a file only its owner reads (a second line would be a header)."""
        path = tmp_path / "auth"
        path.write_text(text)
        path.chmod(mode)
        with pytest.raises(ConfigError, match=says):
            _authorization(path)

    def test_authorization_value_is_kept_sensitive(self, tmp_path: Path) -> None:
        path = tmp_path / "auth"
        path.write_text("Bearer abc\n")
        path.chmod(0o600)
        value = _authorization(path)
        assert value is not None and value.reveal() == "Bearer abc" and "abc" not in repr(value)


class TestWorker:
    async def test_a_receiver_no_longer_configured_gets_nothing(self, store: Store, tmp_path: Path) -> None:
        """Deliveries for a receiver taken out of the configuration end failed, audited, without a push."""
        place_task(store)
        store.signal_receivers = ("gone",)
        assert await store.fence_tasks([TASK], event=TaskEvent.END, now=NOW, records=[])
        key = load_signing_key(es256_file(tmp_path / "k.pem"))
        async with aiohttp.ClientSession() as http:
            transmitter = Transmitter(store=store, session=http, issuer="https://b.example", key=key, receivers={},
                                      clock=lambda: NOW + 1, max_attempts=5, max_age=60, max_backoff=10,
                                      poll_interval=1)
            assert await transmitter.tick() == 0
        [row] = await store.list_signals(task_id=TASK)
        assert row.state == "failed" and row.attempts == 1
        [record] = [r.record for r in await store.query_audit(task=TASK) if r.record.event.startswith("signal.")]
        assert record.event == "signal.failed" and "no longer configured" in (record.reason or "")
