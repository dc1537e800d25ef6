"""The flood limiter in the bot's session: every send into a chat waits for its slot here.

An aiogram request middleware (:class:`FloodControl`), so every Bot API call that sends into a
chat passes it, whoever makes it: handlers, the autoposter, the admin commands, a module's jobs.
Calls that do not send into a chat (getUpdates, getMe, answerCallbackQuery, setWebhook...) go
straight through. :class:`~utils.sending.flood.SendPlan` decides who goes when; this module only
waits for its word, with one timer and one future per waiting send.

A 429 is handled, not raised: the send waits ``retry_after`` (its chat, or everyone; see
``utils.sending.flood``) and goes again, at the head of its chat. The caller sees
``TelegramRetryAfter`` only when the send cannot go out within ``SEND_RETRY_MAX_SECONDS`` of the
call; that is one WARNING naming the chat and the wait.

Leadership: the lease gate is asked again when the slot is granted, right before the request
(and once more in the connector, ``utils.locking.gated_session``), so an instance that stopped
leading while a send waited never sends it. At the drain deadline of a shutdown :meth:`close`
ends the sends still waiting with :class:`SendsClosed` (a ``LeaseLost``): they never left, their
handlers end without finishing, and their updates stay not done for the next leader; a send
already on the wire completes, so its handler can finish and its update is not answered twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from aiogram.exceptions import TelegramRetryAfter

from utils.base.histogram import DurationHistogram
from utils.base.lease import LeaseGate, LeaseLost
from utils.sending.flood import (
    FAILED,
    WAITING,
    SendLimits,
    SendPlan,
    Target,
    Ticket,
    is_group,
    seconds_until,
    sends_into_chat,
)

if TYPE_CHECKING:
    from aiogram import Bot
    from aiogram.client.session.middlewares.base import NextRequestMiddlewareType
    from aiogram.methods import Response, TelegramMethod

log = logging.getLogger("solobot.sending")

#: Buckets of the histogram of the seconds sends waited for their slot.
WAIT_BUCKETS = (0.005, 0.05, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

T = TypeVar("T")


class SendsClosed(LeaseLost):
    """The send never left: this instance stopped sending (drain deadline) while it waited."""


class SendExpired(Exception):
    """The send could not go out within ``SEND_RETRY_MAX_SECONDS``: its chat waits until *until*."""

    def __init__(self, until: float) -> None:
        super().__init__(f"rate limited until {until:.1f}")
        self.until = until


class FloodLimiter:
    """The asyncio side of :class:`SendPlan`: waits for grants, reports how each send ended."""

    def __init__(self, limits: SendLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        #: Told when a task starts and stops waiting for a slot (the pipeline frees the handler's
        #: concurrency slot meanwhile: ``UpdatePipeline.waiting_to_send``).
        self.on_wait: Callable[[asyncio.Task[object], bool], None] | None = None
        self._clock = clock
        self.plan = SendPlan(limits, clock())
        self.waited = DurationHistogram(WAIT_BUCKETS)
        self._waiters: dict[Ticket, tuple[asyncio.Future[None], asyncio.Task[object] | None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._closed: tuple[str, object] | None = None  # (why, the term it was closed for)

    # -- reading -----------------------------------------------------------------------------

    def now(self) -> float:
        return self._clock()

    @property
    def waiting(self) -> int:
        """Sends waiting for their slot now."""
        return self.plan.waiting

    @property
    def rate_limited(self) -> int:
        """429s received."""
        return self.plan.rate_limited

    def holds(self, task: asyncio.Task[object]) -> bool:
        """Whether *task* waits here for a slot (its send has not left)."""
        return any(owner is task for _, owner in self._waiters.values())

    # -- a send's life -----------------------------------------------------------------------

    def submit(self, target: Target, term: object = None) -> Ticket:
        """Queue a send behind its chat's earlier ones (*term*: the lease it is made under)."""
        if self._closed is not None:
            why, closed_term = self._closed
            if term is closed_term:
                raise SendsClosed(why)
            self._closed = None  # a new term: sending again
        ticket = self.plan.submit(target, self._clock())
        self._pump()
        return ticket

    async def granted(self, ticket: Ticket) -> None:
        """Return when *ticket* may go; :class:`SendExpired` or :class:`SendsClosed` if never."""
        if ticket.state == WAITING:
            task = asyncio.current_task()
            if self.on_wait is not None and task is not None:
                self.on_wait(task, True)
            try:
                while ticket.state == WAITING:
                    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    self._waiters[ticket] = (future, task)
                    try:
                        await future
                    finally:
                        self._waiters.pop(ticket, None)
            finally:
                if self.on_wait is not None and task is not None:
                    self.on_wait(task, False)
        if ticket.state == FAILED:
            assert ticket.blocked_until is not None
            raise SendExpired(ticket.blocked_until)
        if ticket.granted_at is None:  # ended while waiting: close()
            raise SendsClosed(self._closed[0] if self._closed else "sending stopped")

    def retry_after(self, ticket: Ticket, seconds: float) -> bool:
        """*ticket* got a 429; True if it waits and goes again, False if it cannot (expired)."""
        now = self._clock()
        pause = self.plan.retry_after(ticket, seconds, now)
        scope = "every chat" if pause.overall else f"chat {ticket.target.chat}"
        if pause.overall:
            log.info("Telegram's overall send limit reached: %s waits %.0f s", scope, seconds)
        else:
            log.debug("429 for chat %s: its sends wait %.0f s", ticket.target.chat, seconds)
        if pause.expired:
            log.warning("sends to %s rate limited for %.0f s, beyond SEND_RETRY_MAX_SECONDS (%g s): "
                        "%d send(s) fail with TelegramRetryAfter", scope, seconds, self.limits.retry_max,
                        len(pause.expired))
            for expired in pause.expired:
                self._wake(expired)
        self._pump()
        return ticket not in pause.expired

    def release(self, ticket: Ticket) -> None:
        """*ticket*'s send ended (answered, failed, cancelled): its chat may send the next one."""
        if ticket.granted_at is not None:
            self.waited.observe(ticket.granted_at - ticket.made_at)
        self.plan.finished(ticket, self._clock())
        self._pump()

    # -- stopping ----------------------------------------------------------------------------

    def close(self, reason: str, term: object = None) -> int:
        """End every send still waiting with :class:`SendsClosed`, and refuse new ones while
        the lease *term* lasts; return how many were waiting. Sends on the wire complete."""
        self._closed = (reason, term)
        ended = list(self._waiters)
        now = self._clock()
        for ticket in ended:
            self.plan.finished(ticket, now)
            self._wake(ticket)
        if ended:
            log.info("%d send(s) still waiting for their slot at the drain deadline: not sent; "
                     "their updates stay for the next leader", len(ended))
        self._pump()
        return len(ended)

    # -- inside ------------------------------------------------------------------------------

    def _wake(self, ticket: Ticket) -> None:
        waiter = self._waiters.get(ticket)
        if waiter is not None and not waiter[0].done():
            waiter[0].set_result(None)

    def _pump(self) -> None:
        """Grant what may go now and set the timer for the next moment something may."""
        now = self._clock()
        granted, wake = self.plan.grant(now)
        for ticket in granted:
            self._wake(ticket)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if wake is not None:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, wake - now), self._pump)


