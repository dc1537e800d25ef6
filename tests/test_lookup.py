"""BoundedLookup in-process: the caller's wait is bounded however long the call hangs (a silent
server), and a stuck call is never started twice."""

from __future__ import annotations

import asyncio

import pytest

from utils.base.lookup import BoundedLookup

LIMIT = 0.05


class Stuck:
    """A call that hangs until released (a query to a silent server)."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def fetch(self) -> str:
        self.calls += 1
        await self.release.wait()
        return f"answer {self.calls}"


async def test_the_wait_is_bounded_and_a_stuck_call_runs_once() -> None:
    slow = Stuck()
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
