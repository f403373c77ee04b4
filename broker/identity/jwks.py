"""Verification keys: JWKS documents, each key bound to one algorithm, and where they come from."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn, Protocol

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from yarl import URL

from broker.errors import ConfigError

__all__ = [
    "ALLOWED_ALGS",
    "ID_TOKEN_ALGS",
    "JWT_SVID_ALGS",
    "KID_RE",
    "JwksKeySet",
    "JwksUrlKeySource",
    "Key",
    "KeySource",
    "StaticKeySource",
    "load_key_source",
    "strict_json",
]

_log = logging.getLogger(__name__)

# The SPIFFE JWT-SVID spec §2.1 (RFC 7518 §3.3-3.5), exactly: "Validators receiving a token with the alg
# parameter set to a different value MUST reject the token." go-spiffe allows the same nine.
JWT_SVID_ALGS: Final[tuple[str, ...]] = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
                                         "PS256", "PS384", "PS512")
# People's ID tokens (OIDC) may also be EdDSA. HMAC and "none" are never here: no key is ever symmetric.
ID_TOKEN_ALGS: Final[tuple[str, ...]] = (*JWT_SVID_ALGS, "EdDSA")
# Every algorithm a loaded key may be bound to.
ALLOWED_ALGS: tuple[str, ...] = ID_TOKEN_ALGS
_RSA_ALGS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
MAX_JWKS_BYTES: Final = 64 * 1024
MAX_JWKS_KEYS: Final = 100
_MIN_RSA_BITS: Final = 2048
KID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
# JWK members that only a private or symmetric key has: a JWKS that carries them leaks a secret.
_PRIVATE_JWK_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# The one algorithm each (kty, crv) may be used with; RSA is decided by the JWK's "alg".
_ALG_BY_CURVE: Final[Mapping[tuple[object, object], str]] = {
    ("EC", "P-256"): "ES256",
    ("EC", "P-384"): "ES384",
    ("EC", "P-521"): "ES512",
    ("OKP", "Ed25519"): "EdDSA",
}


@dataclass(frozen=True)
class Key:
    """One verification key, bound to exactly one algorithm."""

    kid: str
    alg: str
    jwk: jwt.PyJWK = field(compare=False, repr=False)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses duplicate member names instead of keeping the last one."""
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            msg = "duplicate JSON member"
            raise ValueError(msg)
        out[name] = value
    return out


def _reject_constant(name: str) -> NoReturn:
    """``parse_constant`` hook: NaN and Infinity are not JSON."""
    msg = "non-standard JSON constant"
    raise ValueError(msg)


def strict_json(raw: bytes) -> object:
    """Decode UTF-8 JSON, refusing duplicate names and NaN/Infinity.

    Raises:
        ValueError: on any malformed input (RecursionError is folded in: deep nesting is malformed too).
    """
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except RecursionError as exc:
        msg = "JSON nested too deeply"
        raise ValueError(msg) from exc


class _Unusable(Exception):
    """A key this broker cannot use (unsupported type, curve or algorithm, broken or unnamed): skipped.

    An outcome of parsing one key, never raised past this module (so not a BrokerError).
    """


def _jwk_to_key(jwk: Mapping[str, Any]) -> Key | None:
    """Validate one JWK and bind it to its algorithm; None for an X.509-SVID key (not for JWTs).

    Raises:
        ConfigError: the key is symmetric or carries private material: a secret was published, and the
            whole document is refused so that someone looks.
        _Unusable: the key cannot be used here (an unsupported kty, curve or alg, a use or key_ops
            that exclude verification, a kid the broker cannot select it by, bad key material, RSA
            under 2048 bits). The caller skips it and serves the rest of the document.
    """
    if not isinstance(jwk, dict):
        raise _Unusable("not an object")
    kty = jwk.get("kty")
    kid = jwk.get("kid")
    named = kid if isinstance(kid, str) and KID_RE.fullmatch(kid) else None
    if kty == "oct":
        msg = f"JWKS key {named or '(unnamed)'}: symmetric (oct) keys are never accepted"
        raise ConfigError(msg)
    if _PRIVATE_JWK_MEMBERS & jwk.keys():
        msg = f"JWKS key {named or '(unnamed)'}: contains private key material"
        raise ConfigError(msg)
    if named is None:
        raise _Unusable("needs a kid of 1-128 characters from [A-Za-z0-9._-]")
    use = jwk.get("use")
    # SPIFFE bundles mark keys "jwt-svid" (usable here) or "x509-svid" (for X.509, skip); RFC 7517 says "sig".
    if use == "x509-svid":
        return None
    if use not in (None, "sig", "jwt-svid"):
        raise _Unusable("use must be 'sig', 'jwt-svid' or absent")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise _Unusable("key_ops does not allow verify")
    declared = jwk.get("alg")
    if kty == "RSA":
        alg = "RS256" if declared is None else declared
        if alg not in _RSA_ALGS:
            raise _Unusable("RSA keys must be RS256/384/512 or PS256/384/512")
    elif kty in ("EC", "OKP"):
        derived = _ALG_BY_CURVE.get((kty, jwk.get("crv")))
        if derived is None:
            raise _Unusable("unsupported curve")
        if declared is not None and declared != derived:
            raise _Unusable("alg does not match the key's curve")
        alg = derived
    else:
        raise _Unusable("unsupported kty")
    try:
        pyjwk = jwt.PyJWK(dict(jwk), algorithm=alg)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise _Unusable(f"not a valid {alg} public key") from exc
    if isinstance(pyjwk.key, RSAPublicKey) and pyjwk.key.key_size < _MIN_RSA_BITS:
        raise _Unusable(f"RSA key shorter than {_MIN_RSA_BITS} bits")
    return Key(kid=named, alg=alg, jwk=pyjwk)


