"""The delegation timeline of a user, an agent or a task, from ``GET /v1/audit`` records (pure).

``broker audit replay`` (:mod:`broker.cli.audit`) reads the records through ``broker.client`` and
prints them with one of:

- ``render_table`` (default): one block per task, in the order the tasks first appear, records in time
  order. The header says who started it, for which agent and role; then each record: the credentials
  issued, and under each credential the Vault requests made with it (``vault.request`` records carrying
  its lease), approvals, renewals, denials, the end or the revocation. Records outside any task (an
  operator's revocation, a Vault request nobody can explain) come last.
- ``render_jsonl``: one record per line, its canonical JSON exactly as the chain hashes it
  (:func:`broker.audit.canonical_bytes`).
- ``render_ocsf``: one OCSF 1.8.0 event per line (:mod:`broker.audit.ocsf`).

Everything here is a function of the API's records: no I/O, and no import of a CLI module.
``parse_time`` raises click's ``BadParameter`` because it parses ``--since``/``--until``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, tzinfo
from typing import Any, Literal

import click

from broker.audit import AuditRecord, canonical_bytes
from broker.audit.ocsf import to_ocsf
from broker.timefmt import format_time

__all__ = ["ReplayRecord", "TaskBlock", "group_by_task", "parse_time", "records_from_api", "render_jsonl",
           "render_ocsf", "render_table"]

Format = Literal["table", "jsonl", "ocsf"]
_RECORD_FIELDS = tuple(f.name for f in fields(AuditRecord))
_ENDS = frozenset({"task.ended", "task.revoked", "task.expired", "task.aborted"})


@dataclass(frozen=True)
class ReplayRecord:
    seq: int
    record: AuditRecord


@dataclass
class TaskBlock:
    """One task's records in chain order (``task`` None: the records outside any task)."""

    task: str | None
    records: list[ReplayRecord] = field(default_factory=list)


# -- input (pure) ----------------------------------------------------------------------------------------


def records_from_api(items: Iterable[Mapping[str, Any]]) -> list[ReplayRecord]:
    """``GET /v1/audit`` records (``AuditOut``) as chain records, in sequence order.

    Raises:
        ValueError: an item without ``seq``, ``time``, ``event`` or ``outcome``.
    """
    out: list[ReplayRecord] = []
    for item in items:
        try:
            values = {k: item.get(k) for k in _RECORD_FIELDS}
            rec = AuditRecord(**{**values, "time": float(item["time"]), "event": str(item["event"]),
                                 "outcome": item["outcome"]})
            out.append(ReplayRecord(int(item["seq"]), rec))
        except (KeyError, TypeError) as exc:
            msg = f"not an audit record: {exc}"
            raise ValueError(msg) from exc
    out.sort(key=lambda r: r.seq)
    return out


_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}")


def parse_time(text: str, *, tz: tzinfo | None = None) -> float:
    """``--since``/``--until``: Unix seconds, or ISO 8601 (a date, or a date and time; local time without offset).

    Raises:
        click.BadParameter: neither.
    """
    value = text.strip()
    try:
        return float(value)
    except ValueError:
        pass
    if _ISO.match(value):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=tz) if tz is not None else moment.astimezone()
            return moment.timestamp()
    msg = f"{text!r} is neither Unix seconds nor an ISO 8601 time"
    raise click.BadParameter(msg)


# -- rendering (pure) -----------------------------------------------------------------------------------


def group_by_task(records: Sequence[ReplayRecord]) -> list[TaskBlock]:
    """Blocks per task, ordered by each task's first record; records with no task in a last block."""
    blocks: dict[str | None, TaskBlock] = {}
    for r in records:
        blocks.setdefault(r.record.task, TaskBlock(r.record.task)).records.append(r)
    tasks = [b for k, b in blocks.items() if k is not None]
    return tasks + ([blocks[None]] if None in blocks else [])


def _clean(text: object) -> str:
    # Free text (reasons) must not redraw the auditor's terminal.
    return "".join(ch if ch.isprintable() else "?" for ch in str(text))


def _kv(*parts: tuple[str, object]) -> str:
    return "  ".join(f"{k} {_clean(v)}" if k else _clean(v) for k, v in parts if v not in (None, ""))


def _who(rec: AuditRecord) -> str | None:
    """The person for a reader: the display name, and the id (what the broker compares) beside it."""
    if rec.user is None:
        return None
    if rec.user_name and rec.user_name != rec.user:
        return f"{rec.user_name} <{rec.user}>"
    return rec.user


