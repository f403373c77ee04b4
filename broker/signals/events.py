"""The Security Event Token about a task that left ``active``: its claims and its signature. Pure: no I/O.

The SET follows RFC 8417 as profiled by SSF 1.0 (section "Security Event Token Profile") and CAEP 1.0:

- header ``typ: secevent+jwt`` (explicit typing), ``alg`` fixed by the key, ``kid`` its thumbprint;
- ``iss`` the transmitter's issuer (as in ``/.well-known/ssf-configuration``), ``aud`` the receiver's
  audience, one receiver per SET (SSF: a SET for several unrelated receivers would disclose data);
  ``iat`` when the broker decided the signal (the task left ``active``), ``jti`` the delivery's id (the
  same on every retry, so a receiver can drop a repeat), ``txn`` the task id and its final state (the
  same for every receiver of one task's end: one underlying event);
- no ``sub`` and no ``exp``: SSF forbids both in SETs (confusion with other JWTs);
- ``sub_id``, a complex subject (SSF section 3.3) that names one session principal by its attributes:
  ``session`` the broker's task id (``opaque``), ``user`` the person who delegated (``iss_sub``: their
  IdP's issuer and subject, the pair the broker identifies people by), ``application`` the agent
  (``uri``: its SPIFFE ID), ``tenant`` the task's tenant (``opaque``);
- ``events`` with exactly one member, ``session-revoked``, holding ``event_timestamp`` (when the task left
  ``active``), ``initiating_entity`` (who made it end) and ``reason_admin`` (the audit trail's reason).

Nothing secret goes in: no token, no accessor, no credential, no lease id. The person is named by issuer and
subject only; ``reason_admin`` is the audit trail's reason, which may name who ended the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import jwt

from broker.identity.tokens import is_person_id
from broker.signals.keys import SigningKey

__all__ = ["CRITICAL_SUBJECT_MEMBERS", "SESSION_REVOKED", "SET_TYPE", "Initiator", "RevokedSession", "encode_set",
           "session_revoked_claims"]

SESSION_REVOKED: Final = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
SET_TYPE: Final = "secevent+jwt"
# A receiver that cannot interpret these must discard the event (SSF section 3.6, "Receiver Subject
# Processing") rather than act on the rest: without ``user`` the match widens to every session of the
# agent, whoever it acts for; without ``application`` to every session of the person. ``session`` is not
# critical: a receiver that does not know the broker's task ids still revokes what this person holds
# through this agent, which is what a task's end means to it.
CRITICAL_SUBJECT_MEMBERS: Final = ("application", "user")
_MAX_REASON = 500

# CAEP section 2: admin, user, policy or system.
Initiator = Literal["admin", "user", "policy", "system"]


@dataclass(frozen=True)
class RevokedSession:
    """What a ``session-revoked`` SET says about one task, for one receiver."""

    jti: str
    issuer: str
    audience: str
    issued_at: float
    task: str
    task_state: str
    user: str
    agent: str
    tenant: str
    revoked_at: float
    initiator: Initiator
    reason: str


def _user_subject(user: str) -> dict[str, str]:
    """A person id ``<issuer>#<subject>`` as an ``iss_sub`` identifier; a legacy bare name as ``opaque``."""
    if is_person_id(user):
        iss, _, sub = user.partition("#")
        return {"format": "iss_sub", "iss": iss, "sub": sub}
    return {"format": "opaque", "id": user}


def session_revoked_claims(s: RevokedSession) -> dict[str, Any]:
    """The SET's claims (the module docstring says why each is there, and why ``sub``/``exp`` are not)."""
    event: dict[str, Any] = {"event_timestamp": int(s.revoked_at), "initiating_entity": s.initiator}
    if s.reason:
        event["reason_admin"] = {"en": s.reason[:_MAX_REASON]}
    return {
        "iss": s.issuer,
        "aud": s.audience,
        "iat": int(s.issued_at),
        "jti": s.jti,
        "txn": f"{s.task}/{s.task_state}",
        "sub_id": {
            "format": "complex",
            "session": {"format": "opaque", "id": s.task},
            "user": _user_subject(s.user),
            "application": {"format": "uri", "uri": s.agent},
            "tenant": {"format": "opaque", "id": s.tenant},
        },
        "events": {SESSION_REVOKED: event},
    }


def encode_set(claims: dict[str, Any], key: SigningKey) -> str:
    """The SET in JWS compact serialization, signed with ``key`` under its one algorithm."""
    return jwt.encode(claims, key.key, algorithm=key.alg, headers={"typ": SET_TYPE, "kid": key.kid})
