"""Console sessions (broker.console) in the store, so that a session begun on one replica holds on all.

Rows are keyed by the SHA-256 of the session id, never the id: the id is the cookie, and a copy of the table
(a backup, a read replica) must not sign anyone in. ``csrf`` is the session's synchronizer token, kept as
is because every form post compares it; like the id it is a secret and goes in no log or error.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, func, insert, select, update

from broker.store._base import StoreBase
from broker.store.schema import console_sessions

__all__ = ["ConsoleSessionRow", "ConsoleSessionStore"]

_cs = console_sessions.c


@dataclass(frozen=True)
class ConsoleSessionRow:
    key: str
    person: str
    identity: str  # JSON of the verified identity, written and read by broker.console
    csrf: str
    flash: str | None
    created_at: float
    expires_at: float

    def __repr__(self) -> str:
        return f"ConsoleSessionRow(person={self.person!r}, expires_at={self.expires_at}, <key and csrf redacted>)"


class ConsoleSessionStore(StoreBase):
    async def create_console_session(self, row: ConsoleSessionRow, *, per_person: int, limit: int,
                                     now: float) -> int | None:
        """Insert ``row`` in one transaction, after purging expired sessions and ending the person's own oldest
        sessions past ``per_person - 1``. Returns None once created, or (nothing written) the number of live
        sessions when there are ``limit`` already: a sign-in is refused rather than evicting another person.

        Replicas signing in at once may each pass the global cap by one row; the cap bounds memory and work,
        and it holds to within the number of replicas.
        """
        def run() -> int | None:
            with self._tx() as conn:
                conn.execute(delete(console_sessions).where(_cs.expires_at <= now))
                own = [r.key for r in conn.execute(select(_cs.key).where(_cs.person == row.person)
                                                   .order_by(_cs.created_at, _cs.key))]
                ending = own[:max(len(own) - per_person + 1, 0)]
                live = conn.execute(select(func.count()).select_from(console_sessions)).scalar_one() - len(ending)
                if live >= limit:
                    return int(live)
                if ending:
                    conn.execute(delete(console_sessions).where(_cs.key.in_(ending)))
                conn.execute(insert(console_sessions).values(
                    key=row.key, person=row.person, identity=row.identity, csrf=row.csrf, flash=row.flash,
                    created_at=row.created_at, expires_at=row.expires_at))
            return None
        return await self._run(run)

    async def get_console_session(self, key: str, *, now: float, take_flash: bool = False
                                  ) -> ConsoleSessionRow | None:
        """The live session under ``key``, or None (an expired one is deleted on the way). With ``take_flash``
        its flash message is returned and cleared, so that it shows once, on whichever replica."""
        def run() -> ConsoleSessionRow | None:
            with self._read() as conn:
                r = conn.execute(select(console_sessions).where(_cs.key == key)).mappings().first()
            if r is None:
                return None
            row = ConsoleSessionRow(**r)
            if row.expires_at <= now:
                with self._tx() as tx:
                    tx.execute(delete(console_sessions).where(_cs.key == key, _cs.expires_at <= now))
                return None
            if take_flash and row.flash is not None:
                with self._tx() as tx:
                    taken = tx.execute(update(console_sessions).where(_cs.key == key, _cs.flash == row.flash)
                                       .values(flash=None)).rowcount
                if taken != 1:  # another page took it first
                    row = ConsoleSessionRow(**{**r, "flash": None})
            return row
        return await self._run(run)

    async def set_console_session_flash(self, key: str, flash: str) -> None:
        """The message the session's next page shows once (after a redirect, perhaps to another replica)."""
        def run() -> None:
            with self._tx() as conn:
                conn.execute(update(console_sessions).where(_cs.key == key).values(flash=flash))
        await self._run(run)

    async def drop_console_session(self, key: str) -> None:
        def run() -> None:
            with self._tx() as conn:
                conn.execute(delete(console_sessions).where(_cs.key == key))
        await self._run(run)

    async def purge_console_sessions(self, *, now: float) -> int:
        """Delete expired sessions (the maintenance loop; sign-ins do it too). Returns how many."""
        def run() -> int:
            with self._tx() as conn:
                return int(conn.execute(delete(console_sessions).where(_cs.expires_at <= now)).rowcount)
        return await self._run(run)

    async def count_console_sessions(self, *, now: float) -> int:
        def run() -> int:
            with self._read() as conn:
                return int(conn.execute(select(func.count()).select_from(console_sessions)
                                        .where(_cs.expires_at > now)).scalar_one())
        return await self._run(run)
