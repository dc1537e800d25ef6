"""BoundedLookup, within and cancel_within in-process: the caller's wait is bounded however long
the call hangs (a silent server) or takes to unwind when cancelled (psycopg asking the silent
server to cancel), and a stuck call is never started twice."""

from __future__ import annotations

import asyncio

import pytest

from utils.base.lookup import BoundedLookup, cancel_within, within

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


class SlowToCancel:
    """A query on a silent server: it hangs, and once cancelled takes *unwind* seconds to end
    (psycopg's cancellation request, unanswered), then ends cancelled."""

    def __init__(self, unwind: float) -> None:
        self.unwind = unwind
        self.ended = asyncio.Event()

    async def query(self) -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(self.unwind)
            self.ended.set()
            raise
        return "never"


async def test_within_does_not_wait_for_the_cancellation() -> None:
    slow = SlowToCancel(unwind=3.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError, match=r"the query: no answer within 0\.05 s"):
        await within(slow.query(), LIMIT, name="the query")
    assert loop.time() - started < 1.0, "asyncio.wait_for would take 3 s here"
    assert not slow.ended.is_set(), "the overrun query unwinds alone"
    assert await within(asyncio.sleep(0, "fast"), LIMIT, name="x") == "fast"


async def test_cancel_within_bounds_the_unwinding() -> None:
    loop = asyncio.get_running_loop()
    stuck = asyncio.ensure_future(SlowToCancel(unwind=3.0).query())
    await asyncio.sleep(0)
    started = loop.time()
    assert await cancel_within(stuck, LIMIT) is False
    assert loop.time() - started < 1.0
    quick = asyncio.ensure_future(SlowToCancel(unwind=0.0).query())
    await asyncio.sleep(0)
    assert await cancel_within(quick, 1.0) is True
    assert quick.cancelled()
    stuck.cancel()  # nothing left running after the test
    await asyncio.gather(stuck, return_exceptions=True)
