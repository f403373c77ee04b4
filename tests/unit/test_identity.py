"""broker.identity: key sets, key sources, the pure SVID/ID-token checks and the async verifiers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from broker.dev.identities import DevIssuer
from broker.errors import ConfigError, InvalidIdentity
from broker.identity import (
    ALLOWED_ALGS,
    AgentIdentity,
    AgentVerifier,
    IssuerTrust,
    JwksKeySet,
    JwksUrlKeySource,
    Key,
    StaticKeySource,
    UserVerifier,
    load_key_source,
    svid_key_ref,
    verify_id_token,
    verify_svid,
)

NOW = 1_700_000_000.0
AUD = "agent-broker"
TD = "example.org"
SID = "spiffe://example.org/agent/support-1"
IDP = "https://idp.example.com"


def key_of(issuer: DevIssuer) -> Key:
    key = JwksKeySet.from_json(json.dumps(issuer.jwks())).get(issuer.kid)
    assert key is not None
    return key


@pytest.fixture(scope="module")
def spire() -> DevIssuer:
    return DevIssuer.generate(kid="spire-1")


@pytest.fixture(scope="module")
def idp() -> DevIssuer:
    return DevIssuer.generate(kid="idp-1")


def svid_ok(issuer: DevIssuer, token: str, **kw: Any) -> AgentIdentity:
    args: dict[str, Any] = {"trust_domain": TD, "audience": AUD, "now": NOW}
    args.update(kw)
    return verify_svid(token, key_of(issuer), **args)


def svid_reason(issuer: DevIssuer, token: str, **kw: Any) -> str:
    with pytest.raises(InvalidIdentity) as exc:
        svid_ok(issuer, token, **kw)
    return exc.value.reason


class TestJwksKeySet:
    @pytest.mark.parametrize("alg", ALLOWED_ALGS)
    def test_binds_each_allowed_alg(self, alg: str) -> None:
        """Each allowed algorithm loads from a DevIssuer JWKS and is bound to that algorithm."""
        issuer = DevIssuer.generate(alg=alg, kid="k")
        assert key_of(issuer).alg == alg

    @pytest.mark.parametrize(("drop_alg", "crv", "expected"), [(True, "P-256", "ES256"), (True, "P-384", "ES384")])
    def test_alg_derived_from_curve(self, drop_alg: bool, crv: str, expected: str) -> None:
        """Without an "alg" member, EC keys are bound by curve."""
        issuer = DevIssuer.generate(alg=expected, kid="k")
        jwk = issuer.public_jwk()
        del jwk["alg"]
        assert jwk["crv"] == crv
        assert JwksKeySet.from_json(json.dumps({"keys": [jwk]})).get("k").alg == expected  # type: ignore[union-attr]

    def test_rsa_defaults_to_rs256(self) -> None:
        """An RSA JWK without "alg" is RS256, never PS256 or anything else."""
        jwk = DevIssuer.generate(alg="PS256", kid="k").public_jwk()
        del jwk["alg"]
        assert JwksKeySet.from_json(json.dumps({"keys": [jwk]})).get("k").alg == "RS256"  # type: ignore[union-attr]

    def test_spiffe_bundle_use_values(self) -> None:
        """SPIFFE bundle keys: "jwt-svid" is usable, "x509-svid" is skipped."""
        a = DevIssuer.generate(kid="a").public_jwk() | {"use": "jwt-svid"}
        b = DevIssuer.generate(kid="b").public_jwk() | {"use": "x509-svid"}
        keys = JwksKeySet.from_json(json.dumps({"keys": [a, b], "spiffe_sequence": 1}))
        assert keys.kids == frozenset({"a"})
        assert len(keys) == 1 and [k.kid for k in keys] == ["a"]

    @pytest.mark.parametrize(
        ("mutate", "why"),
        [
            (lambda j: j | {"kty": "oct", "k": "c2VjcmV0"}, "symmetric"),
            (lambda j: j | {"d": "AAAA"}, "private"),
            (lambda j: {"kty": "RSA", "kid": "k", "n": "AQAB", "e": "AQAB", "p": "AQAB"}, "private"),
        ],
    )
    def test_refuses_a_document_that_publishes_a_secret(self, mutate: Callable[[dict[str, Any]], dict[str, Any]],
                                                        why: str) -> None:
        """A symmetric key or private key members refuse the whole document, good keys beside them or not:
        a secret was published, and someone must look."""
        jwk = mutate(DevIssuer.generate(kid="k").public_jwk())
        good = DevIssuer.generate(kid="good").public_jwk()
        for doc in ({"keys": [jwk]}, {"keys": [good, jwk]}):
            with pytest.raises(ConfigError) as exc:
                JwksKeySet.from_json(json.dumps(doc))
            assert why in str(exc.value)

    @pytest.mark.parametrize(
        ("mutate", "why"),
        [
            (lambda j: j | {"use": "enc"}, "use"),
            (lambda j: j | {"key_ops": ["encrypt"]}, "key_ops"),
            (lambda j: j | {"alg": "HS256"}, "alg does not match"),
            (lambda j: j | {"alg": "ES384"}, "alg does not match"),
            (lambda j: j | {"alg": "none"}, "alg does not match"),
            (lambda j: j | {"crv": "P-521", "alg": "ES512"}, "not a valid ES512"),  # a P-256 point is not on P-521
            (lambda j: j | {"crv": "secp256k1"}, "curve"),
            (lambda j: {"kty": "OKP", "crv": "Ed448", "kid": "k", "x": "AAAA"}, "curve"),
            (lambda j: {"kty": "OKP", "crv": "X25519", "kid": "k", "x": "AAAA"}, "curve"),
            (lambda j: j | {"kty": "XYZ"}, "kty"),
            (lambda j: {"kty": "AKP", "alg": "ML-DSA-65", "kid": "k", "pub": "AAAA"}, "kty"),
            (lambda j: {k: v for k, v in j.items() if k != "kid"}, "kid"),
            (lambda j: j | {"kid": ""}, "kid"),
            (lambda j: j | {"kid": "../../etc/passwd"}, "kid"),
            (lambda j: j | {"kid": "k" * 129}, "kid"),
            (lambda j: j | {"x": "AAAA"}, "not a valid"),
        ],
    )
    def test_skips_a_key_it_cannot_use_and_serves_the_rest(
        self, mutate: Callable[[dict[str, Any]], dict[str, Any]], why: str, caplog: pytest.LogCaptureFixture,
    ) -> None:
        """A key of another type, curve or algorithm, mis-used, unnamed or broken is skipped with a warning
        that says why, and the document's other keys still verify; alone, it leaves no usable key."""
        bad = mutate(DevIssuer.generate(kid="k").public_jwk())
        good = DevIssuer.generate(kid="good")
        with caplog.at_level(logging.WARNING, logger="broker.identity.jwks"):
            keys = JwksKeySet.from_json(json.dumps({"keys": [bad, good.public_jwk()]}))
        assert keys.kids == {"good"}
        assert len(keys.skipped) == 1 and why in keys.skipped[0]
        assert any("skipped" in r.getMessage() and why in r.getMessage() for r in caplog.records)
        svid_ok(good, good.mint_svid(f"spiffe://{TD}/agent/a", audience=AUD, now=NOW))
        with pytest.raises(ConfigError, match="no usable signing key") as exc:
            JwksKeySet.from_json(json.dumps({"keys": [bad]}))
        assert why in str(exc.value)

    def test_a_bundle_with_a_p521_key_and_an_unknown_kty_serves(self) -> None:
        """The issue's case: a trust bundle holding a P-521 key and a key type from the future, beside the
        keys that sign today. Every supported key loads (P-521 as ES512) and the unknown one is skipped."""
        es, es512, rs = (DevIssuer.generate(alg=a, kid=f"k-{a}") for a in ("ES256", "ES512", "RS256"))
        future = {"kty": "AKP", "alg": "ML-DSA-65", "kid": "pq-1", "pub": "AAAA", "use": "jwt-svid"}
        bundle = {"keys": [future, es.public_jwk(), es512.public_jwk(), rs.public_jwk()], "spiffe_sequence": 7}
        keys = JwksKeySet.from_json(json.dumps(bundle))
        assert keys.kids == {"k-ES256", "k-ES512", "k-RS256"} and keys.skipped == ("key pq-1: unsupported kty",)
        for issuer in (es, es512, rs):
            assert keys.get(issuer.kid).alg == issuer.alg  # type: ignore[union-attr]

    def test_rsa_algs_and_short_rsa(self) -> None:
        """An RSA key may declare any of the six RSA JWT-SVID algs, nothing else; under 2048 bits it is skipped."""
        for alg in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"):
            jwk = DevIssuer.generate(alg="RS256", kid="k").public_jwk() | {"alg": alg}
            assert JwksKeySet.from_json(json.dumps({"keys": [jwk]})).get("k").alg == alg  # type: ignore[union-attr]
        jwk = DevIssuer.generate(alg="RS256", kid="k").public_jwk() | {"alg": "ES256"}
        with pytest.raises(ConfigError, match="RS256/384/512 or PS256/384/512"):
            JwksKeySet.from_json(json.dumps({"keys": [jwk]}))
        small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()  # noqa: S505 -- a weak key, refused
        jwk = RSAAlgorithm.to_jwk(small, as_dict=True) | {"kid": "k"}
        with pytest.raises(ConfigError, match="2048"):
            JwksKeySet.from_json(json.dumps({"keys": [jwk]}))

    @pytest.mark.parametrize(
        ("doc", "why"),
        [
            (b"not json", "not valid JSON"),
            (b"[]", "'keys' list"),
            (b'{"keys": {}}', "'keys' list"),
            (b'{"keys": []}', "no usable"),
            (b'{"keys": [1]}', "not an object"),
            (b'{"keys": [], "keys": []}', "not valid JSON"),
            (b"\xff\xfe", "not valid JSON"),
        ],
    )
    def test_rejects_bad_documents(self, doc: bytes, why: str) -> None:
        """Malformed documents, duplicate members and empty key sets are a ConfigError."""
        with pytest.raises(ConfigError, match=why):
            JwksKeySet.from_json(doc)

    def test_limits(self) -> None:
        """More than 100 keys, more than 64 KiB, or a duplicate kid is a ConfigError."""
        jwk = DevIssuer.generate(kid="k").public_jwk()
        with pytest.raises(ConfigError, match="more than 100"):
            JwksKeySet.from_json(json.dumps({"keys": [jwk | {"kid": f"k{i}"} for i in range(101)]}))
        with pytest.raises(ConfigError, match="64 KiB"):
            JwksKeySet.from_json(json.dumps({"keys": [jwk], "pad": "x" * 65536}))
        with pytest.raises(ConfigError, match="duplicate kid"):
            JwksKeySet.from_json(json.dumps({"keys": [jwk, jwk]}))
        assert len(JwksKeySet.from_json(json.dumps({"keys": [jwk | {"kid": f"k{i}"} for i in range(100)]}))) == 100

    def test_from_file(self, tmp_path: Path) -> None:
        """from_file reads a JWKS; a missing file is a ConfigError."""
        issuer = DevIssuer.generate(kid="k")
        issuer.write_jwks(tmp_path / "jwks.json")
        assert JwksKeySet.from_file(tmp_path / "jwks.json").kids == {"k"}
        with pytest.raises(ConfigError, match="cannot read"):
            JwksKeySet.from_file(tmp_path / "missing.json")


