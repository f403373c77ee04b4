"""Stopping background work (broker.background.stop): a lost cancellation must not hang a shutdown.

CI hung for 300 s in an application's cleanup once: a background loop lost its cancel (Python 3.11's
``wait_for`` drops one that races its inner result, gh-86296) and ran on. These tests lose cancels on
purpose and check that the work still stops, and that a stopper's own cancellation is never swallowed.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from broker.background import stop
from broker.singletons import Singleton
from broker.store import open_store


async def _swallows(times: int, log: list[str]) -> None:
    """A loop that ignores its first ``times`` cancellations, as a lost cancel would make it."""
    ignored = 0
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if ignored == times:
                log.append("stopped")
                raise
            ignored += 1
            log.append("ignored")


class TestStop:
    async def test_a_task_that_loses_cancellations_is_cancelled_until_it_stops(self) -> None:
        log: list[str] = []
        task = asyncio.create_task(_swallows(2, log))
        await asyncio.sleep(0.02)
        await asyncio.wait_for(stop(task, every=0.05), timeout=5)
        assert task.cancelled() and log == ["ignored", "ignored", "stopped"]

    async def test_the_stoppers_own_cancellation_propagates(self) -> None:
        log: list[str] = []
        work = asyncio.create_task(_swallows(20, log))
        stopper = asyncio.create_task(stop(work, every=0.05))
        await asyncio.sleep(0.12)
        stopper.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopper
        assert not work.done() and "ignored" in log
        await stop(work, every=0.001)
        assert work.cancelled()

    async def test_a_task_that_never_stops_is_left_after_the_patience(self, caplog: pytest.LogCaptureFixture
                                                                     ) -> None:
        log: list[str] = []
        work = asyncio.create_task(_swallows(30, log), name="stubborn")
        with caplog.at_level(logging.ERROR, logger="broker.background"):
            await asyncio.wait_for(stop(work, every=0.01, patience=0.05), timeout=5)
        assert not work.done() and "stubborn did not stop" in caplog.text
        await stop(work, every=0.001)  # it gives in after its 30 (so the test's loop can close)
        assert work.cancelled()

    async def test_a_failure_is_logged_not_raised_into_the_shutdown(self, caplog: pytest.LogCaptureFixture
                                                                    ) -> None:
        async def fails() -> None:
            await asyncio.sleep(0)
            msg = "boom"
            raise RuntimeError(msg)

        task = asyncio.create_task(fails(), name="exporter")
        await asyncio.sleep(0.01)
        with caplog.at_level(logging.ERROR, logger="broker.background"):
            await stop(task)
        assert "background task exporter failed" in caplog.text


class TestSingletonStops:
    async def test_cancelled_while_stopping_its_work_the_singleton_still_ends(self, tmp_path: Path) -> None:
        """The lease is lost, the singleton stops its slow-to-stop work, and it is cancelled meanwhile.

        The old ``suppress(CancelledError)`` around awaiting the work swallowed that cancel too, and the
        singleton's loop went on after the application had closed.
        """
        store = await open_store(f"sqlite:///{tmp_path / 'broker.db'}")
        stopping = asyncio.Event()

        async def work() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                stopping.set()
                await asyncio.shield(asyncio.sleep(0.3))  # takes its time to stop, ignoring a re-cancel

        try:
            single = Singleton("maintenance", work, store=store, holder="a", lease=0.6, renew_every=0.2)
            runner = asyncio.create_task(single.run_forever())
            for _ in range(50):
                if single.state.held:
                    break
                await asyncio.sleep(0.02)
            assert single.state.held
            await store.release_singleton("maintenance", "a")
            assert await store.hold_singleton("maintenance", "b", ttl=60) is not None  # taken: "a" must stop
            await asyncio.wait_for(stopping.wait(), timeout=5)
            runner.cancel()  # arrives while the singleton awaits its work's end
            done, _ = await asyncio.wait({runner}, timeout=5)
            assert runner in done and runner.cancelled()
        finally:
            await store.close()
