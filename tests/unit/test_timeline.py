"""The console's pictures as geometry (broker.timeline): where each task, lease and event lands, without a server.

The SVG itself is drawn by the console's ``chart`` macro; tests/api/test_console_escaping.py and the
browser test check that markup (escaping, the CSP) on the real pages.
"""

from __future__ import annotations

import pytest

from broker.audit import AuditRecord
from broker.rows import LeaseRow, TaskRow
from broker.timeline import WIDTH, Lane, Point, Span, lease_chart, task_lanes, timeline_chart

T0 = 1_800_000_000.0
X0, X1 = 250, WIDTH - 16  # the plot's left and right edges


def task(**over: object) -> TaskRow:
    base: dict[str, object] = dict(id="tsk_1", user="https://idp#alice", agent="spiffe://example.org/agent/a",
                                   role="support-triage", tenant="acme", reason="ticket 1", created_at=T0,
                                   expires_at=T0 + 600, state="ended", ended_at=T0 + 300, token_accessor="acc",
                                   sealed_token=b"", user_name="alice@example.com")
    base.update(over)
    return TaskRow(**base)  # type: ignore[arg-type]


def lease(lid: str, issued: float, *, state: str = "revoked", revoked: float | None = T0 + 300,
          grant: str = "tickets-db-ro") -> LeaseRow:
    return LeaseRow(id=lid, task_id="tsk_1", grant=grant, path="database/creds/tickets-ro", kind="database",
                    vault_lease_id="v", issued_at=issued, expires_at=issued + 120, renewable=True, state=state,
                    revoked_at=revoked)


class TestTaskLanes:
    def test_task_then_each_lease_with_events_where_they_belong(self) -> None:
        """The task's lane carries approvals and the revocation; a renewal goes on its lease's lane."""
        records = [AuditRecord(T0 + 10, "approval.requested", "pending", task="tsk_1"),
                   AuditRecord(T0 + 20, "approval.approved", "success", task="tsk_1", reason="CHG-1"),
                   AuditRecord(T0 + 50, "lease.renewed", "success", task="tsk_1", lease="lse_b"),
                   AuditRecord(T0 + 60, "lease.issued", "success", task="tsk_1", lease="lse_b"),
                   AuditRecord(T0 + 300, "task.revoked", "success", task="tsk_1")]
        lanes = task_lanes(task(state="revoked"), [lease("lse_b", T0 + 30), lease("lse_a", T0 + 5)], records)
        assert [(ln.label, ln.sub) for ln in lanes] == [("support-triage \u00b7 a", False), ("tickets-db-ro", True),
                                                         ("tickets-db-ro", True)]
        assert [p.cls for p in lanes[0].points] == ["asked", "approved", "revoked"]
        assert "CHG-1" in lanes[0].points[1].title
        assert lanes[1].spans[0].start == T0 + 5 and lanes[1].points == ()  # issue order
        assert [p.cls for p in lanes[2].points] == ["renewed"]
        assert lanes[0].spans[0] == Span(T0, T0 + 300, "task revoked", lanes[0].spans[0].title)

    def test_live_things_have_no_end(self) -> None:
        """An active task and a live lease have no end yet (drawn to now); an expired lease ends at its expiry."""
        lanes = task_lanes(task(state="active", ended_at=None),
                           [lease("l1", T0, state="active", revoked=None),
                            lease("l2", T0, state="expired", revoked=None)], [])
        assert lanes[0].spans[0].end is None and lanes[1].spans[0].end is None
        assert lanes[2].spans[0].end == T0 + 120