class TestKeySources:
    async def test_static(self, tmp_path: Path) -> None:
        """StaticKeySource answers from the file it loaded, None for unknown kids."""
        issuer = DevIssuer.generate(kid="k")
        issuer.write_jwks(tmp_path / "j.json")
        source = StaticKeySource.from_file(tmp_path / "j.json")
        assert (await source.get("k")) == key_of(issuer)
        assert await source.get("other") is None

    def test_load_key_source(self, tmp_path: Path) -> None:
        """load_key_source needs exactly one of file/url, and a session for a URL."""
        DevIssuer.generate(kid="k").write_jwks(tmp_path / "j.json")
        assert isinstance(load_key_source(jwks_file=tmp_path / "j.json", jwks_url=None), StaticKeySource)
        with pytest.raises(ConfigError):
            load_key_source(jwks_file=None, jwks_url=None)
        with pytest.raises(ConfigError):
            load_key_source(jwks_file="a", jwks_url="https://x/")
        with pytest.raises(ConfigError, match="session"):
            load_key_source(jwks_file=None, jwks_url="https://x/jwks")

    @pytest.mark.parametrize(
        ("url", "insecure"),
        [
            ("http://idp.example.com/jwks", False),
            ("ftp://idp.example.com/jwks", True),
            ("https:///jwks", False),
            ("https://user:pw@idp.example.com/jwks", False),
            ("file:///etc/passwd", True),
        ],
    )
    async def test_url_source_refuses_bad_urls(self, url: str, insecure: bool) -> None:
        """Only https (or http when explicitly allowed), with a host and no credentials."""
        async with aiohttp.ClientSession() as session:
            with pytest.raises(ConfigError):
                JwksUrlKeySource(url, session, allow_insecure_http=insecure)


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class JwksServer:
    """A loopback JWKS endpoint that counts requests and can misbehave on demand."""

    def __init__(self, issuer: DevIssuer) -> None:
        self.body: bytes = json.dumps(issuer.jwks()).encode()
        self.status = 200
        self.hits = 0
        self.delay = 0.0
        self.redirect_to: str | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.redirect_to:
            raise web.HTTPFound(self.redirect_to)
        return web.Response(body=self.body, status=self.status, content_type="application/json")


