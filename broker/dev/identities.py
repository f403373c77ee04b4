"""DEV/TEST ONLY: throwaway token issuers for ``broker dev`` and the test suite.

Nothing here belongs in a production deployment. A ``DevIssuer`` stands in for a SPIRE server (minting
JWT-SVIDs) and for a user identity provider (minting OIDC ID tokens) so the dev stack and tests can run
without either. Production trusts real issuers through ``broker.identity`` key sources; no setting in
``config.py`` should construct a ``DevIssuer``.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

from broker.errors import ConfigError

__all__ = ["DevIssuer"]

_SUPPORTED: Final = ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA")

_PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _new_key(alg: str) -> _PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg == "ES512":
        return ec.generate_private_key(ec.SECP521R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class DevIssuer:
    """DEV/TEST ONLY. A throwaway signing key with a kid, for the dev SPIFFE issuer and the dev user IdP.

    ES256 by default; ``alg`` may be any of ES256/384/512, RS256/384/512, PS256/384/512 or EdDSA.
    """

    def __init__(self, private_key: _PrivateKey, *, alg: str, kid: str) -> None:
        if alg not in _SUPPORTED:
            msg = f"unsupported dev issuer alg {alg!r}"
            raise ConfigError(msg)
        self.private_key = private_key
        self.alg = alg
        self.kid = kid

    @classmethod
    def generate(cls, *, alg: str = "ES256", kid: str | None = None) -> DevIssuer:
        """Make a new random key (DEV/TEST ONLY).

        Raises:
            ConfigError: if ``alg`` is not supported.
        """
        if alg not in _SUPPORTED:
            msg = f"unsupported dev issuer alg {alg!r}"
            raise ConfigError(msg)
        return cls(_new_key(alg), alg=alg, kid=kid or f"dev-{secrets.token_hex(8)}")

    # ---------------------------------------------------------------------------------- public keys

    def public_jwk(self) -> dict[str, Any]:
        """The public key as a JWK with kid, alg and use=sig."""
        algorithm = get_default_algorithms()[self.alg]
        jwk: dict[str, Any] = algorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        jwk.update(kid=self.kid, alg=self.alg, use="sig")
        return jwk

    def jwks(self) -> dict[str, Any]:
        """The public JWKS document ``{"keys": [jwk]}``."""
        return {"keys": [self.public_jwk()]}

    def write_jwks(self, path: str | os.PathLike[str]) -> None:
        """Write the public JWKS document to ``path``."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.jwks(), fh, indent=2)

    # ----------------------------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key (PEM), alg and kid as JSON, readable by the owner only (mode 0600)."""
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode("ascii")
        body = json.dumps({"alg": self.alg, "kid": self.kid, "private_key_pem": pem}).encode("utf-8")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            # O_CREAT's mode does not apply to an existing file: tighten it explicitly.
            os.fchmod(fd, 0o600)
            os.write(fd, body)
        finally:
            os.close(fd)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DevIssuer:
        """Read a key written by ``save``.

        Raises:
            ConfigError: if the file is unreadable, readable by group/others, or malformed.
        """
        try:
            mode = os.stat(path).st_mode
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
        except (OSError, ValueError) as exc:
            msg = f"cannot load dev issuer key {os.fspath(path)!r}"
            raise ConfigError(msg) from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            msg = f"dev issuer key {os.fspath(path)!r} must have mode 0600"
            raise ConfigError(msg)
        try:
            key = serialization.load_pem_private_key(doc["private_key_pem"].encode("ascii"), password=None)
            alg, kid = doc["alg"], doc["kid"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            msg = f"dev issuer key {os.fspath(path)!r} is malformed"
            raise ConfigError(msg) from exc
        if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)):
            msg = f"dev issuer key {os.fspath(path)!r} has an unsupported key type"
            raise ConfigError(msg)
        return cls(key, alg=str(alg), kid=str(kid))

    # --------------------------------------------------------------------------------------- minting

    def encode(self, claims: Mapping[str, Any], *, headers: Mapping[str, Any] | None = None) -> str:
        """Sign ``claims`` as a compact JWS with this key (kid and alg set; ``headers`` may add/override)."""
        merged: dict[str, Any] = {"kid": self.kid, "typ": "JWT"}
        merged.update(headers or {})
        # PyJWS rather than jwt.encode: tests need to sign claims jwt.encode would refuse (e.g. iss=42).
        payload = json.dumps(dict(claims), separators=(",", ":")).encode("utf-8")
        return jwt.PyJWS().encode(payload, self.private_key, algorithm=self.alg, headers=merged)

    def sign_compact(self, header: bytes, payload: bytes) -> str:
        """Sign raw header and payload bytes as-is (for hand-built malformed tokens in tests)."""
        signing_input = f"{_b64url(header)}.{_b64url(payload)}"
        algorithm = get_default_algorithms()[self.alg]
        signature = algorithm.sign(signing_input.encode("ascii"), self.private_key)
        return f"{signing_input}.{_b64url(signature)}"

    def mint_svid(
        self,
        spiffe_id: str,
        *,
        audience: str,
        ttl: float = 300,
        now: float | None = None,
        extra_claims: Mapping[str, Any] | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """A JWT-SVID for ``spiffe_id`` (DEV/TEST ONLY). ``extra_claims`` override the defaults."""
        issued = time.time() if now is None else now
        claims: dict[str, Any] = {"sub": spiffe_id, "aud": [audience], "iat": int(issued), "exp": int(issued + ttl)}
        claims.update(extra_claims or {})
        return self.encode(claims, headers=headers)

    def mint_id_token(
        self,
        *,
        issuer: str,
        subject: str,
        audience: str,
        email: str | None = None,
        email_verified: bool | None = True,
        groups: Sequence[str] = (),
        auth_time: float | None = None,
        ttl: float = 300,
        now: float | None = None,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """An OIDC ID token (DEV/TEST ONLY). ``extra_claims`` override the defaults.

        With an ``email``, ``email_verified`` is claimed as given (``None``: the claim is left out).
        """
        issued = time.time() if now is None else now
        claims: dict[str, Any] = {
            "iss": issuer,
            "sub": subject,
            "aud": audience,
            "iat": int(issued),
            "exp": int(issued + ttl),
        }
        if email is not None:
            claims["email"] = email
            if email_verified is not None:
                claims["email_verified"] = email_verified
        if groups:
            claims["groups"] = list(groups)
        if auth_time is not None:
            claims["auth_time"] = int(auth_time)
        claims.update(extra_claims or {})
        return self.encode(claims)

    def mint_k8s_token(
        self,
        *,
        issuer: str,
        namespace: str,
        service_account: str,
        audience: str,
        pod: str | None = "agent-0",
        node: str | None = None,
        ttl: float = 3600,
        now: float | None = None,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """A projected service-account token as a kube-apiserver issues it (DEV/TEST ONLY).

        The claims are those of ``pkg/serviceaccount/claims.go`` (``Claims()``) in kubernetes/kubernetes:
        sub ``system:serviceaccount:<ns>:<name>``, aud, iat = nbf = now, exp, a uuid ``jti`` (1.29+), and the
        private ``kubernetes.io`` claim with the namespace, the service account's name and uid and, for a
        pod-bound token, the pod's (and, 1.30+, its node's) name and uid. ``extra_claims`` override them.
        """
        issued = int(time.time() if now is None else now)
        private: dict[str, Any] = {"namespace": namespace,
                                   "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())}}
        if pod is not None:
            private["pod"] = {"name": pod, "uid": str(uuid.uuid4())}
        if node is not None:
            private["node"] = {"name": node, "uid": str(uuid.uuid4())}
        claims: dict[str, Any] = {
            "aud": [audience], "exp": int(issued + ttl), "iat": issued, "iss": issuer, "jti": str(uuid.uuid4()),
            "kubernetes.io": private, "nbf": issued, "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }
        claims.update(extra_claims or {})
        # The API server's signer sets alg and kid only (no typ).
        return jwt.PyJWS().encode(json.dumps(claims, separators=(",", ":")).encode("utf-8"), self.private_key,
                                  algorithm=self.alg, headers={"kid": self.kid, "typ": None})

    def mint_delegation_token(
        self,
        *,
        issuer: str,
        subject: str,
        actor: str,
        audience: str,
        scope: str,
        groups: Sequence[str] = (),
        ttl: float = 300,
        now: float | None = None,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> str:
        """An RFC 8693 token-exchange result naming ``subject`` (the user) and ``actor`` (the agent) (DEV/TEST ONLY).

        RFC 8693 §4.1 (``act``), §4.2 (``scope``) and RFC 9068's JWT access token (``typ: at+jwt``, ``jti``,
        ``client_id``). ``extra_claims`` override the defaults.
        """
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "iss": issuer, "sub": subject, "aud": audience, "iat": issued, "exp": int(issued + ttl),
            "jti": str(uuid.uuid4()), "scope": scope, "act": {"sub": actor}, "client_id": "agent-platform",
        }
        if groups:
            claims["groups"] = list(groups)
        claims.update(extra_claims or {})
        return self.encode(claims, headers={"typ": "at+jwt"})
