"""Kubernetes projected service-account tokens as agent identities (broker.identity.kubernetes).

The tokens are minted with exactly the claims a kube-apiserver issues: ``pkg/serviceaccount/claims.go``
(``Claims()``) in kubernetes/kubernetes (sub, aud, iat = nbf, exp, jti since 1.29, and ``kubernetes.io``
with namespace, serviceaccount {name, uid}, pod {name, uid}, node {name, uid} since 1.30), signed RS256
with a kid and no ``typ`` (``pkg/serviceaccount/jwt.go``). The legacy secret-based shape is that file's
``legacy.go``: issuer ``kubernetes/serviceaccount``, flat ``kubernetes.io/serviceaccount/*`` claims, no exp.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.dev.identities import DevIssuer
from broker.errors import ConfigError, InvalidIdentity
from broker.identity import (
    AgentVerifier,
    ClusterTrust,
    JwksKeySet,
    Key,
    StaticKeySource,
)
from broker.identity.kubernetes import verify_k8s_token

NOW = 1_700_000_000.0
AUD = "agent-broker"
ISSUER = "https://kubernetes.default.svc.cluster.local"
OTHER_ISSUER = "https://oidc.eks.eu-west-1.amazonaws.com/id/ABCDEF0123"
TD = "prod-eu.example.org"
SA_UID = "1f0a5a3c-52c8-4b0e-8d1e-6f2b1c9d7e10"
POD_UID = "9a7c2e44-0d3b-4f7e-a1c5-3e8b6d2f4a90"


@pytest.fixture(scope="module")
def cluster() -> DevIssuer:
    return DevIssuer.generate(alg="RS256", kid="Xq3bW2k9Zr1L8sYt6vN0pA4cE7dF5gH2jK-_mQ1uI0o")


@pytest.fixture(scope="module")
def other_cluster() -> DevIssuer:
    return DevIssuer.generate(alg="ES256", kid="other-1")


def key_of(issuer: DevIssuer) -> Key:
    key = JwksKeySet.from_json(json.dumps(issuer.jwks())).get(issuer.kid)
    assert key is not None
    return key


def apiserver_claims(**over: Any) -> dict[str, Any]:
    """A pod-bound projected token's claims, field for field as the API server writes them."""
    claims: dict[str, Any] = {
        "aud": [AUD], "exp": int(NOW) + 3600, "iat": int(NOW), "iss": ISSUER,
        "jti": "6e8f1b2a-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
        "kubernetes.io": {"namespace": "support",
                          "node": {"name": "ip-10-0-1-23.eu-west-1.compute.internal",
                                   "uid": "b4c3d2e1-f0a9-4b8c-9d7e-6f5a4b3c2d1e"},
                          "pod": {"name": "support-bot-7d9f8c6b5-x2x4q", "uid": POD_UID},
                          "serviceaccount": {"name": "support-bot", "uid": SA_UID}},
        "nbf": int(NOW), "sub": "system:serviceaccount:support:support-bot",
    }
    claims.update(over)
    return claims


def sign(issuer: DevIssuer, claims: dict[str, Any]) -> str:
    return issuer.encode(claims, headers={"typ": None})


def trust(issuer: DevIssuer, *, td: str = TD, iss: str = ISSUER, max_lifetime: float = 3600.0) -> ClusterTrust:
    return ClusterTrust(td, iss, StaticKeySource(JwksKeySet.from_json(json.dumps(issuer.jwks()))), max_lifetime)


def verify(issuer: DevIssuer, token: str, **kw: Any) -> str:
    args: dict[str, Any] = {"audience": AUD, "now": NOW}
    args.update(kw)
    return str(verify_k8s_token(token, trust(issuer), key_of(issuer), **args).spiffe_id)


def reason(issuer: DevIssuer, token: str, **kw: Any) -> str:
    with pytest.raises(InvalidIdentity) as exc:
        verify(issuer, token, **kw)
    return exc.value.reason