@pytest.fixture
async def jwks_server(aiohttp_server: Any) -> tuple[JwksServer, str]:
    server = JwksServer(DevIssuer.generate(kid="k1"))
    app = web.Application()
    app.router.add_get("/jwks", server.handle)
    app.router.add_get("/other", server.handle)
    srv = await aiohttp_server(app)
    return server, f"http://127.0.0.1:{srv.port}/jwks"


class TestJwksUrlKeySource:
    async def test_fetches_and_caches(self, jwks_server: tuple[JwksServer, str]) -> None:
        """The first get fetches; known kids are then answered from cache."""
        server, url = jwks_server
        async with aiohttp.ClientSession() as session:
            source = JwksUrlKeySource(url, session, allow_insecure_http=True, clock=FakeClock())
            for _ in range(5):
                assert (await source.get("k1")) is not None
        assert server.hits == 1

    async def test_unknown_kid_flood_is_rate_limited(self, jwks_server: tuple[JwksServer, str]) -> None:
        """10k unknown kids (concurrent and sequential) cost at most one fetch per refresh interval."""
        server, url = jwks_server
        clock = FakeClock()
        async with aiohttp.ClientSession() as session:
            # The server shares this loop with the 5,000 waiters: on a loaded CI host the one fetch outlived
            # the default 2 s timeout and was never counted. The flood is the subject here, not the timeout.
            source = JwksUrlKeySource(url, session, allow_insecure_http=True, clock=clock, timeout=30.0)
            results = await asyncio.gather(*(source.get(f"evil-{i}") for i in range(5000)))
            assert all(r is None for r in results)
            for i in range(5000):
                assert await source.get(f"evil2-{i}") is None
            assert server.hits == 1
            clock.now += 29.9
            assert await source.get("evil-x") is None
            assert server.hits == 1
            clock.now += 0.2
            assert await source.get("evil-y") is None
            assert server.hits == 2

    async def test_rotation_picks_up_new_kid(self, jwks_server: tuple[JwksServer, str]) -> None:
        """A new kid is found after the refresh interval; a stale cache is refreshed after max_age."""
        server, url = jwks_server
        clock = FakeClock()
        rotated = DevIssuer.generate(kid="k2")
        async with aiohttp.ClientSession() as session:
            source = JwksUrlKeySource(url, session, allow_insecure_http=True, clock=clock)
            assert await source.get("k1") is not None
            server.body = json.dumps(rotated.jwks()).encode()
            assert await source.get("k2") is None  # within min_refresh_interval: no fetch
            clock.now += 31
            assert await source.get("k2") == key_of(rotated)
            assert server.hits == 2
            # k1 was removed upstream: gone from the cache after the refresh
            assert await source.get("k1") is None

    async def test_failures_keep_old_keys(self, jwks_server: tuple[JwksServer, str]) -> None:
        """A 500, an oversized or a malformed body keeps the previous keys and raises nothing."""
        server, url = jwks_server
        clock = FakeClock()
        async with aiohttp.ClientSession() as session:
            source = JwksUrlKeySource(url, session, allow_insecure_http=True, clock=clock, max_age=10)
            assert await source.get("k1") is not None
            for status, body in [
                (500, server.body),
                (200, b"x" * 70000),
                (200, b"{}"),
                (200, b'{"keys":[{"kty":"oct","kid":"k1","k":"AA"}]}'),
            ]:
                server.status, server.body = status, body
                clock.now += 31
                assert await source.get("k1") is not None
            assert server.hits == 5

    async def test_no_keys_ever_gives_none(self, jwks_server: tuple[JwksServer, str]) -> None:
        """If the first fetch fails, get returns None (the verifier then rejects the token)."""
        server, url = jwks_server
        server.status = 503
        async with aiohttp.ClientSession() as session:
            source = JwksUrlKeySource(url, session, allow_insecure_http=True, clock=FakeClock())
            assert await source.get("k1") is None

    async def test_redirects_are_not_followed(self, jwks_server: tuple[JwksServer, str]) -> None:
        """A redirect is a failed fetch, not a hop to another location."""
        server, url = jwks_server
        server.redirect_to = url.replace("/jwks", "/other")
        async with aiohttp.ClientSession() as session:
            source = JwksUrlKeySource(url, session, allow_insecure_http=True, clock=FakeClock())
            assert await source.get("k1") is None
        assert server.hits == 1

    async def test_timeout(self, jwks_server: tuple[JwksServer, str]) -> None:
        """A slow endpoint times out (shortened here) and yields None, not an exception."""
        server, url = jwks_server
        server.delay = 1.0
        async with aiohttp.ClientSession() as session:
            source = JwksUrlKeySource(url, session, allow_insecure_http=True, clock=FakeClock(), timeout=0.1)
            assert await source.get("k1") is None

    async def test_verifier_over_url_source(self, jwks_server: tuple[JwksServer, str]) -> None:
        """An AgentVerifier works end to end over a fetched JWKS."""
        server, url = jwks_server
        issuer = DevIssuer.generate(kid="k1")
        server.body = json.dumps(issuer.jwks()).encode()
        async with aiohttp.ClientSession() as session:
            source = JwksUrlKeySource(url, session, allow_insecure_http=True, clock=FakeClock())
            verifier = AgentVerifier({TD: source}, audience=AUD, clock=lambda: NOW)
            ident = await verifier.verify(issuer.mint_svid(SID, audience=AUD, now=NOW))
        assert str(ident.spiffe_id) == SID


