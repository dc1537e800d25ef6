"""BoundedLookup in-process: the caller's wait is bounded even when the call cannot be cancelled
quickly (psycopg asking a silent server to cancel), and a stuck call is never started twice."""

from __future__ import annotations

import asyncio

import pytest

from utils.ops.lookup import BoundedLookup

LIMIT = 0.05


class SlowToCancel:
    """A call that hangs, and once cancelled still takes *cancel_takes* to give up (as psycopg's
    cancel request to a silent server does)."""

    def __init__(self, cancel_takes: float) -> None:
        self.cancel_takes = cancel_takes
        self.calls = 0
        self.release = asyncio.Event()

    async def fetch(self) -> str:
        self.calls += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            await asyncio.sleep(self.cancel_takes)
            raise
        return f"answer {self.calls}"


async def test_the_wait_is_bounded_and_a_stuck_call_runs_once() -> None:
    slow = SlowToCancel(cancel_takes=30.0)
    lookup = BoundedLookup(slow.fetch, LIMIT)
    loop = asyncio.get_running_loop()
    for _ in range(3):
        started = loop.time()
        with pytest.raises(TimeoutError):
            await lookup()
        assert loop.time() - started < LIMIT + 1.0, "waited for more than the limit"
    assert slow.calls == 1, "a stuck lookup is not started again"
    slow.release.set()  # the call finally answers: the next caller gets it, then fresh ones
    assert await lookup() == "answer 1"
    slow.release = asyncio.Event()
    slow.release.set()
    assert await lookup() == "answer 2"


async def test_errors_reach_the_caller() -> None:
    async def broken() -> str:
        raise OSError("connection refused")

    with pytest.raises(OSError, match="refused"):
        await BoundedLookup(broken, LIMIT)()
