"""The bookkeeping of the update pipeline, pure: no I/O, no clock, no asyncio.

* :class:`ChatQueues` - which update may run next: one at a time per chat, in arrival order;
  chats concurrently up to a limit; round robin between chats so a busy chat cannot starve the
  others; a stuck handler holds only its own chat.
* :class:`OffsetBook` - the offset of the next getUpdates, and a restarted id sequence noticed.
* :class:`DoneMarks` - finished updates waiting for their group commit.

The async parts (``utils.updates.pipeline``, ``utils.updates.polling``) only follow what these say,
so the cases that matter (out-of-order finishes, cancellation at drain, saturation, id restart,
inbox full) are unit-tested in milliseconds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class QueuedUpdate:
    """One update this leader holds: waiting or running."""

    seq: int  # inbox order
    update_id: int
    chat_key: str | None  # None: no chat and no user; runs on its own
    attempt: int
    payload: str  # JSON, parsed only when it runs
    update: Any = None  # the parsed aiogram Update when the fetcher already has it
    started: float | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        return self.chat_key if self.chat_key is not None else f"#{self.seq}"


class ChatQueues:
    """Per-chat order, cross-chat concurrency, bounded."""

    def __init__(self, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self._queues: dict[str, deque[QueuedUpdate]] = {}
        self._ready: deque[str] = deque()  # chats with waiting updates and nothing running
        self._running: dict[int, QueuedUpdate] = {}  # seq -> update
        self._running_keys: set[str] = set()
        self._known: set[int] = set()
        self._parked: set[int] = set()  # running, but waiting for a send slot: not counted

    # -- reading -----------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._known) - len(self._running)

    @property
    def held(self) -> int:
        """Updates this leader holds and has not finished: what counts against ``INBOX_MAX``."""
        return len(self._known)

    def knows(self, seq: int) -> bool:
        return seq in self._known

    def running_updates(self) -> list[QueuedUpdate]:
        return list(self._running.values())

    # -- changing ----------------------------------------------------------------------------

    def push(self, item: QueuedUpdate) -> bool:
        """Queue *item* behind its chat's earlier updates; False if it is already held."""
        if item.seq in self._known:
            return False
        self._known.add(item.seq)
        key = item.key
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(item)
        if key not in self._running_keys and len(queue) == 1:
            self._ready.append(key)
        return True

    def extend(self, items: Iterable[QueuedUpdate]) -> int:
        return sum(1 for item in items if self.push(item))

    def take_runnable(self) -> list[QueuedUpdate]:
        """The updates to start now (at most one per chat, the total within the limit)."""
        out: list[QueuedUpdate] = []
        while self._ready and len(self._running) - len(self._parked) < self.concurrency:
            key = self._ready.popleft()
            item = self._queues[key].popleft()
            self._running[item.seq] = item
            self._running_keys.add(key)
            out.append(item)
        return out

    def park(self, item: QueuedUpdate, waiting: bool) -> None:
        """*item*'s handler waits (or stopped waiting) for a send slot of the flood limiter.

        A parked handler does not count against the concurrency: it holds its chat (order), not
        a slot other chats could use. Back from waiting it runs on, even above the limit.
        """
        if item.seq not in self._running:
            return
        if waiting:
            self._parked.add(item.seq)
        else:
            self._parked.discard(item.seq)

    def finish(self, item: QueuedUpdate) -> None:
        """*item* is over (done, or abandoned at stop): its chat's next update may run."""
        if self._running.pop(item.seq, None) is None:
            raise KeyError(f"update seq {item.seq} is not running")
        self._parked.discard(item.seq)
        self._known.discard(item.seq)
        key = item.key
        self._running_keys.discard(key)
        queue = self._queues[key]
        if queue:
            self._ready.append(key)  # behind the chats already waiting: round robin
        else:
            del self._queues[key]

    def drop_waiting(self) -> list[QueuedUpdate]:
        """Forget every update not started (stop): they stay waiting in the inbox."""
        dropped = [item for key, queue in self._queues.items() for item in queue]
        for item in dropped:
            self._known.discard(item.seq)
        self._queues = {k: deque() for k in self._running_keys}
        self._ready.clear()
        return dropped


class OffsetBook:
    """The ``offset`` of the next getUpdates.

    The offset confirms every update below it, so it moves only once a batch is durable. Update
    ids are per Bot API server and restart at a random value after a week without updates; the
    real server treats an offset beyond its queue's tail as invalid and serves from its head. A
    batch whose ids are below the offset we sent is therefore a restarted sequence: follow it.
    """

    def __init__(self, stored: int | None) -> None:
        self.offset = stored

    def after_batch(self, sent: int | None, update_ids: Sequence[int]) -> bool:
        """Advance past *update_ids* (returned for offset *sent*); True if the ids restarted."""
        if not update_ids:
            return False
        restarted = sent is not None and min(update_ids) < sent
        newest = max(update_ids)
        if restarted or self.offset is None or newest + 1 > self.offset:
            self.offset = newest + 1
        return restarted


class DoneMarks:
    """Finished updates awaiting one group commit: flush at *max_batch* or after *max_delay*."""

    def __init__(self, *, max_batch: int, max_delay: float) -> None:
        self.max_batch = max_batch
        self.max_delay = max_delay
        self._seqs: list[int] = []
        self._first_at: float | None = None

    def __len__(self) -> int:
        return len(self._seqs)

    def add(self, seq: int, now: float) -> None:
        if not self._seqs:
            self._first_at = now
        self._seqs.append(seq)

    def due_in(self, now: float) -> float | None:
        """Seconds until a flush is due (0: now); None when there is nothing to flush."""
        if not self._seqs or self._first_at is None:
            return None
        if len(self._seqs) >= self.max_batch:
            return 0.0
        return max(0.0, self._first_at + self.max_delay - now)

    def oldest_age(self, now: float) -> float | None:
        return None if self._first_at is None else now - self._first_at

    def take(self) -> list[int]:
        seqs, self._seqs, self._first_at = self._seqs, [], None
        return seqs

    def put_back(self, seqs: Sequence[int], now: float) -> None:
        """A flush failed: keep them for the next one."""
        if seqs:
            self._seqs[:0] = list(seqs)
            self._first_at = now if self._first_at is None else min(self._first_at, now)
