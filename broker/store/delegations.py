"""IdP-issued delegation tokens, each accepted once: the insert that refuses a replay, and the purge."""

from __future__ import annotations

from sqlalchemy import bindparam, delete, insert
from sqlalchemy.exc import IntegrityError

from broker.store._base import StoreBase
from broker.store.schema import delegation_tokens

__all__ = ["DelegationStore"]

_ACCEPT = insert(delegation_tokens)
_PURGE = delete(delegation_tokens).where(delegation_tokens.c.expires_at < bindparam("now"))


class DelegationStore(StoreBase):
    async def accept_delegation(self, *, issuer: str, jti: str, expires_at: float, agent: str, now: float) -> bool:
        """Remember (``issuer``, ``jti``) until ``expires_at``; False if it was already accepted.

        The primary key decides, in one INSERT: of two requests (on one replica or two) racing with the
        same token, exactly one inserts the row; the other gets False.

        Raises:
            StoreUnavailable: the store cannot be written.
        """
        row = {"issuer": issuer, "jti": jti, "expires_at": expires_at, "accepted_at": now, "agent": agent}

        def run() -> bool:
            try:
                with self._tx() as conn:
                    conn.execute(_ACCEPT, row)
            except IntegrityError:
                return False
            return True
        return await self._run(run)

    async def purge_delegations(self, *, now: float) -> int:
        """Forget accepted tokens whose ``expires_at`` is before ``now``: they no longer verify, so their
        jti cannot come back. Rows live at most a token's lifetime (``max_token_lifetime``, 1 h by default),
        so one statement stays small."""
        def run() -> int:
            with self._tx() as conn:
                return int(conn.execute(_PURGE, {"now": now}).rowcount)
        return await self._run(run)
