"""Group commit for webhook deliveries: concurrent deliveries share one inbox transaction.

Telegram delivers up to ``max_connections`` (40) updates at once, one per chat. Stored one
transaction each, they queue on the database's write lock (SQLite has one per file, shared by
every replica on the host, and its busy handler sleeps between retries): the commit, not the work,
sets the pace. Here a delivery joins the batch being collected; one writer stores the whole batch
in one transaction and answers every delivery of it (new or already stored) once it committed.
No timer: a batch is whatever arrived while the previous one was being written, so a lone
delivery is written at once and a burst is written in a few large transactions.

A batch refused for the data of one of its items (*is_item_error*: a value no column can hold) is
written again item by item, so that only the culprit fails: a delivery that cannot be stored must
not fail the others that shared its transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger("solobot.webhook")

#: At most this many deliveries per transaction (a burst is written in several).
MAX_BATCH = 200

T = TypeVar("T")

#: Writes a batch in one transaction; for each item, in order, whether it was new.
WriteBatch = Callable[[Sequence[T]], Awaitable[Sequence[bool]]]


class GroupCommit(Generic[T]):
    """Writes items through *write* (one transaction per call), batching concurrent ones."""

    def __init__(self, write: WriteBatch[T], *, max_batch: int = MAX_BATCH, name: str = "webhook delivery",
                 is_item_error: Callable[[Exception], bool] = lambda _exc: False) -> None:
        self._write_batch = write
        self._is_item_error = is_item_error
        self._max_batch = max_batch
        self.name = name  # what the items are, for the log
        self._waiting: list[tuple[T, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0  # transactions written (for tests and the curious)

    @property
    def queued(self) -> int:
        """Deliveries waiting for the next transaction (not the one being written)."""
        return len(self._waiting)

    async def submit(self, item: T) -> bool:
        """Write *item* durably; True if it is new, False if the inbox had it. Raises what the
        transaction raised (every delivery of a failed batch fails: Telegram delivers it again)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)  # a delivery that gave up must not leave it unretrieved
        self._waiting.append((item, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name=f"solobot-commit-{self.name}")
        # The delivery may give up (its request timed out); the batch is written regardless.
        return await asyncio.shield(future)

    async def _write(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[: self._max_batch], self._waiting[self._max_batch:]
            started = time.monotonic()
            try:
                new = await self._write_batch([item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - handed to every delivery of the batch
                if len(batch) > 1 and self._is_item_error(exc):
                    await self._write_one_by_one(batch)
                    continue
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), is_new in zip(batch, new, strict=True):
                if not future.done():
                    future.set_result(is_new)
            self.batches += 1
            log.debug("%s: stored %d in one transaction in %.1f ms (%d new)",
                      self.name, len(batch), (time.monotonic() - started) * 1000, sum(new))

    async def _write_one_by_one(self, batch: list[tuple[T, asyncio.Future[bool]]]) -> None:
        """Each item in its own transaction: the one the database refuses fails alone."""
        log.debug("%s: a batch of %d was refused for an item's data; writing them one by one", self.name, len(batch))
        for item, future in batch:
            try:
                new = await self._write_batch([item])
            except Exception as exc:  # noqa: BLE001 - this item's own failure
                if not future.done():
                    future.set_exception(exc)
                continue
            self.batches += 1
            if not future.done():
                future.set_result(new[0])


def _retrieve(future: asyncio.Future[bool]) -> None:
    if not future.cancelled():
        future.exception()
