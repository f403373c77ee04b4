"""Issuance rate limits: token buckets per agent and per user. Pure, with an injected clock.

Checked before any other work on the issuance path, so a flooding identity is turned away for the
cost of a dictionary lookup. Per replica: with N replicas an identity gets at most N times its rate,
which bounds a runaway agent well enough; the live-lease budget, checked in the store, is global.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from broker.errors import RateLimited


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    def __init__(self, *, rate: float, burst: int, clock: Callable[[], float], max_keys: int = 100_000) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, *, what: str) -> None:
        """Spend one token of ``key``'s bucket.

        Raises:
            RateLimited: the bucket is empty; ``retry_after`` says when one token is back.
        """
        now = self._clock()
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self._max_keys:
                self._buckets.pop(next(iter(self._buckets)))
            b = self._buckets[key] = _Bucket(self._burst, now)
        b.tokens = min(self._burst, b.tokens + (now - b.at) * self._rate)
        b.at = now
        if b.tokens < 1.0:
            wait = (1.0 - b.tokens) / self._rate
            msg = f"too many credential requests for this {what}"
            raise RateLimited(msg, reason=f"{what} {key} over {self._rate:g}/s", retry_after=max(1, math.ceil(wait)))
        b.tokens -= 1.0
