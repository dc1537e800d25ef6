"""A lookup that answers within its time limit, whatever the database does.

Why not ``asyncio.wait_for``: on timeout it cancels the call and then *waits for the cancellation
to finish*. psycopg answers a cancellation by asking the server to cancel the running query, and
a server that went silent (a frozen VM, a black-holed network) lets that wait for seconds: the
first /health after PostgreSQL went silent took 10 s. Here the caller waits at most the limit;
a call that overruns goes on in the background, alone (a stuck lookup is never started twice),
and its outcome is simply not awaited by anyone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class BoundedLookup(Generic[T]):
    """``await lookup()``: *fetch*'s result within *timeout* seconds, else :class:`TimeoutError`.

    One call at a time: while one is running, callers wait (up to the limit) for that one.
    """

    def __init__(self, fetch: Callable[[], Awaitable[T]], timeout: float, *, name: str = "lookup") -> None:
        self._fetch = fetch
        self.timeout = timeout
        self.name = name
        self._running: asyncio.Task[T] | None = None

    async def __call__(self) -> T:
        task = self._running
        if task is None or task.done():
            task = self._running = asyncio.ensure_future(self._fetch())
            task.add_done_callback(_retrieve)
        done, _ = await asyncio.wait({task}, timeout=self.timeout)
        if not done:
            raise TimeoutError(f"{self.name}: no answer within {self.timeout:g} s")
        return task.result()


async def within(call: Awaitable[T], timeout: float, what: str) -> T:
    """Await *call* for at most *timeout* seconds, else raise :class:`TimeoutError`.

    Unlike ``asyncio.wait_for``, an overrun call is cancelled *without waiting for the
    cancellation* (psycopg's cancel request to a silent server takes seconds): it ends in the
    background.
    """
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.add_done_callback(_retrieve)
        task.cancel()
        raise TimeoutError(f"{what}: no answer within {timeout:g} s")
    return task.result()


def _retrieve(task: asyncio.Task[T]) -> None:
    """Nobody may await an overrun call: mark its exception as seen."""
    if not task.cancelled():
        task.exception()
