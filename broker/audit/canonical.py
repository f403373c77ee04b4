"""The canonical form of a record, written out field by field: the bytes ``canonical_bytes`` makes, faster.

``broker.audit.chain.canonical_bytes`` is the definition (``json.dumps`` of the record's fields, keys
sorted, added fields only when set). Building json's encoder and a dict per record costs ~12 us; the
verifier runs it a million times, and the store once per record it appends (each credential's, and
every line merged from Vault's audit device). This writes the same JSON field by field (~4 us). Tests
compare the two on random records with awkward strings; a record this path does not know how to
encode (a field that is neither str nor None, a field added to AuditRecord) goes through
``canonical_bytes`` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, fields
from json.encoder import encode_basestring
from typing import Any

import msgspec

from broker.audit.chain import NOT_NUMBERS, NUMBER_TYPES, AuditRecord, canonical_bytes

__all__ = ["RECORD_WIDTH", "RenderedRecord", "canonical_record", "canonical_row", "render_record"]

_KNOWN_FIELDS = ("time", "event", "outcome", "user", "agent", "task", "tenant", "resource", "action", "reason",
                 "lease", "vault_request_id", "user_name", "delegation_jti", "caller_address", "revocation",
                 "key_fingerprint")
_KEY_FINGERPRINT, _REVOCATION = '"key_fingerprint":', '"revocation":'
_FAST = tuple(f.name for f in fields(AuditRecord)) == _KNOWN_FIELDS
# How many AuditRecord fields a store row holds after its seq.
RECORD_WIDTH = len(fields(AuditRecord))


def canonical_record(r: AuditRecord, seq: int) -> bytes:
    """``canonical_bytes(r, seq)``, faster."""
    return canonical_row((seq, r.time, r.event, r.outcome, r.user, r.agent, r.task, r.tenant, r.resource,
                          r.action, r.reason, r.lease, r.vault_request_id, r.user_name, r.delegation_jti,
                          r.caller_address, r.revocation, r.key_fingerprint))


def canonical_row(row: Sequence[Any]) -> bytes:
    """``canonical_bytes`` of a row ``(seq, *AuditRecord fields in order, ...)``: the same JSON written out,
    each string through json's own encoder.

    A field that is not a str or None makes ``encode_basestring`` raise TypeError: such a record goes
    through ``canonical_bytes`` itself (which then encodes it, or raises as it would anyway).
    """
    if not _FAST:
        return canonical_bytes(AuditRecord(*row[1:RECORD_WIDTH + 1]), row[0])
    e = encode_basestring
    (seq, time, event, outcome, user, agent, task, tenant, resource, action, reason, lease, vault_request_id,
     user_name, delegation_jti, caller_address, revocation, key_fingerprint) = row[:18]
    if type(seq) is not int or type(time) not in NUMBER_TYPES:  # first, as canonical_bytes checks
        raise TypeError(NOT_NUMBERS)
    try:
        return (
            f'{{"action":{"null" if action is None else e(action)},'
            f'"agent":{"null" if agent is None else e(agent)},'
            # Added fields (audit.ADDED_FIELDS) are written only when set, in their sorted place.
            f'{"" if caller_address is None else chr(34) + "caller_address" + chr(34) + ":" + e(caller_address) + ","}'
            f'{"" if delegation_jti is None else chr(34) + "delegation_jti" + chr(34) + ":" + e(delegation_jti) + ","}'
            f'"event":{"null" if event is None else e(event)},'
            f'{"" if key_fingerprint is None else _KEY_FINGERPRINT + e(key_fingerprint) + ","}'
            f'"lease":{"null" if lease is None else e(lease)},'
            f'"outcome":{"null" if outcome is None else e(outcome)},'
            f'"reason":{"null" if reason is None else e(reason)},'
            f'"resource":{"null" if resource is None else e(resource)},'
            f'{"" if revocation is None else _REVOCATION + e(revocation) + ","}'
            f'"seq":{seq:d},'
            f'"task":{"null" if task is None else e(task)},'
            f'"tenant":{"null" if tenant is None else e(tenant)},"time":{round(time * 1_000_000):d},'
            f'"user":{"null" if user is None else e(user)},'
            f'{"" if user_name is None else chr(34) + "user_name" + chr(34) + ":" + e(user_name) + ","}'
            f'"vault_request_id":{"null" if vault_request_id is None else e(vault_request_id)}}}'
        ).encode()
    except (TypeError, ValueError):
        return canonical_bytes(AuditRecord(*row[1:RECORD_WIDTH + 1]), seq)


class RenderedRecord(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """A record redacted and written out in canonical form before its place in the chain is known.

    ``values`` are its redacted fields in ``AuditRecord`` order; ``head`` and ``tail`` are its canonical
    bytes on either side of the seq's digits, so the store, which numbers it, hashes
    ``head + b"%d" % seq + tail`` without rendering anything (the Vault audit ingest worker renders them
    in another process: ``broker.audit.ingest``). Only :func:`render_record` makes one.
    """

    values: tuple[Any, ...]
    head: bytes
    tail: bytes

    @property
    def event(self) -> str:
        return str(self.values[1])

    @property
    def vault_request_id(self) -> str | None:
        rid = self.values[_REQUEST_ID]
        return None if rid is None else str(rid)

    def body(self, seq: int) -> bytes:
        """Its canonical bytes as record ``seq``: ``canonical_record(record.redacted(), seq)``."""
        return self.head + b"%d" % seq + self.tail


_REQUEST_ID = _KNOWN_FIELDS.index("vault_request_id")
# The seq is the one number written where a string field could stand: rendered as 0, it is found by its
# key, which no string field can imitate (a string's quotes are escaped inside its value).
_SEQ_ZERO = b',"seq":0,'


def render_record(record: AuditRecord) -> RenderedRecord:
    """``record`` redacted, with its canonical bytes split around the seq (see :class:`RenderedRecord`)."""
    red = record.redacted()
    values = astuple(red) if not _FAST else (
        red.time, red.event, red.outcome, red.user, red.agent, red.task, red.tenant, red.resource, red.action,
        red.reason, red.lease, red.vault_request_id, red.user_name, red.delegation_jti, red.caller_address,
        red.revocation, red.key_fingerprint)
    body = canonical_row((0, *values))
    at = body.index(_SEQ_ZERO) + len(_SEQ_ZERO) - 2
    return RenderedRecord(values, body[:at], body[at + 1:])
