"""The pure core: checking JWT-SVIDs and OIDC ID tokens against a key and a time ``now``."""

from __future__ import annotations

import base64
import binascii
import math
import re
import unicodedata
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, NoReturn

import jwt

from broker.errors import InvalidIdentity
from broker.identity.jwks import ID_TOKEN_ALGS, JWT_SVID_ALGS, KID_RE, Key, strict_json
from broker.identity.spiffe_id import SpiffeId

__all__ = [
    "MAX_TOKEN_BYTES",
    "AgentIdentity",
    "KeyRef",
    "UserIdentity",
    "id_token_key_ref",
    "normalize_email",
    "person_id",
    "svid_key_ref",
    "verify_id_token",
    "verify_svid",
]

MAX_TOKEN_BYTES: Final = 8 * 1024
MAX_SUBJECT: Final = 255
MAX_EMAIL: Final = 320
# The store's columns for a person hold 320 characters: issuer, "#" and subject must fit.
MAX_PERSON_ID: Final = 320
_ALLOWED_HEADERS: Final = frozenset({"alg", "kid", "typ"})
_ALLOWED_TYP: Final = frozenset({"JWT", "JOSE"})
_SEGMENT_CHARS_RE: Final = re.compile(r"[A-Za-z0-9_-]+")

# ------------------------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class AgentIdentity:
    """A verified agent (workload): the SVID's SPIFFE ID, its expiry and its ``jti`` if it had one."""

    spiffe_id: SpiffeId
    expires_at: float
    token_id: str | None


def person_id(issuer: str, subject: str) -> str:
    """A person's stable id: ``<issuer>#<subject>``.

    Unambiguous: an OIDC issuer is an https URL without a fragment (the configuration refuses an issuer
    holding ``#``), so the first ``#`` ends the issuer, and everything after it is the subject, verbatim.
    It always contains ``://``, which no email address does.
    """
    return f"{issuer}#{subject}"


def normalize_email(text: str) -> str:
    """An email address as the broker compares it: NFKC, surrounding space stripped, case-folded.

    Applied alike to token claims, catalog principals and operators' selectors, so that no spelling of
    an address (``Zoe@Example.test``, a full-width letter, a trailing space) slips past a lock on it.
    """
    return unicodedata.normalize("NFKC", text).strip().casefold()


def is_person_id(text: str) -> bool:
    """Whether ``text`` has the form of :func:`person_id` (else it is an email address or a legacy name)."""
    issuer, sep, subject = text.partition("#")
    return bool(sep and subject) and "://" in issuer


@dataclass(frozen=True)
class UserIdentity:
    """A verified person from an OIDC ID token.

    A person *is* the pair (``issuer``, ``subject``), exposed as ``id``: every decision about a person
    (ownership, self-approval, votes, locks, budgets) compares ``id``. ``email`` is the address the token
    claims (normalised by :func:`normalize_email`); it is ``trusted`` only where the issuer marks it
    verified (``email_verified: true``, exactly) or the issuer's configuration says ``trust_email`` (and,
    with ``email_domains``, only within those domains). Only a trusted address *grants* anything (a
    ``user:EMAIL`` principal); any claimed address may *refuse* (a lock by email holds whoever claims it:
    a presenter can only lock themselves out).
    """

    subject: str
    issuer: str
    groups: frozenset[str]
    auth_time: float | None
    expires_at: float
    email: str | None = None
    email_trusted: bool = False

    @property
    def id(self) -> str:
        return person_id(self.issuer, self.subject)

    @property
    def trusted_email(self) -> str | None:
        return self.email if self.email_trusted else None

    @property
    def name(self) -> str:
        """For people to read (logs, pages, audit ``user_name``): the trusted email, else ``sub``. Never matched on."""
        return self.trusted_email or self.subject


# --------------------------------------------------------------------------------------- JWS structure


def _fail(reason: str) -> NoReturn:
    raise InvalidIdentity(reason)