def with_private(**over: Any) -> dict[str, Any]:
    private = dict(apiserver_claims()["kubernetes.io"])
    private.update(over)
    return apiserver_claims(**{"kubernetes.io": private})


class TestValidTokens:
    def test_pod_bound_token_names_the_service_account(self, cluster: DevIssuer) -> None:
        """A projected token as the API server issues it names spiffe://<td>/ns/<ns>/sa/<name>."""
        assert verify(cluster, sign(cluster, apiserver_claims())) == f"spiffe://{TD}/ns/support/sa/support-bot"

    def test_minted_by_dev_issuer(self, cluster: DevIssuer) -> None:
        """broker.dev's minter writes the same shape: it verifies, and its jti becomes the token id."""
        token = cluster.mint_k8s_token(issuer=ISSUER, namespace="support", service_account="support-bot",
                                       audience=AUD, node="node-1", now=NOW)
        ident = verify_k8s_token(token, trust(cluster), key_of(cluster), audience=AUD, now=NOW)
        assert str(ident.spiffe_id) == f"spiffe://{TD}/ns/support/sa/support-bot"
        assert ident.token_id is not None and ident.expires_at == NOW + 3600

    def test_unbound_token_and_dotted_name(self, cluster: DevIssuer) -> None:
        """A TokenRequest not bound to a pod (no pod claim), for a name with dots (a DNS-1123 subdomain)."""
        private = {"namespace": "ci", "serviceaccount": {"name": "runner.v2", "uid": SA_UID}}
        claims = apiserver_claims(sub="system:serviceaccount:ci:runner.v2", **{"kubernetes.io": private})
        assert verify(cluster, sign(cluster, claims)) == f"spiffe://{TD}/ns/ci/sa/runner.v2"


class TestRefused:
    @pytest.mark.parametrize(("claims", "why"), [
        (apiserver_claims(sub="system:serviceaccount:billing:support-bot"), "namespace does not match"),
        (apiserver_claims(sub="system:serviceaccount:support:admin"), "serviceaccount name does not match"),
        (apiserver_claims(sub="system:serviceaccount:support"), "DNS-1123"),
        (apiserver_claims(sub="system:node:ip-10-0-1-23"), "not a service account"),
        (apiserver_claims(sub="system:serviceaccount:Support:support-bot"), "DNS-1123"),
        (apiserver_claims(sub="system:serviceaccount:support:..", **{"kubernetes.io": {
            "namespace": "support", "serviceaccount": {"name": "..", "uid": SA_UID}}}), "DNS-1123"),
        (apiserver_claims(sub="system:serviceaccount:" + "n" * 64 + ":x"), "DNS-1123"),
        (with_private(serviceaccount={"name": "support-bot"}), "serviceaccount uid"),
        (with_private(serviceaccount={"name": "support-bot", "uid": "not a uid"}), "serviceaccount uid"),
        (with_private(pod={"name": "support-bot-7d9f8c6b5-x2x4q"}), "pod uid"),
        (with_private(pod="support-bot-7d9f8c6b5-x2x4q"), "pod is not an object"),
        (with_private(node={"name": "Node_1", "uid": POD_UID}), "node name"),
        (with_private(namespace=None), "namespace does not match"),
        ({k: v for k, v in apiserver_claims().items() if k != "kubernetes.io"}, "kubernetes.io claims missing"),
        ({k: v for k, v in apiserver_claims().items() if k != "exp"}, "exp missing"),
        (apiserver_claims(exp=int(NOW) - 60), "expired"),
        (apiserver_claims(nbf=int(NOW) + 600), "nbf"),
        (apiserver_claims(iat=int(NOW), exp=int(NOW) + 7200), "lifetime"),
        (apiserver_claims(aud=["https://kubernetes.default.svc.cluster.local"]), "aud"),
        (apiserver_claims(aud=[AUD, "vault"]), "aud"),
        (apiserver_claims(iss=OTHER_ISSUER), "not the cluster's issuer"),
    ])
    def test_claims_that_do_not_hold(self, cluster: DevIssuer, claims: dict[str, Any], why: str) -> None:
        """sub and kubernetes.io must agree, names must be valid, and the SVID checks all apply."""
        assert why in reason(cluster, sign(cluster, claims))

    def test_legacy_secret_token(self, cluster: DevIssuer) -> None:
        """A legacy secret-based token (legacy.go's claims, no exp) never verifies, even signed by the cluster."""
        legacy = {"iss": "kubernetes/serviceaccount", "sub": "system:serviceaccount:support:support-bot",
                  "kubernetes.io/serviceaccount/namespace": "support",
                  "kubernetes.io/serviceaccount/secret.name": "support-bot-token-x2x4q",
                  "kubernetes.io/serviceaccount/service-account.name": "support-bot",
                  "kubernetes.io/serviceaccount/service-account.uid": SA_UID}
        assert "legacy" in reason(cluster, sign(cluster, legacy))
        # Flat legacy claims smuggled into an otherwise modern token are refused too.
        mixed = apiserver_claims(**{"kubernetes.io/serviceaccount/namespace": "support"})
        assert "legacy" in reason(cluster, sign(cluster, mixed))

    def test_another_clusters_key(self, cluster: DevIssuer, other_cluster: DevIssuer) -> None:
        """A token signed by another cluster's key does not verify with this cluster's key."""
        token = sign(other_cluster, apiserver_claims())
        with pytest.raises(InvalidIdentity):
            verify_k8s_token(token, trust(cluster), key_of(cluster), audience=AUD, now=NOW)

    def test_user_issuer_is_refused(self, cluster: DevIssuer) -> None:
        """A cluster issuer that is also a user IdP would blur agents and people: refused (TH-31)."""
        token = sign(cluster, apiserver_claims())
        with pytest.raises(InvalidIdentity) as exc:
            verify_k8s_token(token, trust(cluster), key_of(cluster), audience=AUD, now=NOW, user_issuers={ISSUER})
        assert "user identity provider" in exc.value.reason


