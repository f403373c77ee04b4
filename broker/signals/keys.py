"""The transmitter's signing key and the JWKS receivers verify SETs with.

Why ES256, and RS256 beside it, and not the audit checkpoints' Ed25519 key:
- A SET is verified by someone else's software. ES256 (ECDSA P-256, SHA-256) is in every JOSE library
  receivers run (Java, .NET, Go, Node, Python) and in the broker's own allow-list. EdDSA (RFC 8037) is not:
  .NET's Microsoft.IdentityModel, for one, has no Ed25519, so a CAEP receiver there could not check our SETs.
- The CAEP Interoperability Profile 1.0 (draft 01, section "Event Signatures") requires RS256 with
  keys of at least 2048 bits. An RSA key file gives RS256, for receivers that follow that profile.
- The key is its own file (``[signals].signing_key_file``), never the checkpoint key: the checkpoint key
  signs what auditors verify offline and must not sign tokens sent to third parties (one key, one
  purpose), and the two rotate on different schedules.

The algorithm is fixed by the key's type (P-256 -> ES256, RSA >= 2048 -> RS256), never chosen per token.
The ``kid`` is the key's RFC 7638 JWK thumbprint, so it changes exactly when the key does. Rotation:
put the new key in ``signing_key_file`` and list the old one in ``retired_key_files`` until no receiver
can still hold a SET it signed; the JWKS publishes both (public halves only), SETs are signed with the new
one. A pending delivery is signed when it is sent, so a retry after a rotation carries the new ``kid``.

Only the loaders below read files; everything else is pure.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.errors import ConfigError
from broker.keyfiles import read_private_file

__all__ = ["SigningKey", "jwks", "load_public_key_file", "load_signing_key", "public_jwk"]

Alg = Literal["ES256", "RS256"]
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
_MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class SigningKey:
    """A private key, the one algorithm it signs with, and its ``kid``."""

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    alg: Alg
    kid: str

    def __repr__(self) -> str:
        return f"SigningKey(alg={self.alg!r}, kid={self.kid!r})"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int(n: int, length: int | None = None) -> str:
    return _b64(n.to_bytes(length or (n.bit_length() + 7) // 8, "big"))


def _alg_of(key: PublicKey, what: str) -> Alg:
    """Raises: ConfigError: a curve other than P-256, or RSA under 2048 bits."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            msg = f"{what}: an EC key must be on P-256 (ES256), not {key.curve.name}"
            raise ConfigError(msg)
        return "ES256"
    if key.key_size < _MIN_RSA_BITS:
        msg = f"{what}: an RSA key must have at least {_MIN_RSA_BITS} bits (RS256), not {key.key_size}"
        raise ConfigError(msg)
    return "RS256"


def _required_members(key: PublicKey) -> dict[str, str]:
    """The JWK's required members (RFC 7638 section 3.2), the input of its thumbprint."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        nums = key.public_numbers()
        return {"crv": "P-256", "kty": "EC", "x": _int(nums.x, 32), "y": _int(nums.y, 32)}
    pub = key.public_numbers()
    return {"e": _int(pub.e), "kty": "RSA", "n": _int(pub.n)}


def thumbprint(key: PublicKey) -> str:
    """RFC 7638: base64url SHA-256 of the required members as JSON, sorted, without whitespace."""
    canonical = json.dumps(_required_members(key), sort_keys=True, separators=(",", ":")).encode()
    return _b64(hashlib.sha256(canonical).digest())


def public_jwk(key: PublicKey, what: str = "signals key") -> dict[str, str]:
    """The public JWK as published: required members, ``kid`` (thumbprint), ``alg``, ``use: sig``.

    Raises:
        ConfigError: see :func:`_alg_of`.
    """
    return {**_required_members(key), "kid": thumbprint(key), "alg": _alg_of(key, what), "use": "sig"}


def jwks(current: SigningKey, retired: tuple[PublicKey, ...] = ()) -> dict[str, Any]:
    """The JWK Set of ``jwks_uri``: the signing key first, then the retired keys still published."""
    keys = [public_jwk(current.key.public_key())]
    seen = {current.kid}
    for pub in retired:
        jwk = public_jwk(pub)
        if jwk["kid"] not in seen:
            seen.add(jwk["kid"])
            keys.append(jwk)
    return {"keys": keys}


# -- files (the only I/O here) --------------------------------------------------------------------------


def load_signing_key(path: Path) -> SigningKey:
    """Read an unencrypted PKCS#8 (or traditional) PEM private key: EC P-256 or RSA of 2048 bits or more.

    Raises:
        ConfigError: missing, readable by group or others, not a PEM private key, or of another type.
    """
    what = f"SSF signing key {path}"
    data = read_private_file(path, what="SSF signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        msg = f"{what} is not an unencrypted PEM private key"
        raise ConfigError(msg) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        msg = f"{what} must be an EC P-256 (ES256) or RSA >= 2048 bits (RS256) key"
        raise ConfigError(msg)
    pub = key.public_key()
    return SigningKey(key=key, alg=_alg_of(pub, what), kid=thumbprint(pub))


def load_public_key_file(path: Path) -> PublicKey:
    """A retired key to keep publishing: a PEM public key, or a private key file (its public half is used).

    Raises:
        ConfigError: unreadable, not PEM, or of a type or size the transmitter does not sign with.
    """
    what = f"retired SSF key {path}"
    try:
        data = path.read_bytes()
    except OSError as exc:
        msg = f"cannot read {what}: {exc.strerror}"
        raise ConfigError(msg) from exc
    pub: object
    try:
        if b"PRIVATE KEY" in data:
            pub = load_signing_key(path).key.public_key()
        else:
            pub = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        msg = f"{what} is not a PEM key"
        raise ConfigError(msg) from exc
    if not isinstance(pub, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        msg = f"{what} must be an EC P-256 or RSA key"
        raise ConfigError(msg)
    _alg_of(pub, what)
    return pub
