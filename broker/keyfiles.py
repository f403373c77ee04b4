"""Reading private key files: refused when group or others can read them."""

from __future__ import annotations

from pathlib import Path

from broker.errors import ConfigError


def read_private_file(path: Path, *, what: str) -> bytes:
    """The file's bytes.

    Raises:
        ConfigError: missing or unreadable, or readable by group or others.
    """
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        msg = f"cannot read {what} {path}: {exc.strerror}"
        raise ConfigError(msg) from exc
    if mode & 0o077:
        msg = f"{what} {path} must not be readable by group or others (chmod 600)"
        raise ConfigError(msg)
    return data