class TestVerifySvid:
    def test_valid(self, spire: DevIssuer) -> None:
        """A well-formed SVID yields its SPIFFE ID, expiry and jti."""
        token = spire.mint_svid(SID, audience=AUD, now=NOW, extra_claims={"jti": "abc"})
        ident = svid_ok(spire, token)
        assert ident == AgentIdentity(spiffe_id=ident.spiffe_id, expires_at=NOW + 300, token_id="abc")
        assert str(ident.spiffe_id) == SID

    def test_aud_string_or_single_element_list(self, spire: DevIssuer) -> None:
        """aud may be the audience string or a one-element list of it."""
        for aud in (AUD, [AUD]):
            svid_ok(spire, spire.mint_svid(SID, audience=AUD, now=NOW, extra_claims={"aud": aud}))

    def test_key_ref(self, spire: DevIssuer) -> None:
        """svid_key_ref names the sub's trust domain and the kid, before any trust decision."""
        ref = svid_key_ref(spire.mint_svid(SID, audience=AUD, now=NOW))
        assert (ref.owner, ref.kid) == (TD, "spire-1")

    def test_key_from_another_trust_domain(self, spire: DevIssuer) -> None:
        """A key handed in for another trust domain cannot verify the sub's token."""
        token = spire.mint_svid(SID, audience=AUD, now=NOW)
        assert svid_reason(spire, token, trust_domain="other.org") == "key is not from the sub's trust domain"

    @pytest.mark.parametrize(("exp_minus_now", "ok"), [(-31.0, False), (-30.0, False), (-29.0, True), (0.0, True)])
    def test_exp_boundary(self, spire: DevIssuer, exp_minus_now: float, ok: bool) -> None:
        """exp is honoured with 30 s leeway: valid while now < exp + leeway."""
        token = spire.mint_svid(SID, audience=AUD, now=NOW - 100, extra_claims={"exp": NOW + exp_minus_now})
        if ok:
            svid_ok(spire, token)
        else:
            assert svid_reason(spire, token) == "token expired"

    def test_exp_exact_edge(self, spire: DevIssuer) -> None:
        """exp + leeway == now is expired; one second earlier still valid."""
        at_edge = spire.mint_svid(SID, audience=AUD, now=NOW - 100, extra_claims={"exp": NOW - 30})
        assert svid_reason(spire, at_edge) == "token expired"
        inside = spire.mint_svid(SID, audience=AUD, now=NOW - 100, extra_claims={"exp": NOW - 29})
        svid_ok(spire, inside)

    @pytest.mark.parametrize("claim", ["nbf", "iat"])
    def test_future_claims_boundary(self, spire: DevIssuer, claim: str) -> None:
        """nbf/iat up to now + leeway are accepted, one second more is rejected."""
        ok = spire.mint_svid(SID, audience=AUD, now=NOW, extra_claims={claim: NOW + 30, "exp": NOW + 300})
        svid_ok(spire, ok)
        bad = spire.mint_svid(SID, audience=AUD, now=NOW, extra_claims={claim: NOW + 31, "exp": NOW + 300})
        assert "future" in svid_reason(spire, bad) or "not yet valid" in svid_reason(spire, bad)

    def test_lifetime_ceiling(self, spire: DevIssuer) -> None:
        """exp - iat (or exp - now without iat) may not exceed max_lifetime."""
        svid_ok(spire, spire.mint_svid(SID, audience=AUD, now=NOW, ttl=3600))
        long = spire.mint_svid(SID, audience=AUD, now=NOW, ttl=3601)
        assert svid_reason(spire, long) == "token lifetime exceeds the maximum"
        assert svid_reason(spire, spire.mint_svid(SID, audience=AUD, now=NOW, ttl=901), max_lifetime=900)
        no_iat = spire.encode({"sub": SID, "aud": AUD, "exp": NOW + 3601})
        assert svid_reason(spire, no_iat) == "token lifetime exceeds the maximum"
        svid_ok(spire, spire.encode({"sub": SID, "aud": AUD, "exp": NOW + 3600}))

    def test_float_times(self, spire: DevIssuer) -> None:
        """Fractional NumericDates are accepted."""
        svid_ok(spire, spire.encode({"sub": SID, "aud": AUD, "exp": NOW + 10.5, "iat": NOW - 0.25}))

    @pytest.mark.parametrize("jti", [1, ["a"], {"a": 1}, True])
    def test_jti_type(self, spire: DevIssuer, jti: Any) -> None:
        """A non-string jti is rejected."""
        token = spire.mint_svid(SID, audience=AUD, now=NOW, extra_claims={"jti": jti})
        assert svid_reason(spire, token) == "jti is not a string"

    def test_trust_domain_id_is_not_a_workload(self, spire: DevIssuer) -> None:
        """sub = the trust domain's own ID is not an agent."""
        token = spire.mint_svid("spiffe://example.org", audience=AUD, now=NOW)
        assert svid_reason(spire, token) == "sub is a trust domain ID, not a workload"


