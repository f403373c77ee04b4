"""The audit hash chain: canonical bytes pinned, verification pure and exact about where it breaks."""

from __future__ import annotations

import dataclasses
import hashlib
import random

import pytest

from broker.audit import (
    CALLER_ADDRESS,
    CHAIN_DOMAIN,
    GENESIS,
    AuditRecord,
    ChainLink,
    canonical_bytes,
    chain_hash,
    verify_chain,
)
from broker.audit.canonical import canonical_record
from broker.errors import AuditChainBroken

RECORD = AuditRecord(1795877399.123456, "lease.issued", "success", user="alice@example.com",
                     agent="spiffe://example.org/agent/support-1", task="tsk_1", tenant="acme",
                     resource="database/creds/tickets-ro", action="issue", reason="grant tickets-db-ro, ttl 600s",
                     lease="lse_1", vault_request_id="6f1c")


def chain(n: int) -> list[ChainLink]:
    links, prev = [], GENESIS
    for seq in range(1, n + 1):
        rec = dataclasses.replace(RECORD, time=RECORD.time + seq, lease=f"lse_{seq}")
        h = chain_hash(prev, canonical_bytes(rec, seq))
        links.append(ChainLink(seq, rec, prev.hex(), h.hex()))
        prev = h
    return links


class TestCanonicalBytes:
    def test_golden(self) -> None:
        """The canonical form is pinned: changing it breaks every verifier in the field."""
        assert canonical_bytes(RECORD, 7) == (
            b'{"action":"issue","agent":"spiffe://example.org/agent/support-1","event":"lease.issued",'
            b'"lease":"lse_1","outcome":"success","reason":"grant tickets-db-ro, ttl 600s",'
            b'"resource":"database/creds/tickets-ro","seq":7,"task":"tsk_1","tenant":"acme",'
            b'"time":1795877399123456,"user":"alice@example.com","vault_request_id":"6f1c"}'
        )

    def test_hash_is_domain_separated(self) -> None:
        """hash = SHA-256(domain || prev || body), with the documented domain."""
        body = canonical_bytes(RECORD, 1)
        assert CHAIN_DOMAIN == b"broker.audit.v1\x00"
        assert chain_hash(GENESIS, body) == hashlib.sha256(CHAIN_DOMAIN + GENESIS + body).digest()
        assert chain_hash(GENESIS, body) != hashlib.sha256(GENESIS + body).digest()

    def test_nulls_and_unicode(self) -> None:
        """Empty fields are present as null; non-ASCII stays UTF-8."""
        rec = AuditRecord(0.0, "access.denied", "denied", user="zoë@example.com")
        text = canonical_bytes(rec, 1).decode()
        assert '"agent":null' in text and "zoë" in text


    def test_added_fields_appear_only_when_set(self) -> None:
        """user_name and caller_address, added after version 1, are left out when null (so records written
        before them keep their hashes) and sit in their sorted place when set."""
        assert b"caller_address" not in canonical_bytes(RECORD, 7) and b"user_name" not in canonical_bytes(RECORD, 7)
        rec = dataclasses.replace(RECORD, caller_address="127.0.0.1", user_name="Alice")
        assert canonical_bytes(rec, 7) == (
            b'{"action":"issue","agent":"spiffe://example.org/agent/support-1","caller_address":"127.0.0.1",'
            b'"event":"lease.issued","lease":"lse_1","outcome":"success","reason":"grant tickets-db-ro, ttl 600s",'
            b'"resource":"database/creds/tickets-ro","seq":7,"task":"tsk_1","tenant":"acme",'
            b'"time":1795877399123456,"user":"alice@example.com","user_name":"Alice","vault_request_id":"6f1c"}'
        )

    def test_a_record_takes_the_address_of_the_request_being_served(self) -> None:
        """Built while a request is served (CALLER_ADDRESS set), a record names its caller; outside, none."""
        token = CALLER_ADDRESS.set("192.0.2.7")
        try:
            assert AuditRecord(0.0, "task.started", "success").caller_address == "192.0.2.7"
        finally:
            CALLER_ADDRESS.reset(token)
        assert AuditRecord(0.0, "task.started", "success").caller_address is None

    def test_the_verifiers_fast_encoding_is_canonical_bytes(self) -> None:
        """broker.audit.verify writes the canonical form field by field: the same bytes on random records,
        every optional field (added ones too) set or null, with quotes, escapes and non-ASCII."""
        rng = random.Random(11)
        names = [f.name for f in dataclasses.fields(AuditRecord) if f.name not in ("time", "event", "outcome")]
        alphabet = 'ab"\\/\n\u00e9\u2028z0 '
        for i in range(2000):
            values = {n: ("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) if rng.random() < 0.6
                          else None) for n in names}
            rec = AuditRecord(rng.uniform(0, 2e9), "lease.issued", "success", **values)
            assert canonical_record(rec, i) == canonical_bytes(rec, i), rec


class TestVerifyChain:
    def test_clean_chain_verifies(self) -> None:
        """A clean chain returns its length and head."""
        links = chain(50)
        assert verify_chain(links) == (50, bytes.fromhex(links[-1].hash or ""))

    def test_edit_is_found_at_its_record(self) -> None:
        """An edited field breaks exactly that record."""
        links = chain(20)
        links[9] = dataclasses.replace(links[9], record=dataclasses.replace(links[9].record, user="mallory"))
        with pytest.raises(AuditChainBroken) as info:
            verify_chain(links)
        assert info.value.first_bad_seq == 10

    def test_delete_insert_swap(self) -> None:
        """A deleted, inserted or swapped record breaks the chain where it happened."""
        links = chain(20)
        for mutated, bad in ((links[:5] + links[6:], 6), ([*links[:5], links[3], *links[5:]], 6),
                             ([*links[:5], links[6], links[5], *links[7:]], 6)):
            with pytest.raises(AuditChainBroken) as info:
                verify_chain(mutated)
            assert info.value.first_bad_seq == bad
