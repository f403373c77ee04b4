"""People and operators' revocations: locks that hold a person whatever their next token says."""

from __future__ import annotations

from sqlalchemy import (
    select,
    update,
)

from broker.audit import AuditRecord
from broker.rows import (
    Person,
    RevocationRow,
)
from broker.store._base import StoreBase
from broker.store.schema import (
    person_emails,
    revocations,
)
from broker.store.statements import (
    _append,
    _check_locks,
    _is_remembered,
    _persons_sharing_email,
    _remember_person,
)


class PeopleStore(StoreBase):
    async def check_unlocked(self, person: Person, *, now: float) -> None:
        """Refuse a locked person (staff too: an offboarded operator or auditor acts no more).

        Raises:
            Locked: an operator's lock covers ``person`` (by id, by an address they claim or claimed).
        """
        def run() -> None:
            # A look, as every staff request makes one; the address is written only the first time it is
            # seen (and before a lock is reported, so a refused person is remembered too).
            with self._read() as conn:
                known = _is_remembered(conn, person)
            if not known:
                with self._tx() as tx:
                    _remember_person(tx, person, now)
            with self._read() as conn:
                _check_locks(conn, user=person.id, email=person.email, agent="", tenant="")
        await self._run(run)

    async def same_person(self, person: Person, other: str, *, now: float) -> bool:
        """Whether ``person`` may be the person recorded as ``other``: the same id, or an address shared now
        or before. For rules that refuse on a match (self-approval), so it leans to "the same"."""
        def run() -> bool:
            if person.id == other:
                return True
            with self._read() as conn:
                known = _is_remembered(conn, person)
            if not known:
                with self._tx() as tx:
                    _remember_person(tx, person, now)
            with self._read() as conn:
                hit = conn.execute(_persons_sharing_email(person.id).where(person_emails.c.person == other)
                                   .limit(1)).first()
            return hit is not None
        return await self._run(run)

    async def get_revocation(self, revocation_id: str) -> RevocationRow | None:
        def run() -> RevocationRow | None:
            with self._read() as conn:
                r = conn.execute(select(revocations).where(revocations.c.id == revocation_id)).mappings().first()
            return RevocationRow(**r) if r is not None else None
        return await self._run(run)

    async def list_revocations(self, *, active_only: bool) -> list[RevocationRow]:
        q = select(revocations).order_by(revocations.c.created_at)
        if active_only:
            q = q.where(revocations.c.lock.is_(True))

        def run() -> list[RevocationRow]:
            with self._read() as conn:
                return [RevocationRow(**r) for r in conn.execute(q).mappings()]
        return await self._run(run)

    async def lift_lock(self, revocation_id: str, *, by: str, by_name: str, now: float, record: AuditRecord) -> bool:
        def run() -> bool:
            with self._tx() as conn:
                res = conn.execute(update(revocations)
                                   .where(revocations.c.id == revocation_id, revocations.c.lock.is_(True))
                                   .values(lock=False, lifted_at=now, lifted_by=by, lifted_by_name=by_name))
                if res.rowcount != 1:
                    return False
                _append(conn, record)
            return True
        return await self._run(run)
