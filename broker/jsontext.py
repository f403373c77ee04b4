"""Request bodies as JSON text: decoded strictly, before any model sees them. Pure.

Rules this file keeps (issue 8's findings, ``tests/api/test_advisories.py``):
1. UTF-8 only. ``json.loads`` on bytes would guess UTF-16 or UTF-32 from the first bytes, so one body
   could mean different things to the broker and to whatever sits in front of it; a BOM is refused too.
2. Nesting deeper than ``MAX_DEPTH`` is refused by a linear scan *before* parsing: Python's parser
   recurses, and a body of a few KiB of ``[`` would otherwise end in a ``RecursionError``.
3. Numbers are numbers a person meant: ``NaN`` and ``Infinity`` are refused, a float that overflows to
   infinity (``1e400``) is refused, and an integer must fit a signed 64-bit column.
4. Duplicate member names are refused: two parsers that keep different duplicates read two requests.
5. Nothing of the input reaches an error message: the caller may have pasted a token into the body.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any, Final

from broker.errors import JsonTooDeep, MalformedJson, NumberOutOfRange

__all__ = ["INT64_MAX", "MAX_DEPTH", "loads"]

MAX_DEPTH: Final = 32
INT64_MAX: Final = 2**63 - 1
# The tokens that matter for depth, in one left-to-right pass: an escape (so an escaped quote does not
# end a string), a quote, a bracket. Linear in the body, whatever it holds (an unclosed string included).
_TOKENS: Final = re.compile(r'\\.|["\[\]{}]', re.S)


def loads(raw: bytes) -> Any:
    """Decode a request body.

    Raises:
        MalformedJson: not UTF-8, a BOM, not JSON, or duplicate member names.
        JsonTooDeep: arrays and objects nested deeper than ``MAX_DEPTH``.
        NumberOutOfRange: NaN, Infinity, a float beyond the double range, an integer beyond int64.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = "the body is not UTF-8"
        raise MalformedJson(msg) from exc
    if text.startswith("\ufeff"):
        msg = "the body starts with a byte order mark"
        raise MalformedJson(msg)
    if _depth(text) > MAX_DEPTH:
        msg = f"the body nests arrays and objects deeper than {MAX_DEPTH} levels"
        raise JsonTooDeep(msg)
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_constant, parse_int=_int,
                          parse_float=_float)
    except (NumberOutOfRange, MalformedJson):
        raise
    except (ValueError, RecursionError) as exc:
        msg = "the body is not valid JSON"
        raise MalformedJson(msg) from exc


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects outside string literals (a guard: the parser checks the rest)."""
    if "[" not in text and "{" not in text:
        return 0
    depth = deepest = 0
    in_string = False
    for token in _TOKENS.findall(text):
        if token == '"':  # noqa: S105 -- a JSON token, not a password
            in_string = not in_string
        elif in_string or len(token) == 2:
            continue
        elif token in "[{":  # noqa: S105 -- a JSON token, not a password
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    break
        else:
            depth -= 1
    return deepest


def _object(pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        msg = "the body repeats a member name"
        raise MalformedJson(msg)
    return out


def _constant(_name: str) -> Any:
    msg = "the body holds a number that is not finite"
    raise NumberOutOfRange(msg)


def _int(text: str) -> int:
    # Bounded by length first: int() of a huge digit string is itself slow (CVE-2020-10735).
    if len(text) > 20 or abs(value := int(text)) > INT64_MAX:
        msg = "an integer in the body is out of range"
        raise NumberOutOfRange(msg)
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        msg = "a number in the body is out of range"
        raise NumberOutOfRange(msg)
    return value
