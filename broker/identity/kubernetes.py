"""Kubernetes service-account tokens as agent identities: the pure checks.

A pod's projected service-account token (``TokenRequest`` API, bound to the pod) names the agent
``spiffe://<trust_domain>/ns/<namespace>/sa/<name>``, the SPIFFE convention for Kubernetes workloads,
so task roles match it with the same patterns as any SVID.

The claims a kube-apiserver puts in such a token (``pkg/serviceaccount/claims.go``, ``Claims()``)::

    {"aud": ["agent-broker"], "exp": ..., "iat": ..., "nbf": ..., "iss": "<--service-account-issuer>",
     "jti": "<uuid>",                                       # 1.29+ (ServiceAccountTokenJTI)
     "sub": "system:serviceaccount:<namespace>:<name>",
     "kubernetes.io": {"namespace": "<namespace>",
                       "serviceaccount": {"name": "<name>", "uid": "<uuid>"},
                       "pod": {"name": "<pod>", "uid": "<uuid>"},      # bound to a pod
                       "node": {"name": "<node>", "uid": "<uuid>"},    # 1.30+ with a pod, or node-bound
                       "secret": {...},                                 # bound to a Secret instead
                       "warnafter": ...}}                               # only for the API server's audience

Rules this file keeps, on top of everything ``tokens`` checks for an SVID (structure, header, the key's
bound algorithm, signature, one audience, exp required, nbf/iat, lifetime ceiling):

* The key is the key of the cluster whose ``iss`` the token names, and that cluster alone says which
  trust domain the agent belongs to: a token signed by cluster A and claiming cluster B's issuer fails
  B's signature check, and nothing in a token chooses a trust domain.
* ``sub`` is ``system:serviceaccount:<ns>:<name>`` and agrees with the ``kubernetes.io`` claims: the
  namespace, the service account's name (and a uid), and, where present, the pod's and node's name and
  uid. Two places saying different things is a forgery or a bug, never an identity.
* Legacy secret-based tokens (issuer ``kubernetes/serviceaccount``, flat ``kubernetes.io/serviceaccount/*``
  claims, no ``exp``) never verify: they do not expire and are readable by anyone who can read the Secret.
* The namespace must be a DNS-1123 label and the name a DNS-1123 subdomain, as the API server enforces,
  so the SPIFFE ID built from them is always valid and one name never has two spellings.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from broker.errors import ConfigError, InvalidIdentity
from broker.identity.jwks import JWT_SVID_ALGS, Key, KeySource
from broker.identity.spiffe_id import SpiffeId, spiffe_problem
from broker.identity.tokens import (
    AgentIdentity,
    KeyRef,
    check_audience,
    check_times,
    optional_str,
    parse_jws,
    verify_signature,
)

__all__ = ["LEGACY_ISSUER", "SA_PREFIX", "ClusterTrust", "is_service_account_token", "k8s_key_ref",
           "verify_k8s_token"]

SA_PREFIX: Final = "system:serviceaccount:"
LEGACY_ISSUER: Final = "kubernetes/serviceaccount"
_LEGACY_CLAIM_PREFIX: Final = "kubernetes.io/serviceaccount/"
_DNS1123_LABEL: Final = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_DNS1123_SUBDOMAIN: Final = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*")
_MAX_SUBDOMAIN: Final = 253
# Object uids are UUIDs (k8s.io/apimachinery/pkg/util/uuid).
_UID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _fail(reason: str) -> NoReturn:
    raise InvalidIdentity(reason)


@dataclass(frozen=True)
class ClusterTrust:
    """One trusted cluster: its service-account issuer (exact ``iss``), its keys and its trust domain.

    Raises:
        ConfigError: on construction, if the trust domain is not a valid SPIFFE trust domain or the
            issuer is empty or the legacy issuer.
    """

    trust_domain: str
    issuer: str
    keys: KeySource
    max_lifetime: float = 3600.0

    def __post_init__(self) -> None:
        if spiffe_problem(self.trust_domain, "") is not None:
            msg = f"invalid trust domain {self.trust_domain!r}"
            raise ConfigError(msg)
        if not self.issuer or self.issuer == LEGACY_ISSUER:
            msg = f"cluster {self.trust_domain}: issuer must be the cluster's --service-account-issuer"
            raise ConfigError(msg)


def is_service_account_token(claims: Mapping[str, Any]) -> bool:
    """Routing only: whether unverified claims look like a service-account token (either kind)."""
    sub = claims.get("sub")
    return (isinstance(sub, str) and sub.startswith(SA_PREFIX)) or claims.get("iss") == LEGACY_ISSUER


def k8s_key_ref(token: str) -> KeyRef:
    """Check the token's structure and say which key would verify it: (``iss``, kid).

    Raises:
        InvalidIdentity: if the token is malformed, is a legacy secret-based token, or has no string ``iss``.
    """
    jws = parse_jws(token, JWT_SVID_ALGS)
    _refuse_legacy(jws.claims)
    iss = jws.claims.get("iss")
    if not isinstance(iss, str) or not iss:
        _fail("iss missing or not a string")
    return KeyRef(iss, jws.kid)


def _refuse_legacy(claims: Mapping[str, Any]) -> None:
    if claims.get("iss") == LEGACY_ISSUER or any(
            isinstance(k, str) and k.startswith(_LEGACY_CLAIM_PREFIX) for k in claims):
        _fail("legacy secret-based service-account token")


def _ref(value: object, what: str) -> tuple[str, str]:
    """A ``{"name", "uid"}`` object reference, both present and well formed."""
    if not isinstance(value, dict):
        _fail(f"kubernetes.io {what} is not an object")
    name, uid = value.get("name"), value.get("uid")
    if not isinstance(name, str) or not _dns1123_subdomain(name):
        _fail(f"kubernetes.io {what} name missing or not a DNS-1123 name")
    if not isinstance(uid, str) or not _UID.fullmatch(uid):
        _fail(f"kubernetes.io {what} uid missing or not a uid")
    return name, uid


def _dns1123_subdomain(text: str) -> bool:
    return len(text) <= _MAX_SUBDOMAIN and _DNS1123_SUBDOMAIN.fullmatch(text) is not None


def _service_account(claims: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name) from ``sub``, checked against the ``kubernetes.io`` claims."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.startswith(SA_PREFIX):
        _fail("sub is not a service account")
    namespace, sep, name = sub[len(SA_PREFIX):].partition(":")
    if not sep or not _DNS1123_LABEL.fullmatch(namespace) or not _dns1123_subdomain(name):
        _fail("sub is not system:serviceaccount:<namespace>:<name> with DNS-1123 names")
    private = claims.get("kubernetes.io")
    if not isinstance(private, dict):
        _fail("kubernetes.io claims missing")
    if private.get("namespace") != namespace:
        _fail("kubernetes.io namespace does not match sub")
    sa_name, _uid = _ref(private.get("serviceaccount"), "serviceaccount")
    if sa_name != name:
        _fail("kubernetes.io serviceaccount name does not match sub")
    for bound in ("pod", "node", "secret"):
        if bound in private:
            _ref(private[bound], bound)
    return namespace, name


def verify_k8s_token(
    token: str,
    cluster: ClusterTrust,
    key: Key,
    *,
    audience: str,
    now: float,
    leeway: float = 30.0,
    user_issuers: Collection[str] = (),
) -> AgentIdentity:
    """Verify a projected service-account token with ``key``, taken from ``cluster``'s key source.

    Raises:
        InvalidIdentity: if the token is malformed or legacy; its header breaks the rules; ``iss`` is not
            exactly the cluster's issuer (or is a user issuer); the key or signature is wrong; ``aud`` is
            not exactly ``audience``; exp is missing or exp/nbf/iat are out of range; the lifetime exceeds
            the cluster's ``max_lifetime``; or ``sub`` and the ``kubernetes.io`` claims disagree or are
            not valid Kubernetes names.
    """
    jws = parse_jws(token, JWT_SVID_ALGS)
    claims = jws.claims
    _refuse_legacy(claims)
    if claims.get("iss") != cluster.issuer:
        _fail("iss is not the cluster's issuer")
    if cluster.issuer in user_issuers:
        _fail("the cluster's issuer is a user identity provider")
    verify_signature(token, jws, key)
    check_audience(claims, audience)
    exp = check_times(claims, now=now, leeway=leeway, max_lifetime=cluster.max_lifetime)
    namespace, name = _service_account(claims)
    sid = SpiffeId(cluster.trust_domain, f"/ns/{namespace}/sa/{name}")
    return AgentIdentity(spiffe_id=sid, expires_at=exp, token_id=optional_str(claims, "jti"))