class TestVerifier:
    """AgentVerifier: SVIDs and service-account tokens side by side, each cluster bound to its own keys."""

    def verifier(self, cluster: DevIssuer, other_cluster: DevIssuer) -> AgentVerifier:
        return AgentVerifier({}, audience=AUD, clock=lambda: NOW, clusters=[
            trust(cluster), trust(other_cluster, td="prod-us.example.org", iss=OTHER_ISSUER)])

    async def test_each_cluster_names_its_own_trust_domain(self, cluster: DevIssuer,
                                                           other_cluster: DevIssuer) -> None:
        """The same service account in two clusters is two agents: the issuer's cluster picks the trust domain."""
        v = self.verifier(cluster, other_cluster)
        a = await v.verify(sign(cluster, apiserver_claims()))
        b = await v.verify(sign(other_cluster, apiserver_claims(iss=OTHER_ISSUER)))
        assert str(a.spiffe_id) == f"spiffe://{TD}/ns/support/sa/support-bot"
        assert str(b.spiffe_id) == "spiffe://prod-us.example.org/ns/support/sa/support-bot"

    async def test_a_cluster_cannot_claim_another_clusters_issuer(self, cluster: DevIssuer,
                                                                  other_cluster: DevIssuer) -> None:
        """Cluster B's key signing a token that claims cluster A's issuer is refused (no cross-cluster match)."""
        v = self.verifier(cluster, other_cluster)
        # Another cluster's RS256 key under the same kid (kids are per cluster, and may collide).
        forged = DevIssuer.generate(alg="RS256", kid=cluster.kid)
        with pytest.raises(InvalidIdentity) as exc:
            await v.verify(sign(forged, apiserver_claims()))
        assert exc.value.reason == "signature does not verify"
        with pytest.raises(InvalidIdentity) as exc:
            await v.verify(sign(other_cluster, apiserver_claims()))
        assert exc.value.reason == "unknown kid for the cluster"

    async def test_unknown_issuer_and_no_clusters(self, cluster: DevIssuer, other_cluster: DevIssuer) -> None:
        """A token from an unconfigured cluster is refused; so is any service-account token with no cluster."""
        with pytest.raises(InvalidIdentity) as exc:
            await self.verifier(cluster, other_cluster).verify(
                sign(cluster, apiserver_claims(iss="https://k8s.elsewhere.example")))
        assert "no cluster is configured" in exc.value.reason
        with pytest.raises(InvalidIdentity) as exc:
            await AgentVerifier({}, audience=AUD, clock=lambda: NOW).verify(sign(cluster, apiserver_claims()))
        assert "no cluster is configured" in exc.value.reason

    def test_a_trust_domain_belongs_to_one_key_source(self, cluster: DevIssuer) -> None:
        """A cluster may not share a trust domain with a SPIFFE bundle or another cluster, nor an issuer."""
        keys = trust(cluster).keys
        with pytest.raises(ConfigError):
            AgentVerifier({TD: keys}, audience=AUD, clusters=[trust(cluster)])
        with pytest.raises(ConfigError):
            AgentVerifier({}, audience=AUD, clusters=[trust(cluster), trust(cluster, iss=OTHER_ISSUER)])
        with pytest.raises(ConfigError):
            AgentVerifier({}, audience=AUD, clusters=[trust(cluster), trust(cluster, td="b.example.org")])
        with pytest.raises(ConfigError):
            AgentVerifier({}, audience=AUD, user_issuers=[ISSUER], clusters=[trust(cluster)])
        with pytest.raises(ConfigError):
            trust(cluster, iss="kubernetes/serviceaccount")
        with pytest.raises(ConfigError):
            trust(cluster, td="Not A Trust Domain")


