"""The broker's log output: text lines for people, or one JSON object per line for log platforms.

Rules this file keeps:
1. A JSON line holds the record's time, level, logger and message, and, for the access log, the fields
   ``broker.server.AccessLogger`` attaches (``request_id``, ``method``, ``route``, ``status``,
   ``duration_ms``, ``client``, ``task``, ``agent``, ``user``). Nothing else of a record is copied: an
   ``extra`` some library adds is not a field, so no header, query value or body reaches the line by
   that door.
2. Every line is one object on one line, whatever the message holds (``json.dumps`` escapes newlines):
   a CR-LF in a logged value cannot forge a second entry.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal

__all__ = ["LOG_FORMATS", "JsonFormatter", "LogFormat", "setup_logging"]

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HTTP_FIELDS = ("request_id", "method", "route", "status", "duration_ms", "client", "task", "agent", "user")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (rule 1)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        http = getattr(record, "http", None)
        if isinstance(http, dict):
            out.update({k: http[k] for k in _HTTP_FIELDS if http.get(k) is not None})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False, default=str)


def setup_logging(level: str, fmt: LogFormat = "text") -> None:
    """Configure the root logger once, on stderr, in ``fmt``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
