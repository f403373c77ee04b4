"""The operator CLI's pure rendering: tables, times, the progress line, summaries and error lines."""

from __future__ import annotations

from datetime import UTC, timedelta, timezone
from typing import Any

import pytest

from broker.cli.ops import (
    LEASE_COLUMNS,
    REVOCATION_COLUMNS,
    Column,
    error_line,
    exit_code_for,
    format_time,
    is_complete,
    pending_message,
    plural,
    progress_line,
    redact,
    render_summary,
    render_table,
    revocation_rows,
)

# 2024-05-01T12:34:56Z
T0 = 1714566896.0


def revocation(**over: Any) -> dict[str, Any]:
    rev: dict[str, Any] = {
        "id": "rvk_1", "kind": "user", "value": "alice@example.com", "reason": "offboarding",
        "created_by": "olivia@example.com", "created_at": T0, "lock": True, "lifted_at": None, "lifted_by": None,
        "tasks": 3, "leases": 1000, "revoked": 812, "pending": 3, "state": "in_progress",
    }
    rev.update(over)
    return rev


def lease(**over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": "lse_a", "task": "tsk_1", "user": "alice@example.com", "agent": "spiffe://example.org/agent/support-1",
        "tenant": "acme", "grant": "agent-cert", "path": "pki/issue/agents", "state": "revoked",
        "issued_at": T0, "expires_at": T0 + 600, "revoked_at": T0 + 60,
    }
    row.update(over)
    return row


class TestFormatTime:
    def test_clock_time_in_the_given_zone(self) -> None:
        """The default is HH:MM:SS in the zone asked for."""
        assert format_time(T0, tz=UTC) == "12:34:56"
        assert format_time(T0, tz=timezone(timedelta(hours=2))) == "14:34:56"

    def test_iso_carries_date_and_offset(self) -> None:
        """--iso gives a full ISO 8601 time with its offset, to the second."""
        assert format_time(T0, iso=True, tz=UTC) == "2024-05-01T12:34:56+00:00"

    def test_missing_time_is_a_dash(self) -> None:
        """A time that never happened (not revoked yet) shows as '-'."""
        assert format_time(None) == "-"

    def test_local_by_default(self) -> None:
        """Without a zone the local zone is used, and ISO still names its offset."""
        assert format_time(T0, iso=True)[-6] in "+-"


class TestRenderTable:
    def test_fixed_width_columns(self) -> None:
        """Every column starts at the same offset on every line, two spaces after the widest cell."""
        rows = [lease(), lease(id="lse_bbbbbbbb", state="active", revoked_at=None)]
        lines = render_table(LEASE_COLUMNS, rows, tz=UTC).splitlines()
        assert len(lines) == 3
        starts = {line.index(word) for line, word in zip(lines, ("TASK", "tsk_1", "tsk_1"), strict=False)}
        assert starts == {len("lse_bbbbbbbb") + 2}
        assert lines[1].split()[-3:] == ["12:34:56", "12:44:56", "12:35:56"]
        assert lines[2].split()[-1] == "-"

    def test_header_only_when_empty(self) -> None:
        """No rows: the header alone, so a script's column parsing still works."""
        assert render_table(LEASE_COLUMNS, []).split() == [c.header for c in LEASE_COLUMNS]

    def test_no_trailing_spaces(self) -> None:
        """Lines are right-stripped even when the last column is short."""
        out = render_table(LEASE_COLUMNS, [lease(revoked_at=None)], tz=UTC)
        assert all(line == line.rstrip() for line in out.splitlines())

    def test_long_agent_keeps_its_tail(self) -> None:
        """A long SPIFFE ID is cut from the left, keeping the workload's name."""
        agent = "spiffe://example.org/" + "ns/" * 20 + "agent/support-1"
        out = render_table(LEASE_COLUMNS, [lease(agent=agent)], tz=UTC)
        cell = next(w for w in out.splitlines()[1].split() if w.startswith("…"))
        assert cell.endswith("agent/support-1") and len(cell) == 40

    def test_ids_are_never_cut(self) -> None:
        """Ids an operator copies into the next command appear whole."""
        long_id = "lse_" + "x" * 60
        assert long_id in render_table(LEASE_COLUMNS, [lease(id=long_id)], tz=UTC)

    def test_counts_are_right_aligned(self) -> None:
        """Numeric columns line up on their last digit."""
        cols = (Column("N", "n", "count"), Column("X", "x"))
        assert render_table(cols, [{"n": 5, "x": "a"}, {"n": 1000, "x": "b"}]).splitlines() == [
            "   N  X", "   5  a", "1000  b"]

    def test_control_characters_are_neutralised(self) -> None:
        """A reason with escape sequences cannot redraw the operator's terminal."""
        out = render_table((Column("REASON", "reason"),), [{"reason": "ok\x1b[2J\rgone"}])
        assert "\x1b" not in out and "\r" not in out

    def test_booleans_and_nulls(self) -> None:
        """True/False read yes/no and a null is '-'."""
        rows = revocation_rows([revocation(), revocation(id="rvk_2", lock=False, created_by=None)])
        lines = render_table(REVOCATION_COLUMNS, rows, tz=UTC).splitlines()
        assert lines[1].split()[3] == "yes" and lines[2].split()[3] == "no"
        assert " - " in lines[2]

    def test_lifted_lock_reads_lifted(self) -> None:
        """A lock an operator lifted shows as 'lifted', not as a lock that never was."""
        rows = revocation_rows([revocation(lock=False, lifted_at=T0, lifted_by="olivia@example.com")])
        assert rows[0]["lock"] == "lifted"


