"""A lookup that answers within its time limit, whatever the database does.

Why not ``asyncio.wait_for``: on timeout it cancels the call and then *waits for the cancellation
to finish*. psycopg answers a cancellation by asking the server to cancel the running query, and
a server that went silent (a frozen VM, a black-holed network) lets that wait for seconds: the
first /health after PostgreSQL went silent took 10 s. Here the caller waits at most the limit;
a call that overruns goes on in the background, alone (a stuck lookup is never started twice),
until the connection's TCP timeouts end it (keepalives and ``tcp_user_timeout`` on every
PostgreSQL connection); its outcome is simply not awaited by anyone.

The same hard bound for one-off work (:func:`within`) and for a task being stopped
(:func:`cancel_within`): a stop path that awaited a cancelled query on a silent server took
10 s per query, and a leader that had lost its lease took tens of seconds to step down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

#: What the status lookups (/health, /metrics, /status: holder, inbox depth, set-aside count,
#: pause flag) wait at most: they run concurrently, so a silent database costs a probe this long.
HEALTH_LOOKUP_TIMEOUT = 0.25


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
            task.add_done_callback(retrieve_quietly)
        done, _ = await asyncio.wait({task}, timeout=self.timeout)
        if not done:
            raise TimeoutError(f"{self.name}: no answer within {self.timeout:g} s")
        return task.result()

    async def or_reason(self) -> T | str:
        """The answer, or why there is none (the exception's type name): for /health, which must
        answer whatever the database does."""
        try:
            return await self()
        except Exception as exc:  # noqa: BLE001 - the reason is the answer
            return type(exc).__name__


def retrieve_quietly(task: asyncio.Future[T]) -> None:
    """A done-callback for a call nobody may await (it overran): mark its exception as seen."""
    if not task.cancelled():
        task.exception()


async def within(work: Awaitable[T], timeout: float, *, name: str) -> T:
    """*work*'s result within *timeout* seconds, else :class:`TimeoutError` at once.

    ``asyncio.wait_for`` without its wait for the cancellation: overrun work is cancelled and left
    to end alone (its outcome retrieved quietly). If the caller is cancelled, so is the work.
    """
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except BaseException:
        _abandon(task)
        raise
    if not done:
        _abandon(task)
        raise TimeoutError(f"{name}: no answer within {timeout:g} s")
    return task.result()


async def cancel_within(task: asyncio.Future[Any], grace: float) -> bool:
    """Cancel *task* and wait up to *grace* seconds for it to end: True if it did. One that does
    not (a query cancelled on a silent server) ends alone, its outcome retrieved quietly."""
    if task.done():
        return True
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=grace)
    if not done:
        task.add_done_callback(retrieve_quietly)
    return bool(done)


def _abandon(task: asyncio.Future[Any]) -> None:
    task.cancel()
    task.add_done_callback(retrieve_quietly)
