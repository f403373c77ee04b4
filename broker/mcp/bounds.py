"""What a tool may return and accept, decided without I/O: rows, bytes and Redis commands. Pure.

A model reads every byte a tool returns, and a query or a command can return a whole database: each
result is cut at ``Limits.max_rows`` rows and ``Limits.max_bytes`` bytes of JSON, and says so
(``truncated``). Time is bounded where the work runs (the database's own statement timeout, and a
client-side deadline around every call): see ``broker.mcp.tools``.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import shlex
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from broker.errors import ToolRefused

__all__ = ["Limits", "RowCollector", "bound_text", "bound_value", "jsonable", "parse_redis_command"]

# Redis commands a tool will not send, and why: they change who the connection is (AUTH, HELLO with
# AUTH, RESET), where it points (SELECT: the endpoint names the database), or turn it into a stream that
# never answers (MONITOR, SUBSCRIBE, replication). The ACL of the user Vault created decides the rest.
_REFUSED_REDIS: Final = frozenset({
    "AUTH", "HELLO", "RESET", "SELECT", "QUIT", "MONITOR", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "SYNC",
    "PSYNC", "REPLCONF", "WAIT", "WAITAOF", "BLPOP", "BRPOP", "BLMOVE", "BZPOPMIN", "BZPOPMAX", "BLMPOP",
    "BZMPOP", "BRPOPLPUSH", "XREAD", "XREADGROUP",
})


@dataclass(frozen=True)
class Limits:
    """Bounds on every tool call. ``timeout`` is seconds for one statement, command or request."""

    max_rows: int = 200
    max_bytes: int = 64 * 1024
    timeout: float = 15.0
    max_input_bytes: int = 64 * 1024

    def check_input(self, what: str, text: str) -> None:
        """Raises: ToolRefused: ``text`` is empty or longer than ``max_input_bytes``."""
        size = len(text.encode("utf-8", "surrogatepass"))
        if not text.strip():
            msg = f"{what} is empty"
            raise ToolRefused(msg)
        if size > self.max_input_bytes:
            msg = f"{what} is {size} bytes; the limit is {self.max_input_bytes}"
            raise ToolRefused(msg)


def jsonable(value: Any) -> Any:
    """A database or Redis value as JSON can carry it (bytes as base64 unless they are UTF-8 text)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(raw).decode()}
    if isinstance(value, decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, datetime.date | datetime.time | datetime.datetime):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, Sequence | set | frozenset):
        return [jsonable(v) for v in value]
    return str(value)


def _size(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


class RowCollector:
    """Rows taken until ``max_rows`` or ``max_bytes`` (of their JSON) would be passed."""

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self.rows: list[list[Any]] = []
        self.bytes = 0
        self.truncated = False

    def add(self, row: Sequence[Any]) -> bool:
        """Take ``row`` if it fits; False (and ``truncated``) once the result is full."""
        if len(self.rows) >= self._limits.max_rows:
            self.truncated = True
            return False
        cells = [jsonable(v) for v in row]
        size = _size(cells)
        if self.bytes + size > self._limits.max_bytes:
            self.truncated = True
            return False
        self.rows.append(cells)
        self.bytes += size
        return True


def bound_text(text: str, max_bytes: int) -> tuple[str, bool]:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes (never inside a character), and whether it was cut."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= max_bytes:
        return text, False
    return raw[:max_bytes].decode("utf-8", "ignore"), True


def bound_value(value: Any, max_bytes: int) -> tuple[Any, bool]:
    """A JSON value (a Redis reply) cut to about ``max_bytes``: a list keeps its first items, a string its start."""
    value = jsonable(value)
    if _size(value) <= max_bytes:
        return value, False
    if isinstance(value, str):
        return bound_text(value, max_bytes)[0], True
    if isinstance(value, list):
        kept: list[Any] = []
        used = 2
        for item in value:
            size = _size(item) + 1
            if used + size > max_bytes:
                break
            kept.append(item)
            used += size
        return kept, True
    return bound_text(json.dumps(value, ensure_ascii=False), max_bytes)[0], True


def parse_redis_command(text: str) -> list[str]:
    """A command line split as a shell would (``SET "a key" 'a value'``), then screened.

    Raises:
        ToolRefused: unbalanced quotes, no command, or a command this tool does not send (``_REFUSED_REDIS``).
    """
    try:
        args = shlex.split(text, posix=True)
    except ValueError as exc:
        msg = f"cannot parse the command: {exc}"
        raise ToolRefused(msg) from None
    if not args:
        raise ToolRefused("no command given")
    name = args[0].upper()
    if name in _REFUSED_REDIS or (name == "CLIENT" and len(args) > 1 and args[1].upper() in ("KILL", "PAUSE")):
        msg = f"{name} is not available through this tool (it would change the connection or never answer)"
        raise ToolRefused(msg)
    return args