class TestAgentVerifier:
    async def test_trust_domain_binding(self, spire: DevIssuer) -> None:
        """A token of td A signed by td B's key (same kid or not) is rejected; untrusted tds too."""
        other = DevIssuer.generate(kid="spire-1")  # same kid string, different key
        third = DevIssuer.generate(kid="other-td-key")
        verifier = AgentVerifier(
            {
                TD: StaticKeySource(JwksKeySet.from_json(json.dumps(spire.jwks()))),
                "other.org": StaticKeySource(
                    JwksKeySet.from_json(json.dumps({"keys": [other.public_jwk(), third.public_jwk()]}))
                ),
            },
            audience=AUD,
            clock=lambda: NOW,
        )
        assert (await verifier.verify(spire.mint_svid(SID, audience=AUD, now=NOW))).spiffe_id.trust_domain == TD
        await verifier.verify(other.mint_svid("spiffe://other.org/a", audience=AUD, now=NOW))
        for token, why in [
            (other.mint_svid(SID, audience=AUD, now=NOW), "signature does not verify"),
            (third.mint_svid(SID, audience=AUD, now=NOW), "unknown kid for the trust domain"),
            (spire.mint_svid("spiffe://other.org/a", audience=AUD, now=NOW), "signature does not verify"),
            (spire.mint_svid("spiffe://evil.org/a", audience=AUD, now=NOW), "trust domain is not trusted"),
        ]:
            with pytest.raises(InvalidIdentity) as exc:
                await verifier.verify(token)
            assert exc.value.reason == why

    async def test_clock_is_used(self, spire: DevIssuer) -> None:
        """The verifier reads time only from its injected clock."""
        clock = FakeClock(NOW)
        verifier = AgentVerifier(
            {TD: StaticKeySource(JwksKeySet.from_json(json.dumps(spire.jwks())))}, audience=AUD, clock=clock
        )
        token = spire.mint_svid(SID, audience=AUD, now=NOW, ttl=60)
        await verifier.verify(token)
        clock.now = NOW + 90
        with pytest.raises(InvalidIdentity, match="not accepted"):
            await verifier.verify(token)

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"audience": ""},
            {"audience": AUD, "leeway": -1},
            {"audience": AUD, "leeway": 61},
            {"audience": AUD, "max_lifetime": 0},
        ],
    )
    def test_config_checks(self, kwargs: dict[str, Any]) -> None:
        """Empty audience, leeway outside 0..60 s or a non-positive lifetime is a ConfigError."""
        with pytest.raises(ConfigError):
            AgentVerifier({}, **kwargs)
        with pytest.raises(ConfigError):
            UserVerifier([], **kwargs)

    def test_bad_trust_domain_config(self) -> None:
        """A trust map key that is not a trust domain name is a ConfigError."""
        with pytest.raises(ConfigError):
            AgentVerifier({"Example.org": StaticKeySource(JwksKeySet({}))}, audience=AUD)


