"""Audit records: what the broker decided, for whom, on what, with what outcome.

Every record is written by the store in the same transaction as the state change it describes, so
there is no state change without its record and no record without its change, and each record is
chained to the one before it by a domain-separated SHA-256 (below). Verification is a separate pure
function.

Before a record is stored it passes through redaction: no field may carry a token, a password or
anything shaped like one, whatever a caller put there by mistake.
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Protocol

from broker.errors import AuditChainBroken

Outcome = Literal["success", "denied", "failure", "pending"]

# Shapes of secrets that must never reach a record: Vault/OpenBao tokens (s., hvs., b., hvb., hvr.),
# JWTs (three base64url segments starting with a JSON header) and PEM private keys.
_SECRET_SHAPES = re.compile(
    r"\b(?:hv[sbr]|[sbr])\.[A-Za-z0-9_-]{20,}"
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)"
)
_MAX_FIELD = 2000


# Text every match of _SECRET_SHAPES contains: a token's "s." / "b." / "r." (the last letter of its prefix
# and the dot), a JWT's "eyJ", a PEM key's "-----BEGIN ". Text with none of them cannot match, and
# substring searches are far cheaper than the pattern, which starts with \b and so is tried at every
# position (most of the Vault audit merge's redaction time).
_SHAPE_MARKS = ("s.", "b.", "r.", "eyJ", "-----BEGIN ")


def _may_hold_secret(text: str) -> bool:
    s, b, r, jwt, pem = _SHAPE_MARKS  # written out: a generator over the marks cost as much as the searches
    return ((s in text or b in text or r in text or jwt in text or pem in text)
            and _SECRET_SHAPES.search(text) is not None)


def redact(text: str) -> str:
    """Replace anything shaped like a token, JWT or private key with ``[redacted]`` and bound the length."""
    return _SECRET_SHAPES.sub("[redacted]", text)[:_MAX_FIELD]


class TaskLike(Protocol):
    """What a record about a task copies from it (a store row or anything shaped like one)."""

    @property
    def id(self) -> str: ...
    @property
    def user(self) -> str: ...
    @property
    def user_name(self) -> str | None: ...
    @property
    def agent(self) -> str: ...
    @property
    def tenant(self) -> str: ...


# The network address of the caller whose request is being served (the socket peer), set by the HTTP
# layer around each request. A record takes it by default, so every record a request causes names where
# the request came from without each domain call carrying the address; records written by the broker's
# own background work (expiry, renewal, the Vault audit tailer) have none or set their own.
CALLER_ADDRESS: ContextVar[str | None] = ContextVar("broker_caller_address", default=None)


def current_caller() -> str | None:
    """The address of the request being served, or None outside a request."""
    return CALLER_ADDRESS.get()


@dataclass(frozen=True)
class AuditRecord:
    time: float
    event: str
    outcome: Outcome
    user: str | None = None
    agent: str | None = None
    task: str | None = None
    tenant: str | None = None
    resource: str | None = None
    action: str | None = None
    reason: str | None = None
    lease: str | None = None
    vault_request_id: str | None = None
    # ``user`` is the person id ("<issuer>#<subject>"); this is their display name, for people to read.
    user_name: str | None = None
    # The ``jti`` of the IdP-issued delegation token (RFC 8693) a task was started with; its issuer is the
    # user's (``user`` is "<issuer>#<subject>").
    delegation_jti: str | None = None
    # Where the operation came from: the HTTP caller's socket peer, or the remote address Vault logged.
    caller_address: str | None = field(default_factory=current_caller)
    # How the credential a ``lease.issued`` record describes ends (broker.engines): ``revocable``,
    # ``expiry-only`` or ``static``.
    revocation: str | None = None
    # The SHA-256 fingerprint (``SHA256:...``) of the SSH public key a certificate was signed for.
    key_fingerprint: str | None = None

    @classmethod
    def for_task(cls, task: TaskLike, time: float, event: str, outcome: Outcome, **fields: Any) -> AuditRecord:
        """A record about ``task``: its person (id and display name), agent, id and tenant, plus ``fields``."""
        return cls(time, event, outcome, user=task.user, user_name=task.user_name, agent=task.agent, task=task.id,
                   tenant=task.tenant, **fields)

    def redacted(self) -> AuditRecord:
        """This record with every string field passed through :func:`redact` (itself when nothing changes)."""
        texts = [v for v in _TEXTS(self) if isinstance(v, str)]
        # One scan over all fields joined (NUL cannot occur in a shape) finds nearly every record clean.
        if max(map(len, texts), default=0) <= _MAX_FIELD and not _may_hold_secret("\x00".join(texts)):
            return self
        changes: dict[str, Any] = {n: redact(v) for n in _TEXT_FIELDS if isinstance(v := getattr(self, n), str)}
        return replace(self, **changes)


_TEXT_FIELDS = tuple(f.name for f in fields(AuditRecord) if f.name not in ("time", "event", "outcome"))
_TEXTS = operator.attrgetter(*_TEXT_FIELDS)  # all of them in one C call


# -- the hash chain ----------------------------------------------------------------------------------
#
# Each record's hash covers the previous record's hash and the record's canonical bytes, under a domain
# prefix so that a record hash can never be confused with any other SHA-256 the broker computes:
#
#     hash(n) = SHA-256( b"broker.audit.v1\x00" || hash(n-1) || canonical_bytes(record n) )
#     hash(0) = 32 zero bytes (the genesis)
#
# canonical_bytes is UTF-8 JSON with sorted keys, no whitespace, ``ensure_ascii=False``, every field of
# version 1 present (null when empty), and time as an integer number of microseconds, so that a verifier
# in any language reproduces it without float formatting rules. It is pinned by a golden test. Fields
# added since (``ADDED_FIELDS``) appear only when set, so records written before them keep their hashes.

CHAIN_DOMAIN = b"broker.audit.v1\x00"
GENESIS = bytes(32)


ADDED_FIELDS = ("user_name", "delegation_jti", "caller_address", "revocation", "key_fingerprint")


# What a record's time may be, checked before it is multiplied: a text time times a million is a string a
# million times long (a tampered row must cost no more than a real one).
NUMBER_TYPES = (float, int)
NOT_NUMBERS = "a record's seq must be an integer and its time a number"


def canonical_bytes(record: AuditRecord, seq: int) -> bytes:
    """Raises TypeError (or ValueError): a field of a type the broker never writes (a tampered row)."""
    if type(seq) is not int or type(record.time) not in NUMBER_TYPES:
        raise TypeError(NOT_NUMBERS)
    body = {f.name: getattr(record, f.name) for f in fields(record)}
    for name in ADDED_FIELDS:
        if body[name] is None:
            del body[name]
    body["time"] = round(record.time * 1_000_000)
    body["seq"] = seq
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def chain_hash(prev: bytes, body: bytes) -> bytes:
    return hashlib.sha256(CHAIN_DOMAIN + prev + body).digest()


@dataclass(frozen=True)
class ChainLink:
    """One stored record as the verifier sees it: what the row says, not what it should say."""

    seq: int
    record: AuditRecord
    prev_hash: str | None
    hash: str | None


def verify_chain(links: Iterable[ChainLink], *, first_seq: int = 1, prev: bytes = GENESIS) -> tuple[int, bytes]:
    """Recompute the chain from ``prev``; return (records seen, head hash).

    Raises:
        AuditChainBroken: a gap or a repeat in the sequence, a ``prev_hash`` that is not the previous
            record's hash, or a ``hash`` that is not this record's.
    """
    expected = first_seq
    count = 0
    for link in links:
        if link.seq != expected:
            raise AuditChainBroken(expected, f"expected record {expected}, found {link.seq}")
        if link.prev_hash != prev.hex():
            raise AuditChainBroken(link.seq, "prev_hash is not the previous record's hash")
        digest = chain_hash(prev, canonical_bytes(link.record, link.seq))
        if link.hash != digest.hex():
            raise AuditChainBroken(link.seq, "the record does not match its hash")
        prev = digest
        expected += 1
        count += 1
    return count, prev
