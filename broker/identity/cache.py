"""A bounded cache of tokens that already verified, so an agent reusing its SVID costs one signature check.

Agents present the same JWT-SVID for minutes; an ES256 verification costs ~0.1-0.3 ms of CPU, the largest
share of the broker's own work per issuance. Rules this cache keeps:

* Only successes are cached; a token that failed is checked in full every time.
* An entry lives until the token's own ``exp`` or ``max_age`` seconds, whichever comes first, so a key
  removed from a JWKS URL stops being honoured within ``max_age`` (default 60 s).
* Keys are BLAKE2b digests: the cache never holds a bearer token.
* Bounded: past ``max_entries`` the oldest entry goes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar


class _Expiring(Protocol):
    @property
    def expires_at(self) -> float: ...


T = TypeVar("T", bound=_Expiring)


class VerifiedTokenCache(Generic[T]):
    def __init__(self, verify: Callable[[str], Awaitable[T]], *, clock: Callable[[], float] = time.time,
                 max_age: float = 60.0, max_entries: int = 10_000) -> None:
        self._verify = verify
        self._clock = clock
        self._max_age = max_age
        self._max_entries = max_entries
        self._entries: dict[bytes, tuple[float, T]] = {}

    async def verify(self, token: str) -> T:
        """Raises: whatever the wrapped verifier raises (``InvalidIdentity``)."""
        key = hashlib.blake2b(token.encode(), digest_size=16).digest()
        now = self._clock()
        hit = self._entries.get(key)
        if hit is not None:
            if hit[0] > now:
                return hit[1]
            del self._entries[key]
        identity = await self._verify(token)
        if len(self._entries) >= self._max_entries:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = (min(identity.expires_at, now + self._max_age), identity)
        return identity

    def __len__(self) -> int:
        return len(self._entries)