class TestUserVerifier:
    @pytest.fixture
    def verifier(self, idp: DevIssuer) -> UserVerifier:
        src = StaticKeySource(JwksKeySet.from_json(json.dumps(idp.jwks())))
        return UserVerifier([IssuerTrust(IDP, src, groups_claim="roles")], audience=AUD, clock=lambda: NOW)

    async def test_valid(self, idp: DevIssuer, verifier: UserVerifier) -> None:
        """A good ID token yields sub, issuer, email as name, groups and auth_time."""
        token = idp.mint_id_token(
            issuer=IDP,
            subject="u-1",
            audience=AUD,
            email="alice@example.com",
            auth_time=NOW - 60,
            now=NOW,
            extra_claims={"roles": ["support", "secops"]},
        )
        user = await verifier.verify(token)
        assert (user.subject, user.issuer, user.name) == ("u-1", IDP, "alice@example.com")
        assert user.groups == {"support", "secops"} and user.auth_time == NOW - 60 and user.expires_at == NOW + 300

    @pytest.mark.parametrize(
        ("extra", "name"),
        [
            ({}, "u-1"),
            ({"email": ""}, "u-1"),
            ({"email": "a@x", "email_verified": False}, "u-1"),
            ({"email": "a@x", "email_verified": "true"}, "u-1"),
            ({"email": "a@x", "email_verified": True}, "a@x"),
            ({"email": "A@X", "email_verified": True}, "a@x"),
        ],
    )
    async def test_name(self, idp: DevIssuer, verifier: UserVerifier, extra: dict[str, Any], name: str) -> None:
        """name is the email only when email_verified is exactly true (lower-cased), else sub; id is always iss#sub."""
        token = idp.mint_id_token(issuer=IDP, subject="u-1", audience=AUD, now=NOW, extra_claims=extra)
        user = await verifier.verify(token)
        assert user.name == name and user.id == f"{IDP}#u-1"
        assert user.email_trusted is (name != "u-1")

    async def test_missing_email_verified_is_untrusted(self, idp: DevIssuer, verifier: UserVerifier) -> None:
        """An email without email_verified is shown but not trusted: it matches no principal or lock."""
        token = idp.mint_id_token(issuer=IDP, subject="u-1", audience=AUD, now=NOW, email="a@x", email_verified=None)
        user = await verifier.verify(token)
        assert (user.email, user.email_trusted, user.trusted_email, user.name) == ("a@x", False, None, "u-1")

    async def test_trust_email_issuer(self, idp: DevIssuer) -> None:
        """An issuer configured with trust_email vouches for its addresses even without email_verified."""
        src = StaticKeySource(JwksKeySet.from_json(json.dumps(idp.jwks())))
        verifier = UserVerifier([IssuerTrust(IDP, src, trust_email=True)], audience=AUD, clock=lambda: NOW)
        token = idp.mint_id_token(issuer=IDP, subject="u-1", audience=AUD, now=NOW, email="a@x", email_verified=None)
        assert (await verifier.verify(token)).trusted_email == "a@x"

    @pytest.mark.parametrize("issuer", ["https://idp.example#frag", "idp.example", ""])
    def test_issuer_must_be_a_url_without_fragment(self, idp: DevIssuer, issuer: str) -> None:
        """A person id is '<issuer>#<sub>': an issuer holding '#' (or not a URL) is refused at start-up."""
        src = StaticKeySource(JwksKeySet.from_json(json.dumps(idp.jwks())))
        with pytest.raises(ConfigError):
            UserVerifier([IssuerTrust(issuer, src)], audience=AUD)

    async def test_subject_over_255_characters(self, idp: DevIssuer, verifier: UserVerifier) -> None:
        """OIDC caps sub at 255 characters; a longer one is refused, not truncated."""
        token = idp.mint_id_token(issuer=IDP, subject="u" * 256, audience=AUD, now=NOW)
        with pytest.raises(InvalidIdentity):
            await verifier.verify(token)

    @pytest.mark.parametrize(
        ("extra", "why"),
        [
            ({"roles": "support"}, "groups claim is not a list of strings"),
            ({"roles": ["a", 1]}, "groups claim is not a list of strings"),
            ({"roles": {"a": 1}}, "groups claim is not a list of strings"),
            ({"email": 5}, "email is not a string"),
            ({"sub": ""}, "sub missing or not a string"),
            ({"sub": 7}, "sub missing or not a string"),
            ({"sub": "spiffe://example.org/agent/x"}, "sub is a SPIFFE ID: agent tokens are not user tokens"),
            ({"sub": "SPIFFE://example.org/agent/x"}, "sub is a SPIFFE ID: agent tokens are not user tokens"),
            ({"auth_time": "yesterday"}, "auth_time is not a number"),
            ({"auth_time": NOW + 31}, "auth_time in the future"),
            ({"iss": IDP + "/"}, "issuer is not trusted"),
            ({"iss": 42}, "iss missing or not a string"),
            ({"aud": "other"}, "aud does not match"),
        ],
    )
    async def test_rejects(self, idp: DevIssuer, verifier: UserVerifier, extra: dict[str, Any], why: str) -> None:
        """Mistyped or wrong user claims are rejected with a specific reason."""
        token = idp.mint_id_token(issuer=IDP, subject="u-1", audience=AUD, now=NOW, extra_claims=extra)
        with pytest.raises(InvalidIdentity) as exc:
            await verifier.verify(token)
        assert exc.value.reason == why

    async def test_missing_groups_is_empty(self, idp: DevIssuer, verifier: UserVerifier) -> None:
        """No groups claim means no groups."""
        token = idp.mint_id_token(issuer=IDP, subject="u-1", audience=AUD, now=NOW, groups=["ignored-claim"])
        assert (await verifier.verify(token)).groups == frozenset()

    async def test_key_from_issuers_own_source_only(self, idp: DevIssuer) -> None:
        """Issuer B's key cannot verify a token claiming issuer A."""
        other = DevIssuer.generate(kid="idp-1")
        verifier = UserVerifier(
            [
                IssuerTrust(IDP, StaticKeySource(JwksKeySet.from_json(json.dumps(idp.jwks())))),
                IssuerTrust("https://b.example", StaticKeySource(JwksKeySet.from_json(json.dumps(other.jwks())))),
            ],
            audience=AUD,
            clock=lambda: NOW,
        )
        await verifier.verify(other.mint_id_token(issuer="https://b.example", subject="u", audience=AUD, now=NOW))
        with pytest.raises(InvalidIdentity) as exc:
            await verifier.verify(other.mint_id_token(issuer=IDP, subject="u", audience=AUD, now=NOW))
        assert exc.value.reason == "signature does not verify"

    def test_pure_issuer_check(self, idp: DevIssuer) -> None:
        """verify_id_token refuses a token whose iss is not the issuer the key came from."""
        token = idp.mint_id_token(issuer="https://evil", subject="u", audience=AUD, now=NOW)
        with pytest.raises(InvalidIdentity, match="not accepted") as exc:
            verify_id_token(token, key_of(idp), issuer=IDP, audience=AUD, now=NOW)
        assert exc.value.reason == "iss does not match"

    def test_duplicate_issuer_config(self, idp: DevIssuer) -> None:
        """The same issuer twice (or an empty one) is a ConfigError."""
        src = StaticKeySource(JwksKeySet.from_json(json.dumps(idp.jwks())))
        with pytest.raises(ConfigError):
            UserVerifier([IssuerTrust(IDP, src), IssuerTrust(IDP, src)], audience=AUD)
        with pytest.raises(ConfigError):
            UserVerifier([IssuerTrust("", src)], audience=AUD)


