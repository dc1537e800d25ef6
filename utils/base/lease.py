"""The active term as one object: epoch, the last verification on a local clock, step-down.

A process can pause anywhere (SIGSTOP, a frozen VM, a long GC), so "I checked, then I acted"
guarantees nothing by itself. As in Chubby's leases and Kubernetes leader election's renew
deadline, every act for the leader - a getUpdates (each retry too), a post, any Bot API call, a
durable write - first asks :meth:`Lease.ensure`: it passes at once if the lock was verified less
than ``renew_deadline`` ago on this process's clock, and otherwise verifies again (one round trip)
or steps down. After a pause longer than the deadline the holder therefore re-verifies before
anything else.

Timing (docs/architecture.md has the argument in full): a verification also refreshes the
heartbeat, and a standby fences only a holder whose heartbeat is older than ``LOCK_STALE_SECONDS``
(S). The deadline is ``RENEW_FRACTION * S`` (half), counted from *before* the verification was
sent, so the last act allowed by a verification starts at least S/2 before any standby may fence.

The clock is ``CLOCK_BOOTTIME`` where there is one: unlike ``CLOCK_MONOTONIC`` it keeps counting
while the machine is suspended, so a resumed VM sees its lease as old as it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # aiogram only for the middleware's types: this module stays light to import
    from aiogram import Bot
    from aiogram.client.session.middlewares.base import NextRequestMiddlewareType
    from aiogram.methods import Response, TelegramMethod

log = logging.getLogger("solobot.lease")

#: The holder acts on a verification for at most this fraction of LOCK_STALE_SECONDS.
RENEW_FRACTION = 0.5


def lease_clock() -> float:
    """Seconds on a clock that never goes back and keeps counting through suspend."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # not Linux
        return time.monotonic()


class LeaseLost(Exception):
    """This instance may no longer act as the leader."""


Verify = Callable[[], Awaitable[bool]]
T = TypeVar("T")


class Lease:
    """One activation's term. Ended (voluntarily) or lost (involuntarily) exactly once."""

    def __init__(
        self,
        epoch: int,
        *,
        verify: Verify,
        renew_deadline: float,
        on_lost: Callable[[str], None] = lambda _reason: None,
        previous_released: bool = True,
        verified_at: float | None = None,
        clock: Callable[[], float] = lease_clock,
    ) -> None:
        self.epoch = epoch
        self.previous_released = previous_released
        self.renew_deadline = renew_deadline
        self._verify = verify
        self._on_lost = on_lost
        self._clock = clock
        self.verified_at = clock() if verified_at is None else verified_at
        self.lost: str | None = None
        self.ended = False
        self._renewal: asyncio.Task[bool] | None = None

    # -- reading -----------------------------------------------------------------------------

    @property
    def valid(self) -> bool:
        return self.lost is None and not self.ended

    def fresh(self) -> bool:
        """Verified recently enough to act without asking again."""
        return self.valid and self._clock() - self.verified_at < self.renew_deadline

    # -- acting ------------------------------------------------------------------------------

    async def ensure(self) -> None:
        """Return if this instance may act for the leader now; else raise :class:`LeaseLost`."""
        if self.fresh():
            return
        if not self.valid:
            raise LeaseLost(self.lost or "the active term ended")
        if not await self.renew() or not self.fresh():
            raise LeaseLost(self.lost or "the lease could not be verified in time")

    async def renew(self) -> bool:
        """Verify the lock (and refresh the heartbeat); concurrent callers share one round trip."""
        if not self.valid:
            return False
        if self._renewal is None or self._renewal.done():
            self._renewal = asyncio.ensure_future(self._verify_once())
        return await asyncio.shield(self._renewal)

    async def _verify_once(self) -> bool:
        started = self._clock()  # the proof dates from before the question was asked
        try:
            ok = await self._verify()
        except Exception as exc:  # noqa: BLE001 - cannot prove we lead: the lease is gone
            self.lose(f"lease verification failed ({type(exc).__name__}: {exc})")
            return False
        if not ok:
            self.lose("fenced: a newer leader holds the lock")
            return False
        if self.valid:
            self.verified_at = max(self.verified_at, started)
        return self.valid

    def lose(self, reason: str) -> None:
        """Involuntary end: the lock is no longer provably ours."""
        if self.lost is None and not self.ended:
            self.lost = reason
            log.warning("lease of epoch %d lost: %s", self.epoch, reason)
            self._on_lost(reason)

    def end(self) -> None:
        """Voluntary end, once the active work stopped: nothing may act on this term any more."""
        self.ended = True


class LeaseGate:
    """An aiogram request middleware: no Bot API call leaves this process without a valid lease.

    One choke point for getUpdates (every retry too), the autoposter's sends and every handler's
    replies. A passive instance has no lease, so it cannot call Telegram at all.
    """

    def __init__(self) -> None:
        self.lease: Lease | None = None

    async def check(self) -> None:
        """Return if a call for the leader may go out now; else raise :class:`LeaseLost`."""
        lease = self.lease
        if lease is None:
            raise LeaseLost("not the active instance")
        await lease.ensure()

    async def __call__(
        self, make_request: NextRequestMiddlewareType[T], bot: Bot, method: TelegramMethod[T]
    ) -> Response[T]:
        await self.check()
        return await make_request(bot, method)