class TestRevocationRows:
    def test_progress_column(self) -> None:
        """The table's REVOKED column reads revoked/leases."""
        assert revocation_rows([revocation()])[0]["progress"] == "812/1000"


class TestPlural:
    @pytest.mark.parametrize(("n", "text"), [(0, "0 leases"), (1, "1 lease"), (2, "2 leases")])
    def test_counts(self, n: int, text: str) -> None:
        """Count lines read naturally for one and for many."""
        assert plural(n, "lease") == text


class TestProgressLine:
    def test_counter(self) -> None:
        """The live counter names confirmed, total and pending leases."""
        assert progress_line(revocation()) == "revoked 812/1000 leases (3 pending)"

    def test_nothing_to_revoke(self) -> None:
        """A selector with no live leases still reads sensibly."""
        assert progress_line(revocation(leases=0, revoked=0, pending=0)) == "revoked 0/0 leases (0 pending)"


class TestCompletion:
    @pytest.mark.parametrize(("state", "pending", "done"), [
        ("done", 0, True), ("in_progress", 0, False), ("done", 2, False), ("in_progress", 5, False)])
    def test_done_means_nothing_pending(self, state: str, pending: int, done: bool) -> None:
        """Complete only when the broker says done and no lease awaits Vault's confirmation."""
        assert is_complete(revocation(state=state, pending=pending)) is done

    def test_pending_message_says_the_broker_retries(self) -> None:
        """Exit 3's message counts what is pending, says the broker keeps going, and how to follow."""
        msg = pending_message(revocation(), 120.0)
        assert msg.startswith("3 of 1000 leases not yet confirmed")
        assert "after 120s" in msg and "keeps retrying" in msg and "broker revocations rvk_1" in msg


class TestRenderSummary:
    def test_fields(self) -> None:
        """The summary names the selector, the counts and the lock with how to lift it."""
        out = render_summary(revocation(state="done", revoked=1000, pending=0), tz=UTC)
        lines = dict(line.split(None, 1) for line in out.splitlines())
        assert lines["revocation"] == "rvk_1"
        assert lines["selector"] == "user alice@example.com"
        assert lines["by"] == "olivia@example.com at 12:34:56"
        assert lines["leases"] == "1000 live when it started"
        assert lines["revoked"] == "1000 confirmed by Vault"
        assert lines["pending"] == "0 not yet confirmed"
        assert lines["lock"] == "on: new issuance is blocked until `broker unlock rvk_1`"

    def test_lifted_lock(self) -> None:
        """After unlock the summary says when and by whom."""
        out = render_summary(revocation(lock=False, lifted_at=T0 + 3600, lifted_by="olivia@example.com"), tz=UTC)
        assert "lifted at 13:34:56 by olivia@example.com" in out

    def test_task_revocation_has_no_lock(self) -> None:
        """A task revocation locks nothing."""
        assert render_summary(revocation(kind="task", value="tsk_1", lock=False)).splitlines()[-1].endswith("none")

    def test_values_aligned(self) -> None:
        """Values start in one column."""
        width = len("revocation") + 2
        for line in render_summary(revocation(), tz=UTC).splitlines():
            assert line[width - 2:width] == "  " and line[width] != " "


class TestErrors:
    def test_problem_line(self) -> None:
        """A problem+json body becomes 'error: title: detail (code)'."""
        body = {"title": "Denied", "detail": "operators only", "code": "denied", "status": 403}
        assert error_line(403, body) == "error: Denied: operators only (denied)"

    def test_non_json_body(self) -> None:
        """A proxy's HTML error still gives one line, from the status and reason."""
        assert error_line(502, None, "Bad Gateway") == "error: Bad Gateway: Bad Gateway (http_error)"
        assert error_line(500, "x") == "error: HTTP 500: HTTP 500 (http_error)"

    @pytest.mark.parametrize(("status", "code"), [(401, 2), (403, 2), (400, 1), (404, 1), (429, 1), (503, 1)])
    def test_exit_codes(self, status: int, code: int) -> None:
        """401 and 403 exit 2 (who you are), anything else 1."""
        assert exit_code_for(status) == code

    def test_redact(self) -> None:
        """The token is replaced wherever it appears; an empty secret changes nothing."""
        assert redact("a eyJtok b eyJtok", "eyJtok") == "a <redacted> b <redacted>"
        assert redact("abc", "") == "abc"
