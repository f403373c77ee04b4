"""Rendering of ``broker audit replay`` (broker.audit.replay), without a server."""

from __future__ import annotations

import json
from datetime import UTC

import click
import pytest

from broker.audit import AuditRecord, canonical_bytes
from broker.audit.replay import (
    ReplayRecord,
    group_by_task,
    parse_time,
    records_from_api,
    render_jsonl,
    render_ocsf,
    render_table,
)

AGENT = "spiffe://example.org/agent/support-1"
USER = "alice@example.com"
T0 = 1_800_000_000.0


def rec(seq: int, event: str, outcome: str = "success", **kw: object) -> ReplayRecord:
    base: dict[str, object] = {"user": USER, "agent": AGENT, "task": "tsk_a", "tenant": "acme"}
    base.update(kw)
    return ReplayRecord(seq, AuditRecord(T0 + seq, event, outcome, **base))  # type: ignore[arg-type]


SESSION = [
    rec(1, "task.started", resource="role:support-triage", action="task.start", reason="ticket 7"),
    rec(2, "lease.issued", resource="database/creds/tickets-ro", action="issue", lease="lse_db",
        reason="grant tickets-db-ro, ttl 600s"),
    rec(3, "vault.request", resource="database/creds/tickets-ro", action="read", lease="lse_db",
        vault_request_id="req-1", reason="by the issuance token of lease lse_db"),
    rec(4, "lease.issued", resource="pki/issue/agents", action="issue", lease="lse_pki"),
    rec(5, "revocation.created", user="olivia@example.com", agent=None, task=None, tenant=None,
        resource="user:bob@example.com", action="revoke", reason="offboarding"),
    rec(6, "vault.request", resource="auth/token/lookup-self", action="read", vault_request_id="req-2",
        reason="by the task token"),
    rec(7, "access.denied", "denied", resource="grant:prod-write", action="issue", reason="not in role"),
    rec(8, "vault.unexplained", user=None, agent=None, task=None, tenant=None, resource="database/creds/x",
        action="read", vault_request_id="req-3", reason="token 'root' the broker did not issue"),
    rec(9, "task.ended", reason="done"),
    rec(10, "task.started", task="tsk_b", resource="role:support-triage", action="task.start"),
]


class TestGrouping:
    def test_blocks_per_task_in_first_seen_order_then_outside(self) -> None:
        """Tasks in the order they first appear; records without a task in a last block."""
        blocks = group_by_task(SESSION)
        assert [b.task for b in blocks] == ["tsk_a", "tsk_b", None]
        assert [r.seq for r in blocks[2].records] == [5, 8]


class TestTable:
    def test_timeline_nests_vault_requests_under_their_credential(self) -> None:
        """The header says who delegated to which agent as which role; a Vault request made with a lease is
        indented under that lease's issuance; the task token's own request stays at the task level."""
        out = render_table(SESSION, iso=True, tz=UTC)
        lines = out.splitlines()
        header = lines[0]
        assert header.startswith("task tsk_a  user alice@example.com  agent spiffe://example.org/agent/support-1")
        assert "role support-triage" in header and "tenant acme" in header and "ended 2027-01-15T08:00:09+00:00" in header
        issued = next(i for i, l in enumerate(lines) if "#2 " in l)
        assert lines[issued + 1].startswith("      ") and "#3 " in lines[issued + 1]
        assert "read  database/creds/tickets-ro  request req-1" in lines[issued + 1]
        task_token = next(l for l in lines if "#6 " in l)
        assert task_token.startswith("  2027") and not task_token.startswith("   ")
        assert lines.index(task_token) > issued + 2  # chain order kept at the task level
        started = next(l for l in lines if "#1 " in l)
        assert "by alice@example.com  for spiffe://example.org/agent/support-1  as support-triage" in started

    def test_time_order_within_a_task(self) -> None:
        """A Vault request merged into the chain after later broker records is shown at its own time."""
        late = ReplayRecord(20, AuditRecord(T0 + 1.5, "vault.request", "success", user=USER, agent=AGENT,
                                            task="tsk_a", resource="auth/token/create", action="update"))
        lines = render_table([*SESSION[:4], late], iso=True, tz=UTC).splitlines()
        assert [l.split("#")[1].split()[0] for l in lines[1:6]] == ["1", "20", "2", "3", "4"]

    def test_denials_and_unexplained_are_marked(self) -> None:
        """A denial and an unexplained Vault request carry a '!' marker."""
        lines = render_table(SESSION, iso=True, tz=UTC).splitlines()
        assert " ! #7 " in next(l for l in lines if "#7 " in l)
        assert " ! #8 " in next(l for l in lines if "#8 " in l)
        assert " ! #2 " not in next(l for l in lines if "#2 " in l)

    def test_outside_block_and_summary(self) -> None:
        """Records outside any task come under their own heading; the last line counts records and tasks."""
        lines = render_table(SESSION, iso=True, tz=UTC).splitlines()
        assert "outside any task" in lines
        assert lines[-1] == "10 records, 2 tasks"
        open_task = next(l for l in lines if l.startswith("task tsk_b"))
        assert open_task.endswith("open")

    def test_control_characters_are_neutralised(self) -> None:
        """A reason with terminal escapes cannot redraw the auditor's screen."""
        out = render_table([rec(1, "task.ended", reason="done\x1b[2J\nfake line")], iso=True, tz=UTC)
        assert "\x1b" not in out and "fake line" in out and "\nfake line" not in out


