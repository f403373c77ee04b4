"""Stopping a background task so that shutdown cannot hang on a cancellation that got lost.

One ``cancel()`` is not always enough on Python 3.11. ``asyncio.wait_for`` returns its inner result
and drops a cancellation that arrives just as the inner future completes (CPython gh-86296, fixed in
3.12), and the broker's loops call ``wait_for`` around store and Vault calls every tick. A lost cancel
left such a loop running, and the application's cleanup waited for it forever. ``stop`` cancels again
every ``every`` seconds until the task ends, so a lost cancellation costs one period, not the process.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["stop"]


async def stop(task: asyncio.Task[Any], *, every: float = 5.0, patience: float = 60.0) -> None:
    """Cancel ``task`` and wait until it ends, cancelling it again every ``every`` seconds.

    The caller's own cancellation propagates. A task that fails logs its exception here rather than
    raising it into a shutdown; one still running after ``patience`` seconds is left and logged.
    """
    loop = asyncio.get_running_loop()
    give_up = loop.time() + patience
    while not task.done():
        task.cancel()
        # asyncio.wait neither raises the task's exception nor cancels it when we are cancelled.
        await asyncio.wait({task}, timeout=max(0.0, min(every, give_up - loop.time())))
        if task.done():
            break
        if loop.time() >= give_up:
            log.error("background task %s did not stop within %.0f s of being cancelled",
                      task.get_name(), patience)
            return
        log.warning("background task %s is still running after a cancel; cancelling it again",
                    task.get_name())
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())
