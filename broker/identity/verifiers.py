"""The async verifiers: look up the key a token names, then hand over to the pure checks."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NoReturn

from broker.errors import ConfigError, InvalidIdentity
from broker.identity.jwks import JWT_SVID_ALGS, KeySource
from broker.identity.kubernetes import ClusterTrust, is_service_account_token, k8s_key_ref, verify_k8s_token
from broker.identity.spiffe_id import spiffe_problem
from broker.identity.tokens import (
    AgentIdentity,
    KeyRef,
    UserIdentity,
    id_token_key_ref,
    parse_jws,
    svid_subject,
    verify_id_token,
    verify_svid,
)

__all__ = ["MAX_LEEWAY", "AgentVerifier", "IssuerTrust", "UserVerifier"]

MAX_LEEWAY: Final = 60.0


def _fail(reason: str) -> NoReturn:
    raise InvalidIdentity(reason)


# ------------------------------------------------------------------------------------------- verifiers


def _check_windows(leeway: float, max_lifetime: float, audience: str) -> None:
    if not audience:
        msg = "audience must not be empty"
        raise ConfigError(msg)
    if not 0 <= leeway <= MAX_LEEWAY:
        msg = f"leeway must be between 0 and {MAX_LEEWAY:g} seconds"
        raise ConfigError(msg)
    if not 0 < max_lifetime < math.inf:
        msg = "max_lifetime must be a positive number of seconds"
        raise ConfigError(msg)


class AgentVerifier:
    """Verifies JWT-SVIDs against per-trust-domain key sources, and Kubernetes service-account tokens
    against per-cluster ones (``clusters``, ``broker.identity.kubernetes``).

    ``user_issuers`` (optional) lists the configured user IdP issuers: an SVID claiming one of them as
    ``iss`` is refused, as a second guard against token-type confusion.

    A trust domain has one key source: either a SPIFFE bundle or one cluster's keys, never both, so that
    no cluster can mint an identity in a trust domain that SPIRE (or another cluster) holds.
    """

    def __init__(
        self,
        trust: Mapping[str, KeySource],
        *,
        audience: str,
        leeway: float = 30.0,
        max_lifetime: float = 3600.0,
        clock: Callable[[], float] = time.time,
        user_issuers: Collection[str] = (),
        clusters: Sequence[ClusterTrust] = (),
    ) -> None:
        """Trust these trust domains and clusters.

        Raises:
            ConfigError: if a trust domain name is invalid or held twice (by a bundle and a cluster, or two
                clusters), a cluster issuer is repeated or is a user issuer, or audience/leeway/max_lifetime
                are out of range.
        """
        _check_windows(leeway, max_lifetime, audience)
        for td in trust:
            if spiffe_problem(td, "") is not None:
                msg = f"invalid trust domain {td!r}"
                raise ConfigError(msg)
        self._clusters: dict[str, ClusterTrust] = {}
        domains = set(trust)
        for c in clusters:
            if c.trust_domain in domains or c.issuer in self._clusters or c.issuer in user_issuers:
                msg = (f"cluster {c.issuer!r}: its trust domain or issuer is already configured "
                       "(each trust domain and issuer belongs to one key source)")
                raise ConfigError(msg)
            domains.add(c.trust_domain)
            self._clusters[c.issuer] = c
        self._trust = dict(trust)
        self._audience = audience
        self._leeway = leeway
        self._max_lifetime = max_lifetime
        self._clock = clock
        self._user_issuers = frozenset(user_issuers)

    async def verify(self, token: str) -> AgentIdentity:
        """Verify a bearer JWT-SVID.

        Raises:
            InvalidIdentity: see ``verify_svid`` and ``verify_k8s_token``; also if the trust domain or
                cluster is not trusted or the kid is unknown to it.
        """
        # Routing by unverified claims only: each path then checks everything itself. One parse serves the
        # routing and the SVID's key reference (a parse costs ~40 us, a quarter of a signature check).
        jws = parse_jws(token, JWT_SVID_ALGS)
        if is_service_account_token(jws.claims):
            return await self._verify_service_account(token)
        ref = KeyRef(svid_subject(jws.claims).trust_domain, jws.kid)
        source = self._trust.get(ref.owner)
        if source is None:
            _fail("trust domain is not trusted")
        key = await source.get(ref.kid)
        if key is None:
            _fail("unknown kid for the trust domain")
        return verify_svid(
            token,
            key,
            trust_domain=ref.owner,
            audience=self._audience,
            now=self._clock(),
            leeway=self._leeway,
            max_lifetime=self._max_lifetime,
            user_issuers=self._user_issuers,
        )

    async def _verify_service_account(self, token: str) -> AgentIdentity:
        ref = k8s_key_ref(token)
        cluster = self._clusters.get(ref.owner)
        if cluster is None:
            _fail("service-account token from an issuer no cluster is configured with")
        key = await cluster.keys.get(ref.kid)
        if key is None:
            _fail("unknown kid for the cluster")
        return verify_k8s_token(token, cluster, key, audience=self._audience, now=self._clock(),
                                leeway=self._leeway, user_issuers=self._user_issuers)


@dataclass(frozen=True)
class IssuerTrust:
    """One trusted user identity provider: its exact ``iss``, its keys and its groups claim name."""

    issuer: str
    keys: KeySource
    groups_claim: str = "groups"
    # The issuer vouches for every email it puts in a token, verified or not (an enterprise IdP whose
    # directory is the source of addresses). Off by default: then only ``email_verified: true`` counts.
    trust_email: bool = False
    # The domains whose addresses this issuer may vouch for; empty: any. With several issuers, give each
    # its own, so that one IdP cannot mint a trusted address another organisation owns.
    email_domains: tuple[str, ...] = ()


class UserVerifier:
    """Verifies OIDC ID tokens against the configured issuers."""

    def __init__(
        self,
        issuers: Sequence[IssuerTrust],
        *,
        audience: str,
        leeway: float = 30.0,
        max_lifetime: float = 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Trust these issuers.

        Raises:
            ConfigError: if an issuer is empty or repeated, or audience/leeway/max_lifetime are out of range.
        """
        _check_windows(leeway, max_lifetime, audience)
        by_issuer: dict[str, IssuerTrust] = {}
        for trust in issuers:
            if not trust.issuer or trust.issuer in by_issuer:
                msg = f"issuer {trust.issuer!r} is empty or configured twice"
                raise ConfigError(msg)
            if "#" in trust.issuer or "://" not in trust.issuer:
                # A person is "<issuer>#<sub>": an issuer is a URL, and OIDC forbids it a fragment.
                msg = f"issuer {trust.issuer!r} must be a URL without a fragment ('#')"
                raise ConfigError(msg)
            if not trust.groups_claim:
                msg = f"issuer {trust.issuer!r}: groups_claim must not be empty"
                raise ConfigError(msg)
            by_issuer[trust.issuer] = trust
        self._issuers = by_issuer
        self._audience = audience
        self._leeway = leeway
        self._max_lifetime = max_lifetime
        self._clock = clock

    @property
    def issuers(self) -> frozenset[str]:
        """The configured issuers (pass to ``AgentVerifier(user_issuers=...)``)."""
        return frozenset(self._issuers)

    async def verify(self, token: str) -> UserIdentity:
        """Verify a bearer OIDC ID token.

        Raises:
            InvalidIdentity: see ``verify_id_token``; also if ``iss`` is not configured or the kid is
                unknown to that issuer.
        """
        ref = id_token_key_ref(token)
        trust = self._issuers.get(ref.owner)
        if trust is None:
            _fail("issuer is not trusted")
        key = await trust.keys.get(ref.kid)
        if key is None:
            _fail("unknown kid for the issuer")
        return verify_id_token(
            token,
            key,
            issuer=trust.issuer,
            audience=self._audience,
            now=self._clock(),
            leeway=self._leeway,
            max_lifetime=self._max_lifetime,
            groups_claim=trust.groups_claim,
            trust_email=trust.trust_email,
            email_domains=trust.email_domains,
        )
