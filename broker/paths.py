"""Vault paths and names that may go into a URL: checked by a strict pattern, never only escaped. Pure.

URL-escaping alone (hvac's ``format_url``) lets ``/`` and ``..`` through, so a role or grant path from the
catalog, or a name from a caller, could reach another endpoint. Both the catalog (at start-up, every
grant's path) and the Vault client (before every request) check with these.
"""

from __future__ import annotations

import re
from typing import Final

from broker.errors import BadRequest

__all__ = ["validate_name", "validate_path"]


_SEGMENT: Final = re.compile(r"[A-Za-z0-9_.\-]+")
_MAX_PATH: Final = 512


def validate_path(path: str) -> str:
    """Return ``path`` unchanged if it is a safe Vault API path relative to ``/v1/``.

    Segments are ``[A-Za-z0-9_.-]+``; no empty, ``.`` or ``..`` segment; no leading or trailing ``/``;
    at most 512 characters.

    Raises:
        BadRequest: the path does not match.
    """
    if not isinstance(path, str) or not path or len(path) > _MAX_PATH:
        msg = "invalid Vault path"
        raise BadRequest(msg, reason=f"invalid Vault path (length {len(path) if isinstance(path, str) else '?'})")
    for segment in path.split("/"):
        if segment in (".", "..") or _SEGMENT.fullmatch(segment) is None:
            msg = "invalid Vault path"
            raise BadRequest(msg, reason=f"invalid Vault path segment in {path[:80]!r}")
    return path


def validate_name(name: str) -> str:
    """A single path segment (role, policy, device name).

    Raises:
        BadRequest: not one safe segment.
    """
    validate_path(name)
    if "/" in name:
        msg = "invalid Vault name"
        raise BadRequest(msg, reason=f"a name must be one path segment: {name[:80]!r}")
    return name
