"""Group commit of webhook deliveries, in-process: concurrent deliveries share one transaction."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from utils.updates.group_commit import GroupCommit

#: A wait for a marker below fails after this instead of hanging.
MARKER_TIMEOUT = 5.0


async def until(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until *predicate* holds (fails after MARKER_TIMEOUT)."""

    async def spin() -> None:
        while not predicate():
            await asyncio.sleep(0)

    await asyncio.wait_for(spin(), MARKER_TIMEOUT)


class Writer:
    """Records each batch; a batch waits for *gate* so that deliveries pile up behind it."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.stored: set[int] = set()
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def write(self, items: Sequence[int]) -> list[bool]:
        self.batches.append(list(items))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        new = []
        for item in items:
            new.append(item not in self.stored)
            self.stored.add(item)
        return new


async def test_a_lone_delivery_is_written_at_once() -> None:
    writer = Writer()
    commits = GroupCommit(writer.write)
    assert await commits.submit(1) is True
    assert await commits.submit(1) is False, "already stored: a re-delivery"
    assert writer.batches == [[1], [1]]


async def test_deliveries_arriving_during_a_write_share_the_next_transaction() -> None:
    writer = Writer()
    commits = GroupCommit(writer.write, max_batch=3)
    writer.gate.clear()
    first = asyncio.create_task(commits.submit(0))
    await until(lambda: writer.batches == [[0]])  # the writer took the first batch, waits on the gate
    rest = [asyncio.create_task(commits.submit(i)) for i in range(1, 6)]
    await until(lambda: commits.queued == 5)  # every later delivery queued behind it
    writer.gate.set()
    assert await asyncio.gather(first, *rest) == [True] * 6
    assert writer.batches == [[0], [1, 2, 3], [4, 5]], "in arrival order, at most max_batch each"
    assert commits.batches == 3


async def test_a_failed_transaction_fails_every_delivery_of_it_and_the_next_batch_runs() -> None:
    writer = Writer()
    commits = GroupCommit(writer.write)
    writer.gate.clear()
    writer.fail = OSError("database is locked")
    batch = [asyncio.create_task(commits.submit(i)) for i in range(3)]
    await until(lambda: bool(writer.batches))
    writer.gate.set()
    results = await asyncio.gather(*batch, return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results), results
    writer.fail = None
    assert await commits.submit(7) is True, "the writer recovers for the next delivery"


async def test_a_delivery_that_gives_up_does_not_stop_its_batch() -> None:
    writer = Writer()
    commits = GroupCommit(writer.write)
    writer.gate.clear()
    impatient = asyncio.create_task(commits.submit(1))
    patient = asyncio.create_task(commits.submit(2))
    await until(lambda: bool(writer.batches))  # both in the batch being written
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    writer.gate.set()
    assert await patient is True
    assert writer.stored == {1, 2}, "the given-up delivery is stored anyway (Telegram's retry is then a duplicate)"