class TestTokenTypeConfusion:
    """TH-31: agent and user tokens never cross, even when one key is trusted by both verifiers."""

    async def test_cross_presentation_matrix(self) -> None:
        """0 acceptances out of every SVID shape at UserVerifier and every ID-token shape at AgentVerifier."""
        shared = DevIssuer.generate(kid="shared")
        src = StaticKeySource(JwksKeySet.from_json(json.dumps(shared.jwks())))
        users = UserVerifier([IssuerTrust(IDP, src)], audience=AUD, clock=lambda: NOW)
        agents = AgentVerifier({TD: src}, audience=AUD, clock=lambda: NOW, user_issuers=users.issuers)
        svids = [
            shared.mint_svid(SID, audience=AUD, now=NOW),
            shared.mint_svid(SID, audience=AUD, now=NOW, extra_claims={"iss": IDP}),
            shared.mint_svid(
                SID, audience=AUD, now=NOW, extra_claims={"iss": IDP, "email": "a@x", "groups": ["secops"]}
            ),
            shared.mint_svid(SID, audience=AUD, now=NOW, extra_claims={"iss": "spiffe://example.org"}),
        ]
        id_tokens = [
            shared.mint_id_token(issuer=IDP, subject="alice", audience=AUD, now=NOW),
            shared.mint_id_token(issuer=IDP, subject=SID, audience=AUD, now=NOW),
            shared.mint_id_token(issuer=IDP, subject=SID, audience=AUD, now=NOW, email="a@x", groups=["secops"]),
            shared.mint_id_token(issuer=IDP, subject="spiffe://example.org", audience=AUD, now=NOW),
        ]
        accepted = 0
        # positive controls: each token kind passes its own verifier where its shape is legitimate
        await agents.verify(svids[0])
        await agents.verify(svids[3])
        await users.verify(id_tokens[0])
        for token in svids:
            try:
                await users.verify(token)
                accepted += 1
            except InvalidIdentity:
                pass
        for token in id_tokens:
            try:
                await agents.verify(token)
                accepted += 1
            except InvalidIdentity:
                pass
        print(f"cross-presentation: {len(svids) + len(id_tokens)} tried, {accepted} accepted")
        assert accepted == 0


