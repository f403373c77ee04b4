"""Singleton leases: which replica does the work that one replica must do alone, and until when.

Each acquire or renewal is ONE statement, a compare-and-set: it takes the row when it is free or
expired, extends it when the caller already holds it, and changes nothing otherwise. Time is the
database's clock, not the replicas' (theirs may differ; the store has one). The fence grows by one at
every change of holder, so work stamped with an older fence is a former holder's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sqlalchemy import text

from broker.store._base import StoreBase

__all__ = ["Hold", "SingletonRow", "SingletonStore"]

# The database's wall clock in epoch seconds.
_NOW: Final = {
    "postgresql": "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)",
    "sqlite": "((julianday('now') - 2440587.5) * 86400.0)",
}
_HOLD: Final = (
    "INSERT INTO singletons (name, holder, expires_at, fence) VALUES (:name, :holder, {now} + :ttl, 1) "
    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at, "
    "fence = singletons.fence + CASE WHEN singletons.holder = excluded.holder THEN 0 ELSE 1 END "
    "WHERE singletons.holder = excluded.holder OR singletons.expires_at < {now} "
    "RETURNING fence, expires_at - {now}"
)
_RELEASE: Final = "UPDATE singletons SET expires_at = 0 WHERE name = :name AND holder = :holder"
_LIST: Final = "SELECT name, holder, expires_at - {now}, fence FROM singletons ORDER BY name"


@dataclass(frozen=True)
class Hold:
    """A lease the caller holds: its fencing number and the seconds it has left (database clock)."""

    fence: int
    remaining: float


@dataclass(frozen=True)
class SingletonRow:
    """Who holds ``name``: ``remaining`` <= 0 means the lease has lapsed (free to take)."""

    name: str
    holder: str
    remaining: float
    fence: int


class SingletonStore(StoreBase):
    def _now(self) -> str:
        return _NOW["sqlite" if self._engine.dialect.name == "sqlite" else "postgresql"]

    async def hold_singleton(self, name: str, holder: str, *, ttl: float) -> Hold | None:
        """Take or extend the lease ``name`` for ``ttl`` seconds; None when another holder has it.

        Raises: StoreUnavailable.
        """
        stmt = text(_HOLD.format(now=self._now()))

        def run() -> Hold | None:
            with self._tx() as conn:
                row = conn.execute(stmt, {"name": name, "holder": holder, "ttl": float(ttl)}).first()
            return None if row is None else Hold(fence=int(row[0]), remaining=float(row[1]))
        return await self._run(run)

    async def release_singleton(self, name: str, holder: str) -> None:
        """Give the lease up now (a clean stop), so that another replica need not wait for it to lapse."""
        def run() -> None:
            with self._tx() as conn:
                conn.execute(text(_RELEASE), {"name": name, "holder": holder})
        await self._run(run)

    async def singletons(self) -> list[SingletonRow]:
        """Every lease row, held or lapsed."""
        stmt = text(_LIST.format(now=self._now()))

        def run() -> list[SingletonRow]:
            with self._read() as conn:
                return [SingletonRow(str(r[0]), str(r[1]), float(r[2]), int(r[3])) for r in conn.execute(stmt)]
        return await self._run(run)
