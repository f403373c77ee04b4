"""Who is calling: SPIFFE IDs, JWT-SVIDs (agents) and OIDC ID tokens (people).

Layout: ``spiffe_id`` (SpiffeId, SpiffePattern), ``jwks`` (keys and key sources), ``tokens`` (the pure
checks, ``verify_svid``/``verify_id_token``), ``kubernetes`` (projected service-account tokens as agents),
``delegation_tokens`` (RFC 8693 delegation an IdP issued, and its verifier), ``verifiers`` (the async
AgentVerifier/UserVerifier). Import from ``broker.identity``; the submodules are an implementation detail.

Rules this package keeps (threat rows TH-01..TH-10 and TH-31):

* The algorithm is never taken from the token. Each key is bound to one asymmetric algorithm when its
  JWKS is loaded; a token verifies only if its header ``alg`` equals that bound algorithm
  (``ALLOWED_ALGS``). A JWT-SVID's alg is one of the nine the SPIFFE JWT-SVID spec lists
  (``JWT_SVID_ALGS``: RS/ES/PS 256/384/512); an ID token may also be EdDSA (``ID_TOKEN_ALGS``). HMAC
  and ``none`` are never enabled, so a token "signed" with public key bytes cannot verify.
* Tokens are compact JWS of at most ``MAX_TOKEN_BYTES``, checked before any decoding. We parse the
  segments ourselves (strict base64url, UTF-8 JSON, duplicate member names rejected) because Python's
  ``json`` keeps the *last* duplicate while other parsers keep the first: two parsers reading one token
  differently is how header-smuggling bugs start. Only then does PyJWT check the signature.
* The protected header may carry ``alg``, ``kid`` and ``typ`` only: ``jku``/``jwk``/``x5u``/``x5c``
  would let the token name its own key and ``crit`` demands extensions we do not implement.
* A JWT-SVID is checked with a key of the trust domain named in its own ``sub``; an ID token with a key
  of the issuer named in its own ``iss``. The unverified claim only selects *where* to look; the
  signature then proves the choice.
* Agent and user tokens are mutually exclusive (TH-31): an SVID's ``sub`` must be a SPIFFE ID and a user
  token's ``sub`` must not look like one, so no token satisfies both verifiers.
* Pure functions take ``now``; the async verifier classes take a ``clock`` and only fetch keys.
* Every failure raises ``InvalidIdentity(reason)``; the reason names the rule, never the token.
"""

from __future__ import annotations

from broker.identity.delegation_tokens import (
    DelegationIssuerTrust,
    DelegationToken,
    DelegationVerifier,
    check_delegation,
)
from broker.identity.jwks import (
    ALLOWED_ALGS,
    ID_TOKEN_ALGS,
    JWT_SVID_ALGS,
    JwksKeySet,
    JwksUrlKeySource,
    Key,
    KeySource,
    StaticKeySource,
    load_key_source,
)
from broker.identity.kubernetes import ClusterTrust
from broker.identity.spiffe_id import SpiffeId, SpiffePattern
from broker.identity.tokens import (
    MAX_TOKEN_BYTES,
    AgentIdentity,
    KeyRef,
    UserIdentity,
    id_token_key_ref,
    is_person_id,
    normalize_email,
    person_id,
    svid_key_ref,
    verify_id_token,
    verify_svid,
)
from broker.identity.verifiers import AgentVerifier, IssuerTrust, UserVerifier

__all__ = [
    "ALLOWED_ALGS",
    "ID_TOKEN_ALGS",
    "JWT_SVID_ALGS",
    "MAX_TOKEN_BYTES",
    "AgentIdentity",
    "AgentVerifier",
    "ClusterTrust",
    "DelegationIssuerTrust",
    "DelegationToken",
    "DelegationVerifier",
    "IssuerTrust",
    "JwksKeySet",
    "JwksUrlKeySource",
    "Key",
    "KeyRef",
    "KeySource",
    "SpiffeId",
    "SpiffePattern",
    "StaticKeySource",
    "UserIdentity",
    "UserVerifier",
    "check_delegation",
    "id_token_key_ref",
    "is_person_id",
    "load_key_source",
    "normalize_email",
    "person_id",
    "svid_key_ref",
    "verify_id_token",
    "verify_svid",
]