class FloodControl:
    """The aiogram request middleware: sends into a chat wait for their slot, 429s are waited out.

    Registered after the lease gate (which refuses at once on a standby, so a standby never queues
    a send) and before the connector's own gate check.
    """

    def __init__(self, limiter: FloodLimiter, gate: LeaseGate) -> None:
        self.limiter = limiter
        self.gate = gate

    def target(self, method: TelegramMethod[Any]) -> Target | None:
        """Where *method* sends, or None when it does not send into a chat (not slowed)."""
        if not sends_into_chat(method.__api_method__):
            return None
        chat_id = getattr(method, "chat_id", None)
        if chat_id is None:  # an inline message's edit: no chat
            return None
        paid = bool(getattr(method, "allow_paid_broadcast", None))
        if self.limiter.limits.paid_broadcast and not paid and "allow_paid_broadcast" in type(method).model_fields:
            method.allow_paid_broadcast = True  # type: ignore[attr-defined]
            paid = True
        return Target(str(chat_id), is_group(chat_id), paid)

    def close(self, reason: str) -> int:
        """The drain deadline: sends still waiting give up (see the module's docstring)."""
        return self.limiter.close(reason, self.gate.lease)

    async def __call__(
        self, make_request: NextRequestMiddlewareType[T], bot: Bot, method: TelegramMethod[T]
    ) -> Response[T]:
        target = self.target(method)
        if target is None:
            return await make_request(bot, method)
        limiter = self.limiter
        ticket = limiter.submit(target, self.gate.lease)
        try:
            while True:
                try:
                    await limiter.granted(ticket)
                except SendExpired as exc:
                    wait = seconds_until(exc.until, limiter.now())
                    raise TelegramRetryAfter(
                        method=method, message=f"Too Many Requests: retry after {wait}", retry_after=wait,
                    ) from None
                await self.gate.check()  # the lease when the send actually goes, not when it was made
                try:
                    return await make_request(bot, method)
                except TelegramRetryAfter as exc:
                    if not limiter.retry_after(ticket, exc.retry_after):
                        raise
        finally:
            limiter.release(ticket)
