"""Work that an event interrupts: "run until stopped" and "sleep unless woken", defined once.

asyncio has ``timeout`` for a deadline but nothing for an event (a stop request, a step-down, a
socket that stirred), so each loop that must give up when one fires used to race its work against
``event.wait()`` with ``asyncio.wait(..., FIRST_COMPLETED)`` by hand. These three say it once:

* :func:`until_set` runs *work* unless *event* is set first; then the work is cancelled (and its
  cancellation awaited, so nothing of it runs on) and :class:`Interrupted` is raised. Work that
  finishes in the same instant wins: a result is never thrown away when it is already there.
* :func:`done_unless_set` waits for a task or the event, whichever comes first, and cancels
  nothing: for work that decides itself what a stop means for it (a post already on the wire
  finishes; one still waiting for its send slot goes back to the queue).
* :func:`set_within` sleeps up to *seconds*, returning early (True) when *event* is set: the
  retry pause that a stop cuts short.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class Interrupted(Exception):
    """The event was set before the work finished; the work was cancelled."""


async def until_set(event: asyncio.Event, work: Awaitable[T]) -> T:
    """*work*'s result, or :class:`Interrupted` once *event* is set (the work is cancelled).

    Pass a task to inspect it afterwards (e.g. a lock acquired in the instant of the stop). If
    the caller itself is cancelled, the work is cancelled with it: it never runs on unowned.
    """
    task = asyncio.ensure_future(work)
    try:
        if await done_unless_set(event, task):
            return task.result()
    except BaseException:
        task.cancel()
        raise
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise Interrupted


async def done_unless_set(event: asyncio.Event, task: asyncio.Future[Any]) -> bool:
    """Wait until *task* is done (True) or *event* is set (False); nothing is cancelled."""
    if task.done():
        return True
    waiter: asyncio.Future[Any] = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    return task.done()


async def set_within(event: asyncio.Event, seconds: float) -> bool:
    """Sleep up to *seconds*; True (at once) if *event* is or becomes set meanwhile."""
    if event.is_set():
        return True
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True
