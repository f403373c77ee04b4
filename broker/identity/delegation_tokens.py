"""Delegation an identity provider already issued (RFC 8693 token exchange): the checks and the verifier.

Where a person's IdP performs token exchange for an agent, the agent holds a token in which ``sub`` is
the person, ``act.sub`` the agent, ``aud`` the broker and ``scope`` names the task role (``task:<role>``).
Presented with the agent's own SVID (or service-account token), it lets the agent start that task for
that person (``POST /v1/tasks`` with ``X-Delegation-Token``).

Rules this file keeps:

* The same structural and cryptographic checks as every other token (``tokens``): the key is the one
  the configured issuer's key source holds for the kid, bound to one algorithm; ``exp`` is required and
  exp/nbf/iat are checked with a small leeway, the lifetime is bounded (so is how long a ``jti`` must be
  remembered). The header may say ``typ: at+jwt`` (RFC 9068), which an ID token may not.
* The person is (``iss``, ``sub``), person id ``<iss>#<sub>``, as for an ID token of a user issuer: a
  delegation names the same person whichever of the IdP's tokens carried it.
* ``act.sub`` is compared with the presenting agent's SPIFFE ID exactly (no pattern, no case folding).
  Only the outermost ``act`` is the current actor (RFC 8693 §4.1); nested ones are history.
* ``aud`` must include the broker's audience; ``scope`` (space-delimited) must hold ``task:<role>`` for
  the role asked for; ``jti`` is required, since the broker accepts each ``jti`` once (the store
  remembers it until the token has expired).
* Every failure raises ``InvalidIdentity``: the caller gets the same 401 as for any bad token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from broker.errors import ConfigError, InvalidIdentity
from broker.identity.jwks import ID_TOKEN_ALGS, Key, KeySource
from broker.identity.tokens import (
    MAX_EMAIL,
    MAX_PERSON_ID,
    MAX_SUBJECT,
    AgentIdentity,
    UserIdentity,
    check_times,
    normalize_email,
    numeric,
    optional_str,
    parse_jws,
    person_id,
    verify_signature,
)

__all__ = ["MAX_JTI", "DelegationIssuerTrust", "DelegationToken", "DelegationVerifier", "check_delegation",
           "verify_delegation_token"]

MAX_JTI: Final = 255
_MAX_SCOPE: Final = 4096
_MAX_AUDIENCES: Final = 16
_TYPS: Final = frozenset({"JWT", "JOSE", "at+jwt", "application/at+jwt"})


def _fail(reason: str) -> NoReturn:
    raise InvalidIdentity(reason)


@dataclass(frozen=True)
class DelegationToken:
    """A verified delegation: ``user`` delegated to the agent ``actor`` whatever ``scopes`` allow, once (``jti``)."""

    user: UserIdentity
    actor: str
    scopes: frozenset[str]
    jti: str
    expires_at: float
    # Until when the token could still verify (exp plus the leeway): how long its jti must be remembered.
    remember_until: float

    @property
    def issuer(self) -> str:
        return self.user.issuer


def _audience_includes(claims: Mapping[str, Any], audience: str) -> None:
    aud = claims.get("aud")
    values = [aud] if isinstance(aud, str) else aud
    if not isinstance(values, list) or not values or len(values) > _MAX_AUDIENCES:
        _fail("aud missing or malformed")
    if not all(isinstance(v, str) for v in values):
        _fail("aud is not a list of strings")
    if audience not in values:
        _fail("aud does not include the broker")


def _actor(claims: Mapping[str, Any]) -> str:
    act = claims.get("act")
    if not isinstance(act, dict):
        _fail("act missing: not a delegation token")
    sub = act.get("sub")
    if not isinstance(sub, str) or not sub:
        _fail("act.sub missing or not a string")
    return sub


def _scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    scope = claims.get("scope")
    if not isinstance(scope, str) or not scope.strip():
        _fail("scope missing or not a string")
    if len(scope) > _MAX_SCOPE:
        _fail("scope too long")
    return frozenset(scope.split())


def verify_delegation_token(
    token: str,
    key: Key,
    *,
    issuer: str,
    audience: str,
    now: float,
    leeway: float = 30.0,
    max_lifetime: float = 3600.0,
    groups_claim: str = "groups",
) -> DelegationToken:
    """Verify an RFC 8693 delegation token with ``key``, which the caller took from ``issuer``'s key source.

    Raises:
        InvalidIdentity: if the token is malformed; its header breaks the rules; ``iss`` is not exactly
            ``issuer``; the key or signature is wrong; ``aud`` does not include ``audience``; exp is
            missing or exp/nbf/iat are out of range; the lifetime exceeds ``max_lifetime``; ``sub`` is
            missing, too long or a SPIFFE ID; ``act.sub``, ``scope`` or ``jti`` is missing or mistyped;
            or the groups/email claims are mistyped.
    """
    jws = parse_jws(token, ID_TOKEN_ALGS, typs=_TYPS)
    claims = jws.claims
    if claims.get("iss") != issuer:
        _fail("iss does not match")
    verify_signature(token, jws, key)
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        _fail("sub missing or not a string")
    if len(sub) > MAX_SUBJECT or len(person_id(issuer, sub)) > MAX_PERSON_ID:
        _fail("sub too long")
    if sub[:7].lower() == "spiffe:":
        _fail("sub is a SPIFFE ID: a delegation names a person")
    _audience_includes(claims, audience)
    exp = check_times(claims, now=now, leeway=leeway, max_lifetime=max_lifetime)
    jti = optional_str(claims, "jti")
    if not jti or len(jti) > MAX_JTI:
        _fail("jti missing or longer than 255 characters")
    actor = _actor(claims)
    scopes = _scopes(claims)
    groups = claims.get(groups_claim, [])
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        _fail("groups claim is not a list of strings")
    email = optional_str(claims, "email") or None
    if email is not None and len(email) > MAX_EMAIL:
        _fail("email longer than 320 characters")
    auth_time = numeric(claims, "auth_time")
    user = UserIdentity(subject=sub, issuer=issuer, groups=frozenset(groups), auth_time=auth_time, expires_at=exp,
                        email=normalize_email(email) if email else None,
                        email_trusted=bool(email) and claims.get("email_verified") is True)
    return DelegationToken(user=user, actor=actor, scopes=scopes, jti=jti, expires_at=exp,
                           remember_until=exp + leeway + 1)


def check_delegation(token: DelegationToken, agent: AgentIdentity, role: str) -> None:
    """Does ``token`` let ``agent`` start ``role`` for its user?

    Raises:
        InvalidIdentity: ``act.sub`` is not exactly the agent's SPIFFE ID, or ``scope`` lacks ``task:<role>``.
    """
    if token.actor != str(agent.spiffe_id):
        _fail(f"the delegation's act.sub is not the presenting agent {agent.spiffe_id}")
    if f"task:{role}" not in token.scopes:
        _fail(f"the delegation's scope does not name task:{role}")


@dataclass(frozen=True)
class DelegationIssuerTrust:
    """One identity provider whose token-exchange output the broker accepts as delegation."""

    issuer: str
    keys: KeySource
    groups_claim: str = "groups"
    max_lifetime: float = 3600.0


class DelegationVerifier:
    """Verifies delegation tokens against the configured ``[[users.delegation_issuers]]``."""

    def __init__(self, issuers: Sequence[DelegationIssuerTrust], *, audience: str, leeway: float = 30.0,
                 clock: Callable[[], float] = time.time) -> None:
        """Raises: ConfigError: an issuer is empty, repeated, not a URL, or holds ``#``; a bad lifetime."""
        by_issuer: dict[str, DelegationIssuerTrust] = {}
        for trust in issuers:
            if not trust.issuer or trust.issuer in by_issuer or "#" in trust.issuer or "://" not in trust.issuer:
                msg = f"delegation issuer {trust.issuer!r} must be a URL without '#', configured once"
                raise ConfigError(msg)
            if not 0 < trust.max_lifetime < math.inf or not trust.groups_claim:
                msg = f"delegation issuer {trust.issuer!r}: bad max_token_lifetime or groups_claim"
                raise ConfigError(msg)
            by_issuer[trust.issuer] = trust
        self._issuers = by_issuer
        self._audience = audience
        self._leeway = leeway
        self._clock = clock

    @property
    def configured(self) -> bool:
        return bool(self._issuers)

    async def verify(self, token: str) -> DelegationToken:
        """Raises: InvalidIdentity: see ``verify_delegation_token``; also an unknown issuer or kid."""
        jws = parse_jws(token, ID_TOKEN_ALGS, typs=_TYPS)
        iss = jws.claims.get("iss")
        trust = self._issuers.get(iss) if isinstance(iss, str) else None
        if trust is None:
            _fail("delegation issuer is not trusted")
        key = await trust.keys.get(jws.kid)
        if key is None:
            _fail("unknown kid for the delegation issuer")
        return verify_delegation_token(token, key, issuer=trust.issuer, audience=self._audience, now=self._clock(),
                                       leeway=self._leeway, max_lifetime=trust.max_lifetime,
                                       groups_claim=trust.groups_claim)