class JwksKeySet:
    """Keys of one JWKS document, by kid.

    Each key is bound to ONE algorithm: the JWK's ``alg`` or, without it, derived from kty/crv
    (EC P-256 -> ES256, P-384 -> ES384, P-521 -> ES512, OKP Ed25519 -> EdDSA, RSA -> RS256; RSA may
    declare RS384/RS512/PS256/PS384/PS512).

    A document with a symmetric (``oct``) key or private key members is refused whole: a secret was
    published. A key the broker cannot use (another kty or curve, an alg outside the list, ``use``
    other than ``sig``/``jwt-svid``/absent, ``key_ops`` without verify, a missing or malformed kid,
    broken key material, RSA under 2048 bits) is skipped and logged, and the rest serve; SPIFFE
    bundle keys with ``use: "x509-svid"`` are skipped silently. Limits: document <= 64 KiB, <= 100
    keys, kid ``[A-Za-z0-9._-]{1,128}``, kids unique, at least one usable key.
    """

    __slots__ = ("_keys", "skipped")

    def __init__(self, keys: Mapping[str, Key], *, skipped: tuple[str, ...] = ()) -> None:
        self._keys = dict(keys)
        # Why each key the document held was not loaded (logged when parsed), for operators' tools.
        self.skipped = skipped

    @classmethod
    def from_json(cls, text: str | bytes) -> JwksKeySet:
        """Parse a JWKS document.

        Raises:
            ConfigError: if the document or any key breaks the rules above, or no usable key is left.
        """
        raw = text.encode("utf-8") if isinstance(text, str) else text
        if len(raw) > MAX_JWKS_BYTES:
            msg = "JWKS document is larger than 64 KiB"
            raise ConfigError(msg)
        try:
            doc = strict_json(raw)
        except ValueError as exc:
            msg = "JWKS document is not valid JSON"
            raise ConfigError(msg) from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            msg = "JWKS document must be an object with a 'keys' list"
            raise ConfigError(msg)
        if len(doc["keys"]) > MAX_JWKS_KEYS:
            msg = f"JWKS document has more than {MAX_JWKS_KEYS} keys"
            raise ConfigError(msg)
        keys: dict[str, Key] = {}
        skipped: list[str] = []
        for i, jwk in enumerate(doc["keys"]):
            try:
                key = _jwk_to_key(jwk)
            except _Unusable as exc:
                # One key the broker cannot use must not lock out every agent the others sign for.
                kid = jwk.get("kid") if isinstance(jwk, dict) else None
                name = kid if isinstance(kid, str) and KID_RE.fullmatch(kid) else f"#{i}"
                skipped.append(f"key {name}: {exc}")
                _log.warning("JWKS key %s skipped: %s", name, exc)
                continue
            if key is None:
                continue
            if key.kid in keys:
                # Two keys under one kid would make the choice of key depend on document order.
                msg = f"JWKS key {key.kid}: duplicate kid"
                raise ConfigError(msg)
            keys[key.kid] = key
        if not keys:
            why = f" (skipped {'; '.join(skipped)})" if skipped else ""
            msg = f"JWKS document has no usable signing key{why}"
            raise ConfigError(msg)
        return cls(keys, skipped=tuple(skipped))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> JwksKeySet:
        """Read and parse a JWKS file.

        Raises:
            ConfigError: if the file cannot be read or is not an acceptable JWKS.
        """
        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_JWKS_BYTES + 1)
        except OSError as exc:
            msg = f"cannot read JWKS file {os.fspath(path)!r}: {exc.strerror}"
            raise ConfigError(msg) from exc
        return cls.from_json(raw)

    def get(self, kid: str) -> Key | None:
        """The key with this kid, or None."""
        return self._keys.get(kid)

    @property
    def kids(self) -> frozenset[str]:
        """Every kid in the set."""
        return frozenset(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[Key]:
        return iter(self._keys.values())


class KeySource(Protocol):
    """Where a verifier finds a key by kid. ``get`` returns None for a kid it does not know."""

    async def get(self, kid: str) -> Key | None: ...


class StaticKeySource:
    """A JWKS loaded once (from a file, at start-up); ``get`` never does I/O."""

    def __init__(self, keys: JwksKeySet) -> None:
        self._keys = keys

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> StaticKeySource:
        """Load the JWKS file now.

        Raises:
            ConfigError: see ``JwksKeySet.from_file``.
        """
        return cls(JwksKeySet.from_file(path))

    async def get(self, kid: str) -> Key | None:
        return self._keys.get(kid)


class _FetchFailed(Exception):
    """A JWKS fetch did not produce an acceptable document (internal; logged, never raised out)."""


class JwksUrlKeySource:
    """A JWKS fetched over HTTPS and cached.

    * https only, unless ``allow_insecure_http`` (tests and the dev stack on 127.0.0.1); redirects are
      not followed, so a compromised or misconfigured endpoint cannot bounce us to another host;
    * body <= 64 KiB, timeout 2 s;
    * the cache is refreshed when older than ``max_age`` or when a kid is unknown, but fetches (successful
      or not) are at least ``min_refresh_interval`` apart and concurrent callers share one fetch, so an
      unknown-kid flood costs the IdP at most one request per interval (TH-03);
    * a failed fetch keeps the previous keys and is logged; ``get`` then answers from them (or None).
    """

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        *,
        allow_insecure_http: bool = False,
        min_refresh_interval: float = 30.0,
        max_age: float = 300.0,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Check the URL; nothing is fetched until the first ``get``.

        Raises:
            ConfigError: if the URL is not https (or http when allowed) with a host and no credentials.
        """
        try:
            parsed = URL(url)
        except (ValueError, TypeError) as exc:
            msg = "jwks_url is not a URL"
            raise ConfigError(msg) from exc
        schemes = ("https", "http") if allow_insecure_http else ("https",)
        if parsed.scheme not in schemes or not parsed.host or parsed.user or parsed.password:
            msg = "jwks_url must be an https:// URL with a host and no credentials"
            raise ConfigError(msg)
        self._url = parsed
        self._session = session
        self._min_refresh_interval = min_refresh_interval
        self._max_age = max_age
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._keys: JwksKeySet | None = None
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0  # attempts made; tests and metrics read it

    def _fresh(self, now: float) -> bool:
        return self._fetched_at is not None and now - self._fetched_at < self._max_age

    async def get(self, kid: str) -> Key | None:
        """The key with this kid, fetching the JWKS if the cache is stale or lacks it (rate limited)."""
        key = self._keys.get(kid) if self._keys is not None else None
        if key is not None and self._fresh(self._clock()):
            return key
        async with self._lock:
            # Another caller may have refreshed while we waited for the lock.
            key = self._keys.get(kid) if self._keys is not None else None
            now = self._clock()
            if key is not None and self._fresh(now):
                return key
            if self._last_attempt is None or now - self._last_attempt >= self._min_refresh_interval:
                self._last_attempt = now
                await self._refresh(now)
            return self._keys.get(kid) if self._keys is not None else None

    async def _refresh(self, now: float) -> None:
        self.fetches += 1
        try:
            keys = JwksKeySet.from_json(await self._fetch())
        except (_FetchFailed, ConfigError, aiohttp.ClientError, TimeoutError) as exc:
            _log.warning("JWKS fetch from %s failed: %s", self._url.with_query(None), type(exc).__name__)
            return
        self._keys = keys
        self._fetched_at = now

    async def _fetch(self) -> bytes:
        async with self._session.get(
            self._url, allow_redirects=False, timeout=self._timeout, headers={"Accept": "application/json"}
        ) as resp:
            if resp.status != 200:
                msg = f"status {resp.status}"
                raise _FetchFailed(msg)
            if resp.content_length is not None and resp.content_length > MAX_JWKS_BYTES:
                msg = "too large"
                raise _FetchFailed(msg)
            body = bytearray()
            async for chunk in resp.content.iter_chunked(16 * 1024):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    msg = "too large"
                    raise _FetchFailed(msg)
            return bytes(body)


def load_key_source(
    *,
    jwks_file: str | os.PathLike[str] | None,
    jwks_url: str | None,
    session: aiohttp.ClientSession | None = None,
    allow_insecure_http: bool = False,
) -> KeySource:
    """Build the key source a config entry names: exactly one of ``jwks_file`` or ``jwks_url``.

    Raises:
        ConfigError: if neither or both are given, a URL comes without a session, or the file is bad.
    """
    if (jwks_file is None) == (jwks_url is None):
        msg = "exactly one of jwks_file and jwks_url must be set"
        raise ConfigError(msg)
    if jwks_file is not None:
        return StaticKeySource.from_file(jwks_file)
    if session is None:
        msg = "jwks_url needs an HTTP session"
        raise ConfigError(msg)
    assert jwks_url is not None
    return JwksUrlKeySource(jwks_url, session, allow_insecure_http=allow_insecure_http)