class TestTimelineChart:
    def test_positions_are_linear_in_time_and_clipped_to_the_window(self) -> None:
        """A span from 25% to 75% of the window sits at 25%..75% of the plot; one sticking out is clipped."""
        lanes = [Lane("a", (Span(T0 + 250, T0 + 750, "task ended", "a"),)),
                 Lane("b", (Span(T0 - 500, T0 + 2000, "lease revoked", "b"),), sub=True)]
        chart = timeline_chart(lanes, start=T0, end=T0 + 1000, now=T0 + 5000, summary="s")
        bars = [r for r in chart.rects if r.cls != "band"]
        plot = X1 - X0
        assert bars[0].x == pytest.approx(X0 + plot / 4, abs=0.1) and bars[0].w == pytest.approx(plot / 2, abs=0.1)
        assert bars[1].x == X0 and bars[1].x + bars[1].w == pytest.approx(X1, abs=0.1)
        assert bars[1].h < bars[0].h  # a lease is drawn thinner than its task
        assert bars[1].y > bars[0].y
        assert not [ln for ln in chart.lines if ln.cls == "now"]  # now is outside the window

    def test_open_span_runs_to_now_and_now_is_marked(self) -> None:
        """A live span ends at now, is classed open, and a 'now' line is drawn where now falls."""
        chart = timeline_chart([Lane("a", (Span(T0, None, "task active", "a"),))], start=T0, end=T0 + 100,
                               now=T0 + 50, summary="s")
        bar = next(r for r in chart.rects if r.cls != "band")
        now = next(ln for ln in chart.lines if ln.cls == "now")
        assert bar.cls == "task active open" and bar.x + bar.w == pytest.approx(now.x1, abs=0.1)
        assert now.x1 == pytest.approx(X0 + (X1 - X0) / 2, abs=0.1)

    def test_spans_and_points_outside_the_window_are_left_out(self) -> None:
        """Nothing outside the window is drawn; a point inside is a diamond centred on its time."""
        lanes = [Lane("a", (Span(T0 - 99, T0 - 50, "task ended", "x"),),
                      (Point(T0 - 1, "asked", "before"), Point(T0 + 10, "approved", "inside")))]
        chart = timeline_chart(lanes, start=T0, end=T0 + 20, now=T0, summary="s")
        assert [r for r in chart.rects if r.cls != "band"] == []
        assert [m.title for m in chart.marks] == ["inside"]
        m = chart.marks[0]
        assert m.x == pytest.approx(X0 + (X1 - X0) / 2, abs=0.1) and m.cls == "mark approved"
        assert len(m.points.split()) == 4

    @pytest.mark.parametrize(("span", "step_labels"), [(3600, 7), (86400, 9), (7 * 86400, 8)])
    def test_axis_has_at_most_eight_readable_ticks(self, span: int, step_labels: int) -> None:
        """Whatever the window, the axis gets a handful of round ticks (plus the UTC caption)."""
        chart = timeline_chart([], start=T0, end=T0 + span, now=T0, summary="s")
        ticks = [t for t in chart.texts if t.cls == "tick" and t.text != "UTC"]
        assert 2 <= len(ticks) <= step_labels
        assert any(t.text == "nothing happened in this window" for t in chart.texts)

    def test_long_labels_are_shortened_and_keep_the_full_text_as_title(self) -> None:
        """A long lane label is cut with an ellipsis; the whole label stays in its title (a tooltip)."""
        label = "x" * 80
        chart = timeline_chart([Lane(label, href="/console/tasks/t")], start=T0, end=T0 + 10, now=T0, summary="s")
        text = next(t for t in chart.texts if t.cls == "lane")
        assert len(text.text) == 34 and text.text.endswith("\u2026") and text.title == label
        assert text.href == "/console/tasks/t"

    def test_an_empty_window_is_refused(self) -> None:
        with pytest.raises(ValueError, match="end after"):
            timeline_chart([], start=T0, end=T0, now=T0, summary="s")


class TestLeaseChart:
    def test_bars_are_proportional_sorted_and_stacked(self) -> None:
        """One row per (tenant, grant) in order; the biggest spans the plot; pending is stacked after active."""
        chart = lease_chart([("globex", "db-rw", 1, 0), ("acme", "db-ro", 3, 1), ("acme", "cert", 2, 0)])
        labels = [t.text for t in chart.texts if t.cls == "lane"]
        assert labels == ["acme / cert", "acme / db-ro", "globex / db-rw"]
        bars = [r for r in chart.rects if r.cls != "band"]
        assert [b.cls for b in bars] == ["lease active", "lease active", "lease revoke_pending", "lease active"]
        cert, ro_active, ro_pending, rw = bars
        assert ro_pending.x == pytest.approx(ro_active.x + ro_active.w, abs=0.2)
        assert ro_active.w + ro_pending.w == pytest.approx(2 * cert.w, abs=0.2)  # 4 leases vs 2
        assert rw.w == pytest.approx(cert.w / 2, abs=0.2)
        assert [t.text for t in chart.texts if t.cls == "count"] == ["2", "3 + 1 pending", "1"]
        assert chart.summary == "7 live lease(s) over 3 grant(s) in 2 tenant(s)"

    def test_no_leases(self) -> None:
        chart = lease_chart([])
        assert any(t.text == "no live leases" for t in chart.texts)
        assert [r for r in chart.rects if r.cls != "band"] == []