def _b64url_decode(segment: str, what: str) -> bytes:
    """Strict base64url: no padding, no whitespace, and canonical (unused trailing bits zero)."""
    if len(segment) % 4 == 1:
        _fail(f"{what} is not base64url")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        _fail(f"{what} is not base64url")
    # Several encodings decode to the same bytes; accept only the canonical one so the signed bytes
    # and the bytes we parsed are the same thing.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != segment:
        _fail(f"{what} is not canonical base64url")
    return raw


@dataclass(frozen=True)
class _Jws:
    """A structurally valid compact JWS whose signature has not been checked."""

    alg: str
    kid: str
    claims: dict[str, Any]


def _parse_jws(token: object, algs: tuple[str, ...], *, typs: frozenset[str] = _ALLOWED_TYP) -> _Jws:
    """Check everything about the token's shape and header (``alg`` one of ``algs``); the signature comes later.

    ``typs``: the header ``typ`` values accepted when there is one (an absent ``typ`` is accepted).
    """
    if not isinstance(token, str):
        _fail("token is not a string")
    # Length first, before any decoding: len() in characters bounds the bytes for the ASCII we accept.
    if len(token) > MAX_TOKEN_BYTES:
        _fail("token larger than 8 KiB")
    segments = token.split(".")
    if len(segments) != 3:
        # JWE has 5 segments, JWS JSON serialization has none: neither is a JWT-SVID or ID token.
        _fail(f"token is not a compact JWS ({len(segments)} segments)")
    if not all(_SEGMENT_CHARS_RE.fullmatch(s) for s in segments):
        _fail("token segment is empty or not base64url")
    try:
        header = strict_json(_b64url_decode(segments[0], "header"))
    except ValueError:
        _fail("header is not a JSON object without duplicate members")
    if not isinstance(header, dict):
        _fail("header is not a JSON object")
    extra = header.keys() - _ALLOWED_HEADERS
    if extra:
        # Named only if they are well-known names; unknown names are attacker text.
        known = sorted(extra & {"crit", "jku", "jwk", "x5u", "x5c", "x5t", "x5t#S256", "b64", "zip", "enc"})
        _fail(f"header has forbidden parameters {known}" if known else "header has unknown parameters")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algs:
        _fail("alg missing or not allowed")
    kid = header.get("kid")
    if not isinstance(kid, str) or not KID_RE.fullmatch(kid):
        _fail("kid missing or malformed")
    if "typ" in header and header["typ"] not in typs:
        _fail("typ must be JWT or JOSE" if typs == _ALLOWED_TYP else "typ not accepted for this kind of token")
    try:
        claims = strict_json(_b64url_decode(segments[1], "payload"))
    except ValueError:
        _fail("payload is not a JSON object without duplicate members")
    if not isinstance(claims, dict):
        _fail("payload is not a JSON object")
    _b64url_decode(segments[2], "signature")
    return _Jws(alg=alg, kid=kid, claims=claims)


def _check_signature(token: str, jws: _Jws, key: Key) -> None:
    if jws.kid != key.kid:
        _fail("key does not match kid")
    if jws.alg != key.alg:
        _fail("alg does not match the key's algorithm")
    try:
        # PyJWT does the cryptography; passing the PyJWK and exactly its algorithm means PyJWT also
        # refuses any alg other than the key's.
        jwt.PyJWS().decode_complete(token, key=key.jwk, algorithms=[key.alg])
    except jwt.InvalidSignatureError:
        _fail("signature does not verify")
    except Exception:  # noqa: BLE001 -- the foreign boundary: nothing but InvalidIdentity leaves here
        _fail("signature could not be checked")


# ---------------------------------------------------------------------------------------------- claims


