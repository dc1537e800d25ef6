"""utils/base/interrupt.py: "run until stopped" and "sleep unless woken", in-process."""

from __future__ import annotations

import asyncio

import pytest

from utils.base.interrupt import Interrupted, done_unless_set, set_within, until_set


async def test_work_that_finishes_first_returns_its_result() -> None:
    assert await until_set(asyncio.Event(), asyncio.sleep(0, result=7)) == 7


async def test_a_set_event_cancels_the_work_and_waits_for_it() -> None:
    stop, cleaned = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    task = asyncio.ensure_future(work())
    asyncio.get_running_loop().call_later(0.01, stop.set)
    with pytest.raises(Interrupted):
        await until_set(stop, task)
    assert task.cancelled() and cleaned.is_set(), "nothing of the work runs on"


async def test_work_already_done_wins_over_a_set_event() -> None:
    stop = asyncio.Event()
    stop.set()
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    done.set_result("acquired")
    assert await until_set(stop, done) == "acquired", "a result already there is never thrown away"


async def test_cancelling_the_caller_cancels_the_work() -> None:
    task = asyncio.ensure_future(asyncio.Event().wait())
    caller = asyncio.ensure_future(until_set(asyncio.Event(), task))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.sleep(0)
    assert task.cancelled()


async def test_done_unless_set_cancels_nothing() -> None:
    stop = asyncio.Event()
    task = asyncio.ensure_future(asyncio.sleep(0.05, result=1))
    asyncio.get_running_loop().call_later(0.01, stop.set)
    assert await done_unless_set(stop, task) is False
    assert not task.cancelled() and await task == 1


async def test_set_within_wakes_early_or_times_out() -> None:
    event = asyncio.Event()
    assert await set_within(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await asyncio.wait_for(set_within(event, 60), 5) is True
