"""Where ``broker mcp`` gets the agent's JWT-SVID: a file something else rotates, or the SPIFFE Workload API.

Both are ``broker.client.TokenSource`` callables, asked on every request to the broker, so a rotated SVID
is used from the next call on. Neither logs or repeats the token.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.errors import ConfigError

__all__ = ["SvidFile", "WorkloadApiSvid"]


class SvidFile:
    """A JWT-SVID in a file (spiffe-helper, a sidecar or the host writes it), re-read when it changes.

    The file is ``stat``-ed on every call; its inode, modification time and size together say whether it
    changed, so a rotation by rename (a new inode) and one in place (a new mtime) are both seen.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int, int] | None = None
        self._token = ""

    async def __call__(self) -> str:
        """Raises: ConfigError: the file is missing, unreadable or empty."""
        try:
            st = os.stat(self.path)
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
            if seen != self._seen:
                text = await asyncio.to_thread(self.path.read_text, encoding="ascii")
                self._token, self._seen = text.strip(), seen
        except (OSError, UnicodeDecodeError) as exc:
            msg = f"the SVID file {self.path} cannot be read ({type(exc).__name__})"
            raise ConfigError(msg) from None
        if not self._token:
            msg = f"the SVID file {self.path} is empty"
            raise ConfigError(msg)
        return self._token


class WorkloadApiSvid:
    """A JWT-SVID for ``audience`` from the SPIFFE Workload API (py-spiffe), fetched again near its expiry.

    ``client`` is a ``spiffe.WorkloadApiClient`` (or anything with its ``fetch_jwt_svid``); py-spiffe's calls
    block, so each runs in a worker thread.
    """

    # Fetch a new SVID once less than this is left of the one held.
    REFRESH_SECONDS = 30.0

    def __init__(self, client: Any, audience: str, *, clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._audience = audience
        self._clock = clock
        self._token = ""
        self._expiry = 0.0

    @classmethod
    def connect(cls, socket: str, audience: str) -> WorkloadApiSvid:
        """Raises: ConfigError: py-spiffe refuses the socket path."""
        from spiffe import WorkloadApiClient
        from spiffe.errors import ArgumentError

        try:
            client = WorkloadApiClient(socket_path=socket, default_timeout=10)
        except ArgumentError as exc:
            msg = f"the SPIFFE Workload API socket cannot be used: {exc}"
            raise ConfigError(msg) from None
        return cls(client, audience)

    async def __call__(self) -> str:
        """Raises: ConfigError: the Workload API gave no SVID."""
        if self._token and self._expiry - self._clock() > self.REFRESH_SECONDS:
            return self._token
        try:
            svid = await asyncio.to_thread(self._client.fetch_jwt_svid, audience={self._audience})
        except Exception as exc:  # noqa: BLE001 -- py-spiffe raises grpc's and its own; all mean "no SVID"
            msg = f"the SPIFFE Workload API gave no JWT-SVID ({type(exc).__name__})"
            raise ConfigError(msg) from None
        self._token, self._expiry = str(svid.token), float(svid.expiry)
        return self._token

    def close(self) -> None:
        close = getattr(self._client, "close", None)
        if callable(close):
            close()