def _numeric(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim as a float, None if absent; bools, strings, inf and NaN are refused."""
    if name not in claims:
        return None
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(f"{name} is not a number")
    try:
        as_float = float(value)
    except OverflowError:
        _fail(f"{name} is out of range")
    if not math.isfinite(as_float):
        _fail(f"{name} is out of range")
    return as_float


def _check_audience(claims: Mapping[str, Any], audience: str) -> None:
    aud = claims.get("aud")
    if aud is None:
        _fail("aud missing")
    # One audience only: a token for several audiences can be replayed by any of them (JWT-SVID §6.2).
    if isinstance(aud, list):
        if len(aud) != 1:
            _fail("aud must name exactly one audience")
        aud = aud[0]
    if not isinstance(aud, str) or aud != audience:
        _fail("aud does not match")


def _check_times(claims: Mapping[str, Any], *, now: float, leeway: float, max_lifetime: float) -> float:
    """Check exp/nbf/iat and the lifetime ceiling; return exp."""
    exp = _numeric(claims, "exp")
    if exp is None:
        _fail("exp missing")
    nbf = _numeric(claims, "nbf")
    iat = _numeric(claims, "iat")
    if exp + leeway <= now:
        _fail("token expired")
    if nbf is not None and nbf > now + leeway:
        _fail("token not yet valid (nbf)")
    if iat is not None and iat > now + leeway:
        _fail("token issued in the future (iat)")
    if iat is not None and exp < iat:
        _fail("exp before iat")
    lifetime = exp - (iat if iat is not None else now)
    if lifetime > max_lifetime:
        _fail("token lifetime exceeds the maximum")
    return exp


def _optional_str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is not None and not isinstance(value, str):
        _fail(f"{name} is not a string")
    return value


def _in_domains(email: str | None, domains: Collection[str]) -> bool:
    """No ``email_domains`` configured: any domain; else the address's domain must be one of them."""
    if not domains or email is None:
        return True
    return email.rpartition("@")[2] in domains


def _looks_like_spiffe(value: str) -> bool:
    return value[:7].lower() == "spiffe:"


# --------------------------------------------------------------------------------------------- JWT-SVID


class KeyRef(NamedTuple):
    """Where a token says its key is: ``owner`` is a trust domain (SVID) or an issuer (ID token)."""

    owner: str
    kid: str


def _svid_subject(claims: Mapping[str, Any]) -> SpiffeId:
    sub = claims.get("sub")
    if not isinstance(sub, str):
        _fail("sub missing or not a string")
    sid = SpiffeId.parse(sub)
    if not sid.path:
        _fail("sub is a trust domain ID, not a workload")
    return sid


def svid_key_ref(token: str) -> KeyRef:
    """Check a JWT-SVID's structure and say which key would verify it: (sub's trust domain, kid).

    Nothing here is trusted yet: this only tells the caller which trust domain's keys to look in.

    Raises:
        InvalidIdentity: if the token is malformed or ``sub`` is not a workload SPIFFE ID.
    """
    jws = _parse_jws(token, JWT_SVID_ALGS)
    return KeyRef(_svid_subject(jws.claims).trust_domain, jws.kid)


def verify_svid(
    token: str,
    key: Key,
    *,
    trust_domain: str,
    audience: str,
    now: float,
    leeway: float = 30.0,
    max_lifetime: float = 3600.0,
    user_issuers: Collection[str] = (),
) -> AgentIdentity:
    """Verify a JWT-SVID with ``key``, which the caller took from ``trust_domain``'s key source.

    Raises:
        InvalidIdentity: if the token is malformed; its header breaks the rules; ``sub`` is not a
            workload SPIFFE ID of ``trust_domain``; ``key`` is not its kid's key or not for its alg; the
            signature fails; ``aud`` is not exactly ``audience``; exp/nbf/iat are missing, mistyped or
            out of range; the lifetime exceeds ``max_lifetime``; or ``iss`` is a user issuer.
    """
    jws = _parse_jws(token, JWT_SVID_ALGS)
    sid = _svid_subject(jws.claims)
    # The key must come from the trust domain the token claims to belong to, never a neighbour's.
    if sid.trust_domain != trust_domain:
        _fail("key is not from the sub's trust domain")
    _check_signature(token, jws, key)
    claims = jws.claims
    # TH-31: a person's ID token is never an agent's SVID, even if both are signed by one key.
    iss = claims.get("iss")
    if isinstance(iss, str) and iss in user_issuers:
        _fail("token was issued by a user identity provider")
    _check_audience(claims, audience)
    exp = _check_times(claims, now=now, leeway=leeway, max_lifetime=max_lifetime)
    return AgentIdentity(spiffe_id=sid, expires_at=exp, token_id=_optional_str(claims, "jti"))


# ---------------------------------------------------------------------------------------- OIDC ID token


def id_token_key_ref(token: str) -> KeyRef:
    """Check an ID token's structure and say which key would verify it: (iss, kid).

    Raises:
        InvalidIdentity: if the token is malformed or has no string ``iss``.
    """
    jws = _parse_jws(token, ID_TOKEN_ALGS)
    iss = jws.claims.get("iss")
    if not isinstance(iss, str) or not iss:
        _fail("iss missing or not a string")
    return KeyRef(iss, jws.kid)


def verify_id_token(
    token: str,
    key: Key,
    *,
    issuer: str,
    audience: str,
    now: float,
    leeway: float = 30.0,
    max_lifetime: float = 86400.0,
    groups_claim: str = "groups",
    trust_email: bool = False,
    email_domains: Collection[str] = (),
) -> UserIdentity:
    """Verify an OIDC ID token with ``key``, which the caller took from ``issuer``'s key source.

    ``groups`` comes from ``groups_claim``: absent means no groups; anything but a list of strings is
    rejected rather than read as "no groups", so an IdP misconfiguration is visible. The email is
    trusted only when ``email_verified`` is exactly ``true`` or ``trust_email`` is set: a missing or
    false ``email_verified`` may be an address the user typed in themselves.

    Raises:
        InvalidIdentity: if the token is malformed; its header breaks the rules; ``iss`` is not exactly
            ``issuer``; the key or signature is wrong; ``aud`` is not exactly ``audience``;
            exp/nbf/iat/auth_time are missing (exp), mistyped or out of range; the lifetime exceeds
            ``max_lifetime``; ``sub`` is missing, empty or a SPIFFE ID; or groups/email are mistyped.
    """
    jws = _parse_jws(token, ID_TOKEN_ALGS)
    claims = jws.claims
    if claims.get("iss") != issuer:
        _fail("iss does not match")
    _check_signature(token, jws, key)
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        _fail("sub missing or not a string")
    if len(sub) > MAX_SUBJECT:
        # OIDC Core 2: "It MUST NOT exceed 255 ASCII characters in length."
        _fail("sub longer than 255 characters")
    if len(person_id(issuer, sub)) > MAX_PERSON_ID:
        _fail("issuer and sub together longer than 320 characters")
    # TH-31: a SPIFFE ID is an agent, never a person, whatever key signed it.
    if _looks_like_spiffe(sub):
        _fail("sub is a SPIFFE ID: agent tokens are not user tokens")
    # TH-10: a token with an actor (RFC 8693 ``act``) was handed to that actor to act *for* the person; it
    # is never the person's own sign-in, even from the same IdP with the same keys. Accepting it here would
    # let the agent holding a delegation token act as the person on every route.
    if "act" in claims:
        _fail("token names an actor (act): a delegation token is not the user's ID token")
    _check_audience(claims, audience)
    exp = _check_times(claims, now=now, leeway=leeway, max_lifetime=max_lifetime)
    auth_time = _numeric(claims, "auth_time")
    if auth_time is not None and auth_time > now + leeway:
        _fail("auth_time in the future")
    groups_value = claims.get(groups_claim, [])
    if not isinstance(groups_value, list) or not all(isinstance(g, str) for g in groups_value):
        _fail("groups claim is not a list of strings")
    email = _optional_str(claims, "email") or None
    if email is not None and len(email) > MAX_EMAIL:
        _fail("email longer than 320 characters")
    email = normalize_email(email) if email else None
    # Only the JSON literal true verifies: a missing claim, false, or the string "true" some IdPs send
    # leaves the address untrusted (shown, never matched), which costs nothing since people match by id.
    verified = claims.get("email_verified")
    return UserIdentity(
        subject=sub,
        issuer=issuer,
        groups=frozenset(groups_value),
        auth_time=auth_time,
        expires_at=exp,
        email=email or None,
        email_trusted=bool(email) and (verified is True or trust_email) and _in_domains(email, email_domains),
    )


# The checks above, for the other token kinds' modules (``kubernetes``, ``delegation_tokens``).
parse_jws = _parse_jws
verify_signature = _check_signature
check_audience = _check_audience
check_times = _check_times
optional_str = _optional_str
numeric = _numeric
svid_subject = _svid_subject
