"""Unix times as people read them: the one place the broker's text output formats a moment.

Rules this file keeps:

- Pure: every function takes the time it shows; nothing here reads the clock.
- ``format_time`` is what terminals show (the operator CLI, audit replay, ``broker dev``): local
  ``HH:MM:SS`` by default, ISO 8601 with its offset on request, ``-`` for a moment that never happened.
- ``utc_stamp`` is what goes into audit reasons, where a reader on another machine must not have to
  guess a zone: UTC, ISO 8601, with ``Z``.
- The console formats its own times (it is rendered separately).
"""

from __future__ import annotations

import time
from datetime import datetime, tzinfo

__all__ = ["format_time", "utc_stamp"]


def format_time(ts: float | None, *, iso: bool = False, tz: tzinfo | None = None) -> str:
    """A Unix time as ``HH:MM:SS`` (or ISO 8601 with offset when ``iso``) in ``tz``, local by default.

    ``None`` (never happened) is ``-``.
    """
    if ts is None:
        return "-"
    moment = datetime.fromtimestamp(ts, tz).astimezone(tz)
    return moment.isoformat(timespec="seconds") if iso else moment.strftime("%H:%M:%S")


def utc_stamp(ts: float) -> str:
    """A Unix time as ``2024-05-01T12:34:56Z`` (UTC, whole seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