class TestDevIssuer:
    def test_save_and_load(self, tmp_path: Path) -> None:
        """A saved issuer reloads with the same kid, alg and key; the file is mode 0600."""
        issuer = DevIssuer.generate(alg="EdDSA")
        path = tmp_path / "dev.key"
        issuer.save(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        again = DevIssuer.load(path)
        assert (again.kid, again.alg, again.jwks()) == (issuer.kid, issuer.alg, issuer.jwks())

    def test_load_refuses_loose_permissions_and_garbage(self, tmp_path: Path) -> None:
        """A group/world-readable key file or a malformed one is a ConfigError."""
        path = tmp_path / "dev.key"
        DevIssuer.generate().save(path)
        os.chmod(path, 0o644)
        with pytest.raises(ConfigError, match="0600"):
            DevIssuer.load(path)
        path.write_text("{}")
        os.chmod(path, 0o600)
        with pytest.raises(ConfigError, match="malformed"):
            DevIssuer.load(path)
        with pytest.raises(ConfigError):
            DevIssuer.load(tmp_path / "missing")

    def test_save_tightens_existing_file(self, tmp_path: Path) -> None:
        """Saving over an existing world-readable file leaves it 0600."""
        path = tmp_path / "dev.key"
        path.write_text("old")
        os.chmod(path, 0o644)
        DevIssuer.generate().save(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    def test_unsupported_alg(self) -> None:
        """Only the broker's allowed algorithms can be generated."""
        with pytest.raises(ConfigError):
            DevIssuer.generate(alg="HS256")

    def test_jwks_has_no_private_material(self) -> None:
        """The published JWKS never contains private key members."""
        for alg in ALLOWED_ALGS:
            jwk = DevIssuer.generate(alg=alg).public_jwk()
            assert not {"d", "p", "q", "dp", "dq", "qi", "k"} & jwk.keys()


class TestEmails:
    """Addresses are compared normalised; an issuer may be held to its own domains."""

    @pytest.mark.parametrize("spelling", ["Zoe@Example.test", " zoe@example.test ", "ＺＯＥ@example.test"])
    def test_normalize_email(self, spelling: str) -> None:
        """NFKC, stripped, case-folded: every spelling of one address is one address."""
        from broker.identity import normalize_email

        assert normalize_email(spelling) == "zoe@example.test"

    async def test_email_domains_bound_what_an_issuer_vouches_for(self, idp: DevIssuer) -> None:
        """With email_domains, a verified address outside them is shown but not trusted."""
        src = StaticKeySource(JwksKeySet.from_json(json.dumps(idp.jwks())))
        verifier = UserVerifier([IssuerTrust(IDP, src, email_domains=("example.com",))], audience=AUD,
                                clock=lambda: NOW)
        inside = idp.mint_id_token(issuer=IDP, subject="u-1", audience=AUD, now=NOW, email="a@example.com")
        outside = idp.mint_id_token(issuer=IDP, subject="u-2", audience=AUD, now=NOW, email="a@other.example")
        assert (await verifier.verify(inside)).trusted_email == "a@example.com"
        user = await verifier.verify(outside)
        assert (user.email, user.trusted_email) == ("a@other.example", None)
