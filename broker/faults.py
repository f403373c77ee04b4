"""Named crash points for the crash-consistency tests. Inert unless the operator of a test build asks.

``cli`` builds the hook from ``BROKER_CRASH_POINTS`` (``point=probability,...``); production code only
calls ``crash("name")``, which by default does nothing. A crash is ``SIGKILL`` to the broker's own
process: no ``finally`` block, no flush, exactly what a power cut or the OOM killer does.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable, Mapping

CrashHook = Callable[[str], None]

POINTS = (
    "task.after_intent", "task.after_token", "task.after_record",
    "issue.after_token", "issue.after_intent", "issue.after_vault", "issue.after_record",
    "end.after_fence",
)


def no_crash(point: str) -> None:
    """The default: never crash."""


def crash_hook(spec: str, *, rng: random.Random | None = None) -> CrashHook:
    """A hook that SIGKILLs this process at ``point`` with the given probability.

    Raises:
        ValueError: an unknown point or a probability outside [0, 1].
    """
    chances: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        point, _, chance = part.partition("=")
        if point not in POINTS:
            raise ValueError(f"unknown crash point {point!r}; known: {', '.join(POINTS)}")
        p = float(chance or "1")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"crash probability for {point} must be in [0, 1]")
        chances[point] = p
    r = rng or random.Random()  # noqa: S311 -- test-only fault injection

    def hook(point: str) -> None:
        if r.random() < chances.get(point, 0.0):
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def from_environ(environ: Mapping[str, str]) -> CrashHook:
    spec = environ.get("BROKER_CRASH_POINTS", "")
    return crash_hook(spec) if spec else no_crash
