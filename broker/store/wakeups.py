"""Approval wake-ups across replicas: PostgreSQL ``LISTEN``/``NOTIFY`` on the store's own database.

A vote that decides an approval sends ``NOTIFY broker_approvals, '<approval id>'`` in its transaction
(``ApprovalStore.vote``): PostgreSQL delivers it at commit, to every replica listening, so a long poll
held by another replica wakes at once instead of at its next re-read. The listener holds one extra
connection per replica and reconnects with backoff; while it is down, long polls fall back to
re-reading the store every second. SQLite (one replica) needs none of this: the in-process wake-up does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

__all__ = ["CHANNEL", "ApprovalListener", "libpq_url"]

CHANNEL: Final = "broker_approvals"


def libpq_url(url: str) -> str:
    """The store's SQLAlchemy URL as a libpq one (without the ``+driver``)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class ApprovalListener:
    """Calls ``wake(approval_id)`` for every decision any replica commits. ``connected``: listening now."""

    def __init__(self, url: str, wake: Callable[[str], None], *, max_backoff: float = 10.0) -> None:
        self._url = libpq_url(url)
        self._wake = wake
        self._max_backoff = max_backoff
        self.connected = False

    async def run_forever(self) -> None:
        import psycopg

        backoff = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._url, autocommit=True,
                                                                 connect_timeout=5) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.connected = True
                    backoff = 0.5
                    async for note in conn.notifies():
                        self._wake(note.payload)
            except asyncio.CancelledError:
                raise
            except (psycopg.Error, OSError) as exc:
                log.warning("approval wake-ups: the store's LISTEN connection failed (%s); reconnecting",
                            type(exc).__name__)
            finally:
                self.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)