class TestMachineFormats:
    def test_jsonl_is_the_canonical_record(self) -> None:
        """jsonl prints exactly the bytes the chain hashes, one record per line."""
        out = render_jsonl(SESSION[:2])
        assert out.encode() == canonical_bytes(SESSION[0].record, 1) + b"\n" + canonical_bytes(SESSION[1].record, 2) + b"\n"

    def test_ocsf_one_event_per_line(self) -> None:
        """ocsf prints one OCSF event per record, metadata.uid = seq, correlation = task."""
        events = [json.loads(l) for l in render_ocsf(SESSION).splitlines()]
        assert [e["metadata"]["uid"] for e in events] == [str(r.seq) for r in SESSION]
        assert events[0]["metadata"]["correlation_uid"] == "tsk_a" and events[0]["class_uid"] == 6003


class TestDelegatedStart:
    def test_the_delegations_jti_is_shown_and_kept(self) -> None:
        """A task started with an IdP-issued delegation shows its jti in the timeline and survives the API."""
        started = rec(1, "task.started", resource="role:support-triage", reason="ticket 42",
                      delegation_jti="6e8f1b2a-3c4d")
        assert "delegation jti 6e8f1b2a-3c4d" in render_table([started])
        assert records_from_api([{"seq": 1, **started.record.__dict__}]) == [started]


class TestInput:
    def test_records_from_api_round_trip(self) -> None:
        """The API's AuditOut objects become records in sequence order."""
        items = [{"seq": r.seq, **r.record.__dict__} for r in reversed(SESSION[:3])]
        assert records_from_api(items) == SESSION[:3]

    def test_records_from_api_rejects_non_records(self) -> None:
        """Something that is not an audit record is an error, not a silent skip."""
        with pytest.raises(ValueError, match="not an audit record"):
            records_from_api([{"seq": 1}])

    @pytest.mark.parametrize(("text", "expected"), [
        ("1800000000", 1_800_000_000.0), ("1800000000.5", 1_800_000_000.5),
        ("2027-01-15T08:00:00Z", 1_800_000_000.0), ("2027-01-15T09:00:00+01:00", 1_800_000_000.0),
        ("2027-01-15T08:00:00", 1_800_000_000.0), ("2027-01-15", 1_799_971_200.0),
    ])
    def test_parse_time(self, text: str, expected: float) -> None:
        """--since/--until take Unix seconds or ISO 8601 (naive times in the given zone)."""
        assert parse_time(text, tz=UTC) == expected

    def test_parse_time_rejects_garbage(self) -> None:
        """Anything else is a usage error."""
        with pytest.raises(click.BadParameter):
            parse_time("yesterday")
