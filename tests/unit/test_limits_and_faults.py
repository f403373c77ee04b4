"""Token-bucket rate limits and the crash-point hook."""

from __future__ import annotations

import random

import pytest

from broker.errors import RateLimited
from broker.faults import POINTS, crash_hook, no_crash


class TestRateLimiter:
    def test_burst_then_refill(self) -> None:
        """A burst of 3 passes, the 4th waits for one token (1/rate seconds), then passes."""
        from broker.limits import RateLimiter

        now = [0.0]
        rl = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
        for _ in range(3):
            rl.take("a", what="agent")
        with pytest.raises(RateLimited) as info:
            rl.take("a", what="agent")
        assert info.value.retry_after == 1 and info.value.http_status == 429
        now[0] = 0.5
        rl.take("a", what="agent")

    def test_identities_are_independent(self) -> None:
        """One identity's flood does not spend another's tokens."""
        from broker.limits import RateLimiter

        rl = RateLimiter(rate=1.0, burst=1, clock=lambda: 0.0)
        rl.take("flooder", what="agent")
        with pytest.raises(RateLimited):
            rl.take("flooder", what="agent")
        rl.take("neighbour", what="agent")

    def test_memory_is_bounded(self) -> None:
        """Past max_keys the oldest bucket goes."""
        from broker.limits import RateLimiter

        rl = RateLimiter(rate=1.0, burst=1, clock=lambda: 0.0, max_keys=10)
        for i in range(100):
            rl.take(f"id-{i}", what="agent")
        assert len(rl._buckets) == 10


class TestCrashHook:
    def test_default_never_crashes(self) -> None:
        """The production hook is inert."""
        for point in POINTS:
            no_crash(point)

    @pytest.mark.parametrize("spec", ["nowhere=1", "issue.after_vault=2", "issue.after_vault=-0.1"])
    def test_bad_specs_are_refused(self, spec: str) -> None:
        """Unknown points and probabilities outside [0, 1] are errors, not silently ignored."""
        with pytest.raises(ValueError):
            crash_hook(spec)

    def test_zero_probability_and_other_points_do_nothing(self) -> None:
        """A point at probability 0, or a point not named, never fires."""
        hook = crash_hook("issue.after_vault=0", rng=random.Random(1))
        for point in POINTS:
            hook(point)
