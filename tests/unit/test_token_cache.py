"""The verified-token cache in front of the SVID verifier."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from broker.errors import InvalidIdentity
from broker.identity.cache import VerifiedTokenCache


@dataclass(frozen=True)
class Ident:
    name: str
    expires_at: float


class Counting:
    def __init__(self, expires_at: float = 1000.0) -> None:
        self.calls = 0
        self.expires_at = expires_at

    async def __call__(self, token: str) -> Ident:
        self.calls += 1
        if token.startswith("bad"):
            raise InvalidIdentity("bad signature")
        return Ident(token, self.expires_at)


class TestVerifiedTokenCache:
    async def test_second_use_is_not_verified_again(self) -> None:
        """The same token within its life costs one verification."""
        inner, now = Counting(), [0.0]
        cache = VerifiedTokenCache(inner, clock=lambda: now[0])
        assert (await cache.verify("tok")).name == "tok"
        assert (await cache.verify("tok")).name == "tok"
        assert inner.calls == 1

    async def test_failures_are_never_cached(self) -> None:
        """A token that failed is verified (and fails) every time."""
        inner = Counting()
        cache = VerifiedTokenCache(inner, clock=lambda: 0.0)
        for _ in range(3):
            with pytest.raises(InvalidIdentity):
                await cache.verify("bad-token")
        assert inner.calls == 3 and len(cache) == 0

    @pytest.mark.parametrize(("exp", "later", "calls"), [(10.0, 9.9, 1), (10.0, 10.0, 2), (1000.0, 60.0, 2),
                                                         (1000.0, 59.0, 1)])
    def test_entries_end_at_exp_or_max_age(self, exp: float, later: float, calls: int) -> None:
        """An entry ends at the token's exp or after max_age (60 s), whichever is first."""
        import asyncio

        inner, now = Counting(expires_at=exp), [0.0]
        cache = VerifiedTokenCache(inner, clock=lambda: now[0])
        asyncio.run(cache.verify("tok"))
        now[0] = later
        asyncio.run(cache.verify("tok"))
        assert inner.calls == calls

    async def test_bounded_and_holds_no_token(self) -> None:
        """Past max_entries the oldest goes; the cache's keys are digests, not tokens."""
        cache = VerifiedTokenCache(Counting(), clock=lambda: 0.0, max_entries=3)
        for i in range(5):
            await cache.verify(f"token-{i}")
        assert len(cache) == 3
        assert not any(b"token-" in key for key in cache._entries)
