"""Export formats and the fail-closed gate of broker.audit.export, without a store or a sink."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from broker.audit import GENESIS, AuditRecord, ChainLink, canonical_bytes, chain_hash
from broker.audit.export import Exporter, export_line, seq_of
from broker.errors import AuditBacklogFull

REC = AuditRecord(1_800_000_000.5, "lease.issued", "success", user="alice@example.com", task="tsk_1",
                  resource="pki/issue/agents", lease="lse_1")
LINK = ChainLink(1, REC, GENESIS.hex(), chain_hash(GENESIS, canonical_bytes(REC, 1)).hex())


class TestFormats:
    def test_jsonl_line_is_canonical_record_plus_hashes(self) -> None:
        """A jsonl line is the chained record's canonical JSON with prev_hash and hash added, newline-ended."""
        line = export_line(LINK, "jsonl")
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        obj = json.loads(line)
        assert (obj["prev_hash"], obj["hash"]) == (LINK.prev_hash, LINK.hash)
        del obj["prev_hash"], obj["hash"]
        assert json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() == canonical_bytes(REC, 1)

    def test_seq_of_both_formats(self) -> None:
        """The sequence number is found in a jsonl record and in an OCSF event; not in anything else."""
        assert seq_of(json.loads(export_line(LINK, "jsonl"))) == 1
        assert seq_of(json.loads(export_line(LINK, "ocsf"))) == 1
        assert seq_of({"metadata": {"uid": "x"}}) is None and seq_of([1]) is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TestGate:
    def make(self, clock: FakeClock) -> Exporter:
        return Exporter(store=cast(Any, None), sinks=[], backlog_limit=10, clock=clock, stale_after=60.0,
                        monotonic=clock)

    def test_over_the_limit_fails_closed(self) -> None:
        """Above the limit, check raises a 503 audit_backlog with Retry-After; at the limit it does not."""
        ex = self.make(FakeClock())
        ex._backlog = 10
        ex.check()
        ex._backlog = 11
        with pytest.raises(AuditBacklogFull) as info:
            ex.check()
        assert (info.value.http_status, info.value.code, info.value.retry_after) == (503, "audit_backlog", 5)

    def test_a_stale_view_fails_closed(self) -> None:
        """A view no round refreshed for longer than stale_after proves nothing: check raises."""
        clock = FakeClock()
        ex = self.make(clock)
        ex.check()  # no round yet: nothing known to be wrong
        ex._updated_at = 0.0
        clock.now = 59.0
        ex.check()
        clock.now = 61.0
        with pytest.raises(AuditBacklogFull, match="not reporting"):
            ex.check()
