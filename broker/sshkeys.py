"""OpenSSH public keys an agent sends to be signed, and the certificates Vault signs. Pure: no I/O.

The public key is the one request field an agent ever chooses (``broker.engines`` rule 3), so it is
parsed, not pattern-matched: the blob must decode, its declared type must be the type inside it, and
the key must be one of ``ALLOWED_TYPES`` at a strength the broker accepts. What goes on to Vault is the
key re-encoded from the parsed object (``type base64``), never the agent's text: a comment, a second
line or trailing bytes in the blob cannot reach the CA. The audit trail names the key by its SHA-256
fingerprint, written as ``ssh-keygen -l`` prints it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    SSHCertificate,
    load_ssh_public_identity,
    load_ssh_public_key,
)

from broker.errors import BadRequest

__all__ = ["ALLOWED_TYPES", "MIN_RSA_BITS", "SshPublicKey", "certificate_validity", "parse_public_key"]

# Key types an agent may have signed (no DSA, no certificates as keys, no security-key types).
ALLOWED_TYPES: Final = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
                        "ssh-rsa")
MIN_RSA_BITS: Final = 3072
_MAX_RSA_BITS: Final = 16384
_MAX_TEXT: Final = 16 * 1024
_CURVES: Final = {"ecdsa-sha2-nistp256": ec.SECP256R1, "ecdsa-sha2-nistp384": ec.SECP384R1,
                  "ecdsa-sha2-nistp521": ec.SECP521R1}


@dataclass(frozen=True)
class SshPublicKey:
    """A parsed, accepted public key: its type, size in bits, ``SHA256:...`` fingerprint and canonical line."""

    key_type: str
    bits: int
    fingerprint: str
    openssh: str


def _refuse(why: str) -> BadRequest:
    # One message for the agent; the detail (never the key itself) goes to the audit record.
    return BadRequest("public_key must be one OpenSSH public key: ssh-ed25519, ecdsa-sha2-nistp256/384/521, "
                      f"or ssh-rsa of at least {MIN_RSA_BITS} bits", reason=f"public_key refused: {why}")


def parse_public_key(text: object) -> SshPublicKey:
    """Parse ``"<type> <base64> [comment]"`` and check its type and size.

    Raises:
        BadRequest: not a string, several lines, an unknown or disallowed type, a blob that does not
            decode or whose inner type differs from the declared one, or an RSA key under 3072 bits.
    """
    if not isinstance(text, str) or not text.strip() or len(text) > _MAX_TEXT:
        raise _refuse("empty, too long or not a string")
    if "\n" in text.strip() or "\r" in text or "\x00" in text:
        raise _refuse("more than one line")
    parts = text.split()
    if len(parts) < 2:
        raise _refuse("no key blob")
    declared, blob_text = parts[0], parts[1]
    if declared not in ALLOWED_TYPES:
        raise _refuse(f"key type {declared[:40]!r} is not allowed")
    try:
        blob = base64.b64decode(blob_text, validate=True)
        key = load_ssh_public_key(f"{declared} {blob_text}".encode("ascii"))
    except (ValueError, binascii.Error, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise _refuse(f"the key does not parse ({type(exc).__name__})") from exc
    bits = _check_type(declared, key)
    canonical = key.public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode("ascii")
    if canonical.split()[1] != base64.b64encode(blob).decode("ascii"):
        raise _refuse("trailing or non-canonical bytes in the key blob")
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return SshPublicKey(key_type=declared, bits=bits, fingerprint=f"SHA256:{digest}", openssh=canonical)


def _check_type(declared: str, key: object) -> int:
    if declared == "ssh-ed25519":
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise _refuse("the blob is not an Ed25519 key")
        return 256
    if declared == "ssh-rsa":
        if not isinstance(key, rsa.RSAPublicKey):
            raise _refuse("the blob is not an RSA key")
        if not MIN_RSA_BITS <= key.key_size <= _MAX_RSA_BITS:
            raise _refuse(f"an RSA key of {key.key_size} bits")
        return key.key_size
    curve = _CURVES[declared]
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, curve):
        raise _refuse(f"the blob is not a {declared} key")
    return key.curve.key_size


def certificate_validity(signed_key: str) -> tuple[float, float]:
    """``(valid_after, valid_before)`` of an OpenSSH certificate, in seconds since the epoch.

    Raises:
        BadRequest: not an OpenSSH certificate.
    """
    try:
        cert = load_ssh_public_identity(signed_key.strip().encode("ascii"))
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as exc:
        raise BadRequest("not an OpenSSH certificate", reason=f"certificate does not parse ({type(exc).__name__})") \
            from exc
    if not isinstance(cert, SSHCertificate):
        raise BadRequest("not an OpenSSH certificate", reason="a plain public key, not a certificate")
    return float(cert.valid_after), float(cert.valid_before)
