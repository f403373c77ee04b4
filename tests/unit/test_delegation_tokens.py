"""Delegation an IdP already issued (RFC 8693 token exchange): the pure checks and the verifier.

The token's shape is RFC 8693's (§4.1 ``act``: the current actor is the outermost ``act.sub``; §4.2
``scope``, space-delimited) in an RFC 9068 JWT access token (``typ: at+jwt``, ``jti``, ``client_id``).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.dev.identities import DevIssuer
from broker.errors import ConfigError, InvalidIdentity
from broker.identity import (
    AgentIdentity,
    DelegationIssuerTrust,
    DelegationVerifier,
    JwksKeySet,
    Key,
    SpiffeId,
    StaticKeySource,
    check_delegation,
    verify_id_token,
)
from broker.identity.delegation_tokens import DelegationToken, verify_delegation_token

NOW = 1_700_000_000.0
AUD = "agent-broker"
IDP = "https://idp.example.com"
AGENT = "spiffe://example.org/agent/support-1"


@pytest.fixture(scope="module")
def idp() -> DevIssuer:
    return DevIssuer.generate(kid="idp-1")


def key_of(issuer: DevIssuer) -> Key:
    key = JwksKeySet.from_json(json.dumps(issuer.jwks())).get(issuer.kid)
    assert key is not None
    return key


def mint(idp: DevIssuer, **extra: Any) -> str:
    return idp.mint_delegation_token(issuer=IDP, subject="248289761001", actor=AGENT, audience=AUD,
                                     scope="openid task:support-triage", groups=["support"], now=NOW,
                                     extra_claims=extra)


def verify(idp: DevIssuer, token: str, **kw: Any) -> DelegationToken:
    args: dict[str, Any] = {"issuer": IDP, "audience": AUD, "now": NOW}
    args.update(kw)
    return verify_delegation_token(token, key_of(idp), **args)


def reason(idp: DevIssuer, token: str, **kw: Any) -> str:
    with pytest.raises(InvalidIdentity) as exc:
        verify(idp, token, **kw)
    return exc.value.reason


def agent(sid: str = AGENT) -> AgentIdentity:
    return AgentIdentity(spiffe_id=SpiffeId.parse(sid), expires_at=NOW + 300, token_id=None)


class TestVerify:
    def test_valid_token_names_the_person_and_the_actor(self, idp: DevIssuer) -> None:
        """sub is the person (<iss>#<sub>), act.sub the agent, the scopes and jti as given, groups from the claim."""
        d = verify(idp, mint(idp))
        assert d.user.id == f"{IDP}#248289761001" and d.user.groups == {"support"}
        assert d.actor == AGENT and d.scopes == {"openid", "task:support-triage"}
        assert d.jti and d.expires_at == NOW + 300 and d.remember_until > d.expires_at

    def test_aud_may_name_other_audiences_too(self, idp: DevIssuer) -> None:
        """aud must include the broker; other audiences beside it are allowed (RFC 8693 lets the IdP add them)."""
        assert verify(idp, mint(idp, aud=["https://api.example.com", AUD])).actor == AGENT

    def test_nested_act_the_outermost_is_the_actor(self, idp: DevIssuer) -> None:
        """RFC 8693 §4.1: prior actors nest inside act; only the outermost act.sub is the one acting."""
        d = verify(idp, mint(idp, act={"sub": AGENT, "act": {"sub": "spiffe://example.org/agent/planner"}}))
        assert d.actor == AGENT

    @pytest.mark.parametrize(("extra", "why"), [
        ({"act": None}, "act missing"),
        ({"act": {"iss": IDP}}, "act.sub"),
        ({"act": AGENT}, "act missing"),
        ({"scope": None}, "scope missing"),
        ({"scope": ["task:support-triage"]}, "scope missing"),
        ({"scope": "   "}, "scope missing"),
        ({"jti": None}, "jti missing"),
        ({"jti": ""}, "jti missing"),
        ({"jti": "j" * 256}, "jti"),
        ({"aud": "another-service"}, "does not include the broker"),
        ({"aud": []}, "aud"),
        ({"aud": [AUD, 7]}, "aud"),
        ({"exp": None}, "exp"),
        ({"exp": int(NOW) - 120}, "expired"),
        ({"nbf": int(NOW) + 600}, "nbf"),
        ({"iat": int(NOW) + 600, "exp": int(NOW) + 900}, "iat"),
        ({"exp": int(NOW) + 7200}, "lifetime"),
        ({"sub": AGENT}, "SPIFFE"),
        ({"sub": ""}, "sub missing"),
        ({"iss": "https://idp.elsewhere.example"}, "iss"),
        ({"groups": "support"}, "groups"),
    ])
    def test_refused(self, idp: DevIssuer, extra: dict[str, Any], why: str) -> None:
        """Each missing or wrong claim is refused with InvalidIdentity (a 401 over HTTP)."""
        claims = {k: v for k, v in extra.items() if v is not None}
        token = mint(idp, **claims)
        if any(v is None for v in extra.values()):  # drop the claim altogether
            token = idp.encode({k: v for k, v in _claims_of(token).items() if k not in extra},
                               headers={"typ": "at+jwt"})
        assert why in reason(idp, token)

    def test_another_key(self, idp: DevIssuer) -> None:
        """Signed by a key the issuer's JWKS does not hold under that kid: refused."""
        stranger = DevIssuer.generate(kid=idp.kid)
        assert reason(idp, mint(stranger)) == "signature does not verify"


def _claims_of(token: str) -> dict[str, Any]:
    import base64

    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


class TestBinding:
    def test_act_must_be_the_presenting_agent_exactly(self, idp: DevIssuer) -> None:
        """Another agent, or a differently spelt ID, does not match act.sub."""
        d = verify(idp, mint(idp))
        check_delegation(d, agent(), "support-triage")
        for other in ("spiffe://example.org/agent/support-2", "spiffe://example.org/agent/support-1x"):
            with pytest.raises(InvalidIdentity, match="not accepted"):
                check_delegation(d, agent(other), "support-triage")

    def test_scope_must_name_the_role(self, idp: DevIssuer) -> None:
        """task:<role> must be one of the scopes, exactly (no prefix match, no other role)."""
        d = verify(idp, mint(idp, scope="task:support-triage-admin task:billing-report"))
        for role in ("support-triage", "support"):
            with pytest.raises(InvalidIdentity):
                check_delegation(d, agent(), role)
        check_delegation(d, agent(), "billing-report")


class TestTokenConfusion:
    def test_a_delegation_token_is_not_the_users_id_token(self, idp: DevIssuer) -> None:
        """A token with act, even from the users' own IdP and key, never signs the person in (TH-10)."""
        token = idp.mint_id_token(issuer=IDP, subject="248289761001", audience=AUD, now=NOW,
                                  extra_claims={"act": {"sub": AGENT}})
        with pytest.raises(InvalidIdentity) as exc:
            verify_id_token(token, key_of(idp), issuer=IDP, audience=AUD, now=NOW)
        assert "act" in exc.value.reason

    def test_an_rfc9068_access_token_is_not_an_id_token(self, idp: DevIssuer) -> None:
        """typ at+jwt is accepted for delegation, and refused for ID tokens."""
        token = idp.encode({"iss": IDP, "sub": "u", "aud": AUD, "iat": int(NOW), "exp": int(NOW) + 300},
                           headers={"typ": "at+jwt"})
        with pytest.raises(InvalidIdentity):
            verify_id_token(token, key_of(idp), issuer=IDP, audience=AUD, now=NOW)


class TestVerifier:
    async def test_issuer_routing(self, idp: DevIssuer) -> None:
        """The verifier uses the configured issuer's keys and refuses other issuers and kids."""
        keys = StaticKeySource(JwksKeySet.from_json(json.dumps(idp.jwks())))
        v = DelegationVerifier([DelegationIssuerTrust(IDP, keys)], audience=AUD, clock=lambda: NOW)
        assert (await v.verify(mint(idp))).actor == AGENT
        with pytest.raises(InvalidIdentity):
            await v.verify(mint(idp, iss="https://other.example.com"))
        with pytest.raises(InvalidIdentity):
            await v.verify(mint(DevIssuer.generate(kid="idp-2")))

    def test_config(self, idp: DevIssuer) -> None:
        """Issuers are URLs without '#', configured once."""
        keys = StaticKeySource(JwksKeySet.from_json(json.dumps(idp.jwks())))
        for bad in ([DelegationIssuerTrust(IDP, keys), DelegationIssuerTrust(IDP, keys)],
                    [DelegationIssuerTrust("idp", keys)], [DelegationIssuerTrust(IDP + "#x", keys)]):
            with pytest.raises(ConfigError):
                DelegationVerifier(bad, audience=AUD)
