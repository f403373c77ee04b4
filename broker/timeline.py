"""The console's pictures as geometry: what to draw where, as plain values (pure, no I/O, no markup).

Two kinds of chart, both laid out here and drawn as inline SVG by ``templates/console/_macros.html``
(``chart``), where autoescape escapes every text and title, so nothing a user or agent typed can become
markup:

* a **timeline**: one lane per task and one per lease beneath it, each a bar over its life (start to
  end, or to now while it lives), with markers for what happened at one instant (an approval asked for,
  given or refused, a renewal, a denial, a revocation) and a time axis. :func:`task_lanes` turns a
  task, its leases and its audit records into lanes; :func:`timeline_chart` lays lanes out over a window.
* **live leases by tenant and grant**: :func:`lease_chart`, one horizontal bar per (tenant, grant),
  active and pending-revocation leases stacked.

Everything is a function of its arguments (``now`` included), so each picture is unit-tested without a
server (``tests/unit/test_timeline.py``). Classes (``Rect.cls``...) are fixed words chosen here and the
rows' state names; the stylesheet colours them (the console's CSP allows no inline style).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from broker.audit import AuditRecord
from broker.rows import LeaseRow, TaskRow

__all__ = ["Chart", "Lane", "Marker", "Point", "Span", "lease_chart", "task_lanes", "timeline_chart"]

WIDTH = 1000
_LABEL_W = 250
_RIGHT = 16
_AXIS_H = 28
_LANE_H = 26
_TASK_BAR = 14
_LEASE_BAR = 9
_MAX_LABEL = 34
# Axis steps a person reads at a glance, in seconds.
_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600,
          86400, 2 * 86400, 7 * 86400)
_MAX_TICKS = 8
# Events drawn as a marker at one instant, and the marker's class.
_POINTS = {
    "approval.requested": "asked", "approval.approved": "approved", "approval.denied": "refused",
    "approval.expired": "refused", "access.denied": "refused", "lease.renewed": "renewed",
    "task.revoked": "revoked", "revocation.created": "revoked", "lease.aborted": "refused",
}


# -- what happened -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """Something that lived from ``start`` to ``end`` (None: still alive)."""

    start: float
    end: float | None
    cls: str
    title: str


@dataclass(frozen=True)
class Point:
    """Something that happened at one instant."""

    time: float
    cls: str
    title: str


@dataclass(frozen=True)
class Lane:
    """One row of a timeline: a task (``sub`` False) or one of its leases (``sub`` True)."""

    label: str
    spans: tuple[Span, ...] = ()
    points: tuple[Point, ...] = ()
    href: str | None = None
    sub: bool = False


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _short(text: str, limit: int = _MAX_LABEL) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def task_lanes(task: TaskRow, leases: Sequence[LeaseRow], records: Iterable[AuditRecord], *,
               href: str | None = None) -> list[Lane]:
    """The task's lane (its life, with its approvals, denials and revocation as markers), then one lane
    per lease (its life, its renewals), in issue order."""
    end = task.ended_at if task.ended_at is not None else (None if task.state == "active" else task.expires_at)
    who = task.user_name or task.user
    life = Span(task.created_at, end, f"task {task.state}",
                f"task {task.id}: {who} delegated {task.role} to {task.agent}; {task.state}, "
                f"from {_clock(task.created_at)}" + (f" to {_clock(end)}" if end is not None else ""))
    task_points: list[Point] = []
    lease_points: dict[str, list[Point]] = {}
    for rec in records:
        cls = _POINTS.get(rec.event)
        if cls is None:
            continue
        title = f"{rec.event} at {_clock(rec.time)}" + (f": {rec.reason}" if rec.reason else "")
        point = Point(rec.time, cls, title)
        if rec.event == "lease.renewed" and rec.lease is not None:
            lease_points.setdefault(rec.lease, []).append(point)
        else:
            task_points.append(point)
    agent_name = task.agent.rsplit("/", 1)[-1]
    lanes = [Lane(f"{task.role} \u00b7 {agent_name}", (life,), tuple(task_points), href=href)]
    for lease in sorted(leases, key=lambda x: (x.issued_at, x.id)):
        gone = lease.revoked_at if lease.revoked_at is not None else (
            None if lease.state in ("active", "revoke_pending") else lease.expires_at)
        span = Span(lease.issued_at, gone, f"lease {lease.state}",
                    f"lease {lease.id} ({lease.grant}, {lease.path}): {lease.state}, issued {_clock(lease.issued_at)}, "
                    f"expires {_clock(lease.expires_at)}"
                    + (f", revoked {_clock(lease.revoked_at)}" if lease.revoked_at is not None else ""))
        lanes.append(Lane(lease.grant, (span,), tuple(lease_points.get(lease.id, ())), sub=True))
    return lanes


# -- geometry -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float
    cls: str
    title: str


@dataclass(frozen=True)
class Marker:
    """A marker at (x, y): ``points`` is the SVG polygon (a diamond), ready for the ``points`` attribute."""

    x: float
    y: float
    points: str
    cls: str
    title: str


@dataclass(frozen=True)
class Line:
    x1: float
    y1: float
    x2: float
    y2: float
    cls: str


@dataclass(frozen=True)
class Text:
    x: float
    y: float
    text: str
    cls: str = ""
    anchor: str = "start"
    href: str | None = None
    title: str | None = None


@dataclass(frozen=True)
class Chart:
    """A laid-out picture: a ``width`` x ``height`` canvas and what is drawn on it, in drawing order."""

    width: int
    height: int
    summary: str
    lines: list[Line] = field(default_factory=list)
    rects: list[Rect] = field(default_factory=list)
    marks: list[Marker] = field(default_factory=list)
    texts: list[Text] = field(default_factory=list)


def _r(v: float) -> float:
    return round(v, 1)


def _step(span: float) -> int:
    """The smallest readable axis step that puts at most ``_MAX_TICKS`` ticks on ``span`` seconds."""
    for step in _STEPS:
        if span / step <= _MAX_TICKS:
            return step
    return math.ceil(span / _MAX_TICKS / 86400) * 86400


def _tick_label(t: float, step: int, span: float) -> str:
    if step < 60:
        return time.strftime("%H:%M:%S", time.gmtime(t))
    fmt = "%H:%M" if span <= 86400 and step < 86400 else ("%m-%d %H:%M" if step < 86400 else "%Y-%m-%d")
    return time.strftime(fmt, time.gmtime(t))


def _diamond(x: float, y: float, r: float) -> str:
    return f"{_r(x)},{_r(y - r)} {_r(x + r)},{_r(y)} {_r(x)},{_r(y + r)} {_r(x - r)},{_r(y)}"


def timeline_chart(lanes: Sequence[Lane], *, start: float, end: float, now: float, summary: str,
                   width: int = WIDTH) -> Chart:
    """Lay ``lanes`` out over the window ``[start, end]``: bars clipped to it (a live one runs to ``now``),
    markers inside it only, a UTC time axis on top, a line at ``now`` when it falls inside.

    Raises:
        ValueError: ``end`` is not after ``start``.
    """
    if not end > start:
        msg = "the window must end after it starts"
        raise ValueError(msg)
    x0, x1 = _LABEL_W, width - _RIGHT
    scale = (x1 - x0) / (end - start)

    def x(t: float) -> float:
        return x0 + (min(max(t, start), end) - start) * scale

    height = _AXIS_H + max(len(lanes), 1) * _LANE_H + 8
    chart = Chart(width=width, height=height, summary=summary)
    span = end - start
    step = _step(span)
    first = math.ceil(start / step) * step
    t = float(first)
    while t <= end:
        chart.lines.append(Line(_r(x(t)), _AXIS_H - 6, _r(x(t)), height - 4, "grid"))
        chart.texts.append(Text(_r(x(t)), _AXIS_H - 10, _tick_label(t, step, span), "tick", "middle"))
        t += step
    chart.texts.append(Text(x0 - 8, _AXIS_H - 10, "UTC", "tick", "end"))
    if not lanes:
        chart.texts.append(Text(x0, _AXIS_H + 18, "nothing happened in this window", "muted"))
    for i, lane in enumerate(lanes):
        mid = _AXIS_H + i * _LANE_H + _LANE_H / 2
        if i % 2 == 0:
            chart.rects.append(Rect(0, _r(mid - _LANE_H / 2), width, _LANE_H, "band", ""))
        label = ("\u2514 " if lane.sub else "") + lane.label
        chart.texts.append(Text(16 if lane.sub else 6, _r(mid + 4), _short(label), "sub" if lane.sub else "lane",
                                href=lane.href, title=lane.label))
        bar = _LEASE_BAR if lane.sub else _TASK_BAR
        for s in lane.spans:
            stop = now if s.end is None else s.end
            if stop < start or s.start > end:
                continue
            left, right = x(s.start), x(stop)
            cls = s.cls + (" open" if s.end is None else "")
            chart.rects.append(Rect(_r(left), _r(mid - bar / 2), _r(max(right - left, 2.0)), bar, cls, s.title))
        for p in lane.points:
            if start <= p.time <= end:
                px = x(p.time)
                chart.marks.append(Marker(_r(px), _r(mid), _diamond(px, mid, 6), f"mark {p.cls}", p.title))
    if start <= now <= end:
        chart.lines.append(Line(_r(x(now)), _AXIS_H - 6, _r(x(now)), height - 4, "now"))
        chart.texts.append(Text(_r(x(now)), height - 6, "now", "now", "end"))
    return chart


def lease_chart(counts: Sequence[tuple[str, str, int, int]], *, width: int = WIDTH) -> Chart:
    """Live leases by (tenant, grant): ``counts`` rows are (tenant, grant, active, pending revocation).

    One bar per row, sorted by tenant then grant, active and pending stacked, the numbers at the bar's end;
    the longest bar spans the plot.
    """
    rows = sorted(counts)
    total = sum(a + p for _, _, a, p in rows)
    tenants = len({t for t, _, _, _ in rows})
    summary = f"{total} live lease(s) over {len(rows)} grant(s) in {tenants} tenant(s)"
    height = _AXIS_H + max(len(rows), 1) * _LANE_H + 8
    chart = Chart(width=width, height=height, summary=summary)
    x0, x1 = _LABEL_W, width - _RIGHT - 90
    peak = max((a + p for _, _, a, p in rows), default=0)
    chart.texts.append(Text(6, _AXIS_H - 10, "tenant / grant", "tick"))
    chart.texts.append(Text(x0, _AXIS_H - 10, "live leases (active, then pending revocation)", "tick"))
    if not rows:
        chart.texts.append(Text(x0, _AXIS_H + 18, "no live leases", "muted"))
    for i, (tenant, grant, active, pending) in enumerate(rows):
        mid = _AXIS_H + i * _LANE_H + _LANE_H / 2
        if i % 2 == 0:
            chart.rects.append(Rect(0, _r(mid - _LANE_H / 2), width, _LANE_H, "band", ""))
        name = f"{tenant} / {grant}"
        chart.texts.append(Text(6, _r(mid + 4), _short(name), "lane", title=name))
        unit = (x1 - x0) / peak if peak else 0.0
        left = float(x0)
        stack = ((active, "lease active", "active"), (pending, "lease revoke_pending", "pending revocation"))
        for n, cls, word in stack:
            if n:
                chart.rects.append(Rect(_r(left), _r(mid - _TASK_BAR / 2), _r(max(n * unit, 2.0)), _TASK_BAR, cls,
                                        f"{name}: {n} {word}"))
                left += n * unit
        label = f"{active}" + (f" + {pending} pending" if pending else "")
        chart.texts.append(Text(_r(left + 6), _r(mid + 4), label, "count"))
    return chart