def describe(rec: AuditRecord) -> str:
    """The detail column of one record: what it says beyond its event, time and outcome."""
    e = rec.event
    if e == "task.started":
        role = (rec.resource or "").removeprefix("role:")
        return _kv(("by", _who(rec)), ("for", rec.agent), ("as", role), ("tenant", rec.tenant),
                   ("reason", rec.reason), ("delegation jti", rec.delegation_jti))
    if e.startswith("lease."):
        return _kv(("", rec.resource), ("lease", rec.lease), ("vault request", rec.vault_request_id),
                   ("", rec.reason))
    if e.startswith("vault."):
        return _kv(("", rec.action), ("", rec.resource), ("request", rec.vault_request_id), ("", rec.reason))
    if e.startswith("approval."):
        return _kv(("", rec.resource), ("", rec.reason))
    if e in _ENDS:
        return _kv(("", rec.reason))
    return _kv(("user", _who(rec)), ("agent", rec.agent), ("", rec.action), ("", rec.resource), ("lease", rec.lease),
               ("", rec.reason))


def _line(r: ReplayRecord, indent: int, *, iso: bool, tz: tzinfo | None) -> str:
    rec = r.record
    marker = "!" if rec.event == "vault.unexplained" or rec.outcome in ("denied", "failure") else " "
    when = format_time(rec.time, iso=iso, tz=tz)
    head = f"{' ' * indent}{when} {marker} #{r.seq:<6} {rec.event:<18} {rec.outcome:<7}"
    detail = describe(rec)
    return f"{head}  {detail}".rstrip() if detail else head.rstrip()


def _header(block: TaskBlock, *, iso: bool, tz: tzinfo | None) -> str:
    if block.task is None:
        return "outside any task"
    first = block.records[0].record
    started = next((r.record for r in block.records if r.record.event == "task.started"), None)
    who = started or first
    role = (started.resource or "").removeprefix("role:") if started else "?"
    end = next((r.record for r in reversed(block.records) if r.record.event in _ENDS), None)
    state = f"{end.event.removeprefix('task.')} {format_time(end.time, iso=True, tz=tz)}" if end else "open"
    return (f"task {_clean(block.task)}  user {_clean(_who(who) or '-')}  agent {_clean(who.agent or '-')}  "
            f"role {_clean(role)}  tenant {_clean(who.tenant or '-')}  "
            f"since {format_time(first.time, iso=True, tz=tz)}  {state}")


def render_block(block: TaskBlock, *, iso: bool = False, tz: tzinfo | None = None) -> list[str]:
    """One task's block: header, then each record in time order; Vault requests made with a lease under that lease."""
    lines = [_header(block, iso=iso, tz=tz)]
    issued = {r.record.lease for r in block.records if r.record.event == "lease.issued" and r.record.lease}
    by_lease: dict[str, list[ReplayRecord]] = {}
    top: list[ReplayRecord] = []
    # Time order, not chain order: Vault's entries are merged into the chain after the broker's own records
    # of the same moment (Vault's clock and the broker's are one host's, or NTP-close).
    for r in sorted(block.records, key=lambda r: (r.record.time, r.seq)):
        lease = r.record.lease
        if r.record.event.startswith("vault.") and lease in issued and lease is not None:
            by_lease.setdefault(lease, []).append(r)
        else:
            top.append(r)
    for r in top:
        lines.append(_line(r, 2, iso=iso, tz=tz))
        if r.record.event == "lease.issued" and r.record.lease in by_lease:
            lines += [_line(v, 6, iso=iso, tz=tz) for v in by_lease.pop(r.record.lease)]
    return lines


def render_table(records: Sequence[ReplayRecord], *, iso: bool = False, tz: tzinfo | None = None) -> str:
    """The timeline: one block per task, a blank line between blocks, a count at the end."""
    blocks = group_by_task(records)
    out: list[str] = []
    for block in blocks:
        if out:
            out.append("")
        out += render_block(block, iso=iso, tz=tz)
    tasks = sum(1 for b in blocks if b.task is not None)
    out += ["", f"{len(records)} records, {tasks} task{'s' if tasks != 1 else ''}"]
    return "\n".join(out)


def render_jsonl(records: Sequence[ReplayRecord]) -> str:
    """One canonical record per line (the bytes the chain hashes)."""
    return "".join(canonical_bytes(r.record, r.seq).decode("utf-8") + "\n" for r in records)


def render_ocsf(records: Sequence[ReplayRecord], *, origin: str = "agent-broker") -> str:
    """One OCSF event per line."""
    return "".join(json.dumps(to_ocsf(r.record, r.seq, origin=origin), sort_keys=True, separators=(",", ":"),
                              ensure_ascii=False) + "\n" for r in records)

