"""SPIFFE IDs and the ID patterns configuration names agents with (go-spiffe's parsing rules)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from broker.errors import ConfigError, InvalidIdentity

__all__ = ["SpiffeId", "SpiffePattern", "spiffe_problem"]

_SPIFFE_SCHEME: Final = "spiffe://"
_MAX_SPIFFE_ID_BYTES: Final = 2048
_MAX_TRUST_DOMAIN_BYTES: Final = 255
_TD_RE: Final = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE: Final = re.compile(r"[A-Za-z0-9._-]+")
_PATTERN_SEGMENT_RE: Final = re.compile(r"[A-Za-z0-9._*-]+")


def spiffe_problem(trust_domain: str, path: str) -> str | None:
    """Why ``spiffe://{trust_domain}{path}`` is not a SPIFFE ID (go-spiffe's rules), or None."""
    if not trust_domain:
        return "trust domain is missing"
    if len(trust_domain) > _MAX_TRUST_DOMAIN_BYTES:
        return "trust domain is too long"
    if not _TD_RE.fullmatch(trust_domain):
        return "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores"
    if len(_SPIFFE_SCHEME) + len(trust_domain) + len(path.encode("utf-8", "surrogatepass")) > _MAX_SPIFFE_ID_BYTES:
        return "SPIFFE ID is longer than 2048 bytes"
    if not path:
        return None
    if not path.startswith("/"):
        return "path must have a leading slash"
    segments = path[1:].split("/")
    for i, segment in enumerate(segments):
        if segment == "":
            # go-spiffe's two reasons: an empty last segment is a trailing slash.
            last = i == len(segments) - 1
            return "path cannot have a trailing slash" if last else "path cannot contain empty segments"
        if segment in (".", ".."):
            return "path cannot contain dot segments"
        if not _SEGMENT_RE.fullmatch(segment):
            return "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
    return None


def _split_spiffe(text: object) -> tuple[str, str] | str:
    """Split ``spiffe://td/path`` into (td, path), or return why it cannot be split."""
    if not isinstance(text, str):
        return "not a string"
    if not text:
        return "cannot be empty"
    # Lower-case scheme only: go-spiffe rejects "SPIFFE://" even though URI schemes are case-insensitive.
    if not text.startswith(_SPIFFE_SCHEME):
        return "scheme is missing or invalid"
    rest = text[len(_SPIFFE_SCHEME) :]
    td, slash, path = rest.partition("/")
    return td, slash + path


@dataclass(frozen=True)
class SpiffeId:
    """A SPIFFE ID that follows go-spiffe's rules; constructing an invalid one raises.

    ``path`` is ``""`` for a trust domain's own ID (``spiffe://example.org``), else ``/seg/seg``.

    Raises:
        InvalidIdentity: on construction, if the trust domain or path breaks the rules.
    """

    trust_domain: str
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, str) or not isinstance(self.path, str):
            msg = "malformed SPIFFE ID: not a string"
            raise InvalidIdentity(msg)
        problem = spiffe_problem(self.trust_domain, self.path)
        if problem is not None:
            msg = f"malformed SPIFFE ID: {problem}"
            raise InvalidIdentity(msg)

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://trust-domain/path``.

        Raises:
            InvalidIdentity: "malformed SPIFFE ID: ..." with go-spiffe's reason.
        """
        split = _split_spiffe(text)
        if isinstance(split, str):
            msg = f"malformed SPIFFE ID: {split}"
            raise InvalidIdentity(msg)
        return cls(*split)

    @property
    def segments(self) -> tuple[str, ...]:
        """The path's segments (empty for a trust domain ID)."""
        return tuple(self.path[1:].split("/")) if self.path else ()

    def __str__(self) -> str:
        return f"{_SPIFFE_SCHEME}{self.trust_domain}{self.path}"


class SpiffePattern:
    """A configured SPIFFE ID pattern such as ``spiffe://example.org/agent/support-*``.

    Matching is segment-wise: same trust domain (exact, no wildcards), same number of path segments, and
    each segment equal or, where the pattern segment has ``*``, matching with ``*`` standing for any run
    of segment characters. ``*`` never crosses ``/`` and there is no ``?``/``[...]`` magic, so
    ``.../agents/a`` never matches ``.../agents/a-evil`` and ``.../support-*`` never matches
    ``.../support-1/x``.
    """

    __slots__ = ("_regexes", "_text", "trust_domain")

    def __init__(self, trust_domain: str, segments: Sequence[str], text: str) -> None:
        self.trust_domain = trust_domain
        self._text = text
        # Each literal run is re.escape'd; '*' becomes a run of *segment* characters, which excludes '/'.
        self._regexes = tuple(
            re.compile("[A-Za-z0-9._-]*".join(re.escape(part) for part in seg.split("*"))) for seg in segments
        )

    @classmethod
    def parse(cls, text: str) -> SpiffePattern:
        """Parse a pattern from configuration.

        Raises:
            ConfigError: if it is not a SPIFFE ID with optional ``*`` inside path segments.
        """
        split = _split_spiffe(text)
        if isinstance(split, str):
            msg = f"invalid SPIFFE ID pattern {text!r}: {split}"
            raise ConfigError(msg)
        td, path = split
        # Validate the trust domain and the overall shape with '*' replaced by a plain character.
        problem = spiffe_problem(td, path.replace("*", "x"))
        segments = path[1:].split("/") if path else []
        if problem is None and any(not _PATTERN_SEGMENT_RE.fullmatch(s) for s in segments):
            problem = "path segment characters are limited to letters, numbers, dots, dashes, underscores and '*'"
        if problem is None and any(s.strip("*") in (".", "..") for s in segments):
            problem = "path cannot contain dot segments"
        if problem is not None:
            msg = f"invalid SPIFFE ID pattern {text!r}: {problem}"
            raise ConfigError(msg)
        return cls(td, segments, text)

    def matches(self, sid: SpiffeId) -> bool:
        """Whether ``sid`` is one of the IDs this pattern names (see the class docstring)."""
        if sid.trust_domain != self.trust_domain:
            return False
        segments = sid.segments
        if len(segments) != len(self._regexes):
            return False
        return all(rx.fullmatch(seg) is not None for rx, seg in zip(self._regexes, segments, strict=True))

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"SpiffePattern({self._text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SpiffePattern) and other._text == self._text

    def __hash__(self) -> int:
        return hash(self._text)