class TestConfig:
    def _toml(self, tmp_path: Any, body: str) -> Any:
        from broker.config import load_settings

        path = tmp_path / "broker.toml"
        path.write_text('[server]\naudience = "agent-broker"\n[vault]\ntoken_file = "t"\n[store]\nkey_file = "k"\n'
                        + body)
        return load_settings({}, path)

    def test_clusters_and_delegation_issuers_load(self, tmp_path: Any) -> None:
        """[[agents.kubernetes]] and [[users.delegation_issuers]] load, with jwks_file relative to the file."""
        s = self._toml(tmp_path, f'[[agents.kubernetes]]\ntrust_domain = "{TD}"\nissuer = "{ISSUER}"\n'
                                 'jwks_file = "k8s.jwks"\nmax_token_lifetime = "20m"\n'
                                 '[[users.delegation_issuers]]\nissuer = "https://idp.example.com"\n'
                                 'jwks_url = "https://idp.example.com/jwks"\n')
        c = s.agents.kubernetes[0]
        assert (c.trust_domain, c.issuer, c.jwks_file, c.max_token_lifetime) == (TD, ISSUER, tmp_path / "k8s.jwks",
                                                                                1200)
        assert s.users.delegation_issuers[0].max_token_lifetime == 3600

    @pytest.mark.parametrize("body", [
        f'[[agents.kubernetes]]\ntrust_domain = "{TD}"\nissuer = "{ISSUER}"\n',
        f'[[agents.kubernetes]]\ntrust_domain = "{TD}"\nissuer = "{ISSUER}"\njwks_file = "a"\njwks_url = "https://x"\n',
        f'[[agents.kubernetes]]\ntrust_domain = "{TD}"\njwks_file = "a"\n',
        f'[[agents.kubernetes]]\ntrust_domain = "{TD}"\nissuer = "{ISSUER}"\njwks_file = "a"\naudience = "x"\n',
        '[[users.delegation_issuers]]\nissuer = "https://idp.example.com"\n',
    ])
    def test_refused(self, tmp_path: Any, body: str) -> None:
        """No key source, two, no issuer, or an unknown key: refused at load."""
        with pytest.raises(ConfigError):
            self._toml(tmp_path, body)
