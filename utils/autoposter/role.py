"""The channel autoposter: a durable queue published on schedule by the active instance only.

APScheduler 3 cannot share a job store between processes, so the scheduler runs only while this
instance leads: a fresh ``AsyncIOScheduler`` (with the ``AsyncIOExecutor``) per activation, shut
down before the lock is released. A fresh one each time sidesteps APScheduler's restart caveats
(MemoryJobStore drops jobs on shutdown; executors cannot restart). APScheduler only *fires*: each
slot is a one-shot job for a time computed by :mod:`utils.autoposter.schedule`, and serving a slot
arms the next one. That keeps every rule about *when* (time zones, DST, missed slots) in pure,
unit-tested functions, and lets each job know which slot it serves.

Delivery is exactly-once as far as Telegram allows: a post is claimed ``queued`` -> ``sending`` in
one fenced statement before the send, and every send ends in a definite state
(:func:`outcome_of`): ``sent`` with Telegram's message_id, ``failed`` when Telegram refused it,
``uncertain`` when it may or may not have gone out (admins are told, with ``/retry``), or back to
``queued`` when this instance stops while the post waits for its send slot (the session's flood
limiter, ``utils.sending``, waits out rate limits for every send). A post found in ``sending`` by
a new leader (its sender died) is marked ``uncertain`` and reported, never re-sent blindly. Missed
slots: the last served slot is persisted; a new leader serves at most one catch-up post if the
missed slot is within ``POST_MISFIRE_GRACE``, then goes back on schedule (never a burst).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from aiogram import Bot
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramConflictError,
    TelegramEntityTooLarge,
    TelegramForbiddenError,
    TelegramMigrateToChat,
    TelegramNetworkError,
    TelegramNotFound,
    TelegramRetryAfter,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from aiogram.types import Message
from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.date import DateTrigger

from utils.autoposter import schedule as slots
from utils.autoposter.schedule import CronSchedule, IntervalSchedule, Schedule
from utils.base.interrupt import done_unless_set
from utils.base.lookup import within
from utils.base.redact import Redactor
from utils.state.store import FencedError, Post, StateStore

log = logging.getLogger("solobot.autoposter")

TEXT_LIMIT = 4096
CAPTION_LIMIT = 1024
#: How long :meth:`Autoposter.stop` lets a send in progress finish and be marked before the lock
#: goes; a send still running after that is found in ``sending`` and marked ``uncertain`` by the
#: next leader.
INFLIGHT_STOP_TIMEOUT = 5.0
#: A send cancelled midway (the event loop closing) is marked ``uncertain`` if the database
#: answers within this; otherwise the next leader does it.
CANCELLED_FINISH_TIMEOUT = 2.0
#: How far down the queue a newly queued post's publication time is estimated.
QUEUE_ESTIMATE_LIMIT = 1000
SLOT_JOB_ID = "autopost"

#: Telegram answered and refused the post: it is not in the channel, and sending it again unchanged
#: would be refused again (bad request, chat not found, bot not a member, token revoked, conflict,
#: file too large, group migrated). TelegramEntityTooLarge is a TelegramNetworkError subclass, so
#: this is checked first.
REJECTED = (
    TelegramBadRequest, TelegramNotFound, TelegramForbiddenError, TelegramUnauthorizedError,
    TelegramConflictError, TelegramEntityTooLarge, TelegramMigrateToChat,
)
#: The request may have reached Telegram before it failed: the post may or may not be out.
MIDWAY = (TimeoutError, TelegramNetworkError, TelegramServerError)


class PostRejected(ValueError):
    """A post that cannot be queued; the message says why."""


class SendSlots(Protocol):
    """The flood limiter, as the autoposter sees it (``utils.sending.limiter.FloodLimiter``)."""

    def holds(self, task: asyncio.Task[Any]) -> bool: ...  # still waiting for its slot: not sent


class EpochLease(Protocol):
    """What the role needs from an acquisition: the fencing epoch its writes carry."""

    @property
    def epoch(self) -> int: ...


@dataclass(frozen=True)
class SendOutcome:
    """How one send ended: the post's next status, and Telegram's message id or the error."""

    status: str  # sent | failed | uncertain | queued
    message_id: int | None = None
    error: str | None = None


def outcome_of(exc: Exception) -> SendOutcome:
    """The definite state a send ends in when it raised *exc* (any exception, never escaping).

    Refusals are ``failed``; anything after which the post might be in the channel (a network
    error, a timeout, a 5xx, or an exception nobody foresaw) is ``uncertain``, so an admin checks
    the channel before ``/retry`` rather than the bot publishing twice.
    """
    name = type(exc).__name__
    if isinstance(exc, REJECTED):
        return SendOutcome("failed", error=exc.message)
    if isinstance(exc, MIDWAY):
        detail = getattr(exc, "message", None) or str(exc) or "no details"
        return SendOutcome("uncertain", error=f"sending failed midway ({name}: {detail})")
    return SendOutcome("uncertain", error=f"sending failed unexpectedly ({name}: {exc or 'no details'})")


def make_schedule(post_cron: str | None, post_interval: float | None, tz: ZoneInfo) -> Schedule:
    if post_cron:
        return CronSchedule.parse(post_cron, tz)
    if post_interval is None:
        raise ValueError("set POST_CRON or POST_INTERVAL")
    return IntervalSchedule(post_interval, tz)


class Autoposter:
    name = "autoposter"

    def __init__(
        self,
        bot: Bot,
        store: StateStore,
        *,
        channel_id: str,
        post_cron: str | None,
        post_interval: float | None,
        timezone: str,
        misfire_grace: float,
        admin_ids: frozenset[int],
        step_down: Callable[[str], None],
        sends: SendSlots | None = None,
    ) -> None:
        self.bot = bot
        self.sends = sends
        self.store = store
        self.channel_id: int | str = int(channel_id) if channel_id.lstrip("-").isdigit() else channel_id
        self.tz = ZoneInfo(timezone)
        self.schedule = make_schedule(post_cron, post_interval, self.tz)
        self.misfire_grace = misfire_grace
        self.admin_ids = admin_ids
        self.step_down = step_down
        self.epoch = 0
        self.scheduler: AsyncIOScheduler | None = None
        #: The slot the pending one-shot job will serve (None while standing by).
        self.armed_slot: dt.datetime | None = None
        self._stopping = asyncio.Event()
        self._inflight: set[asyncio.Task[Any]] = set()
        self._publish_lock = asyncio.Lock()
        self.posts_sent = 0

    @property
    def grace(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.misfire_grace)

    @staticmethod
    def _now() -> dt.datetime:
        return dt.datetime.now(dt.UTC)

    # -- schedule ----------------------------------------------------------------------------

    def upcoming(self, count: int) -> list[dt.datetime]:
        """The next *count* slots: from the armed one while leading, else from now."""
        first = self.armed_slot if self.scheduler is not None else slots.next_slot(self.schedule, self._now())
        return slots.upcoming(self.schedule, first, count)

    @property
    def state(self) -> str:
        return "running" if self.scheduler is not None else "standby"

    # -- role --------------------------------------------------------------------------------

    async def start(self, lease: EpochLease) -> None:
        self.epoch = lease.epoch
        self._stopping.clear()
        interrupted = await self.store.mark_interrupted_uncertain(lease.epoch)
        for post in interrupted:
            log.warning("post #%d was interrupted between send and confirmation; marked uncertain",
                        post.id)
            await self._tell_admins(
                f"Post #{post.id} may or may not have been published: the instance sending it "
                f"stopped before Telegram confirmed it. Check the channel; /retry {post.id} sends it "
                "again."
            )
        plan = slots.activation(
            self.schedule, now=self._now(), last_served=await self._last_slot(), grace=self.grace
        )
        if plan.catch_up_for is not None:
            log.info("missed slot at %s is within POST_MISFIRE_GRACE; one catch-up post now",
                     plan.catch_up_for.isoformat(timespec="seconds"))
        # Our own job carries each slot's misfire rule (:meth:`_slot`), so APScheduler must run a
        # late job rather than drop it (a dropped one-shot job would end the chain of slots).
        scheduler = AsyncIOScheduler(
            timezone=self.tz,
            executors={"default": AsyncIOExecutor()},
            job_defaults={"misfire_grace_time": None},
        )
        self._arm(scheduler, plan.first)
        scheduler.start()
        self.scheduler = scheduler
        log.info("autoposter running: %s", self.schedule_words())

    async def stop(self, *, voluntary: bool) -> None:
        self._stopping.set()  # a post still waiting for its send slot goes back to the queue
        scheduler, self.scheduler = self.scheduler, None
        self.armed_slot = None
        if scheduler is not None:
            scheduler.shutdown(wait=False)
        if self._inflight:
            # A send in progress finishes and is marked before the lock goes.
            await asyncio.wait(set(self._inflight), timeout=INFLIGHT_STOP_TIMEOUT)
        self.epoch = 0

    def _arm(self, scheduler: AsyncIOScheduler, slot: dt.datetime | None) -> None:
        """Set the one-shot job for *slot* (None: the schedule never fires again)."""
        self.armed_slot = slot
        if slot is None:
            log.warning("the schedule %s has no further slot; nothing more is posted on schedule",
                        self.schedule.describe())
            return
        scheduler.add_job(
            self._slot, DateTrigger(run_date=slot), args=(slot,), id=SLOT_JOB_ID, name=SLOT_JOB_ID,
            replace_existing=True,
        )

    async def _last_slot(self) -> dt.datetime | None:
        """The last slot any leader served (stored with its UTC offset), or None."""
        raw = await self.store.get_flag("last_slot")
        if not raw:
            return None
        try:
            served = dt.datetime.fromisoformat(raw)
        except ValueError:
            served = None
        if served is None or served.tzinfo is None:
            log.warning("ignoring an unreadable last slot %r: no catch-up post this time", raw)
            return None
        return served

    # -- publishing ----------------------------------------------------------------------------

    def _track(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return task

    async def _slot(self, slot: dt.datetime) -> None:
        """One schedule slot: at most one post, then arm the next slot.

        APScheduler's executor cancels running jobs on shutdown; a post being sent must instead
        finish and be marked before the lock goes, so the work runs as our own tracked task
        (awaited by :meth:`stop`), shielded from that cancellation. The next slot is armed only
        by the scheduler that fired this one, so a slot served across a stop and a new start
        cannot start a second chain.
        """
        scheduler = self.scheduler
        try:
            if slots.is_missed(slot, self._now(), self.grace):
                log.info("slot %s skipped: it fired more than POST_MISFIRE_GRACE late",
                         slot.isoformat(timespec="seconds"))
            else:
                await asyncio.shield(self._track(self._serve_slot(slot)))
        finally:
            if scheduler is not None and scheduler is self.scheduler:
                self._arm(scheduler, slots.slot_after(self.schedule, slot, self._now()))

    async def _serve_slot(self, slot: dt.datetime) -> None:
        epoch = self.epoch
        if not epoch:
            return
        try:
            await self.store.set_flag("last_slot", slot.isoformat(), epoch=epoch)
        except FencedError as exc:
            self.step_down(f"autoposter fenced: {exc}")
            return
        if await self.is_paused():
            log.debug("slot skipped: paused")
            return
        await self._publish(None)

    async def _publish(self, post_id: int | None) -> Post | None:
        async with self._publish_lock:
            epoch = self.epoch
            if not epoch:
                return None
            try:
                post = await self.store.claim_post(epoch, post_id)
            except FencedError as exc:
                self.step_down(f"autoposter fenced: {exc}")
                return None
            if post is None:
                return None
            try:
                outcome = await self._send(post)
            except asyncio.CancelledError:
                await self._finish_cancelled(post, epoch)
                raise
            try:
                await self.store.finish_post(
                    post.id, epoch, status=outcome.status, message_id=outcome.message_id,
                    error=outcome.error,
                )
            except FencedError as exc:
                self.step_down(f"autoposter fenced: {exc}")
                return None
            if outcome.status == "sent":
                self.posts_sent += 1
                log.info("post #%d published (message %s)", post.id, outcome.message_id)
            elif outcome.status == "queued":
                log.info("post #%d back in the queue: %s", post.id, outcome.error)
            else:
                log.warning("post #%d %s: %s", post.id, outcome.status, outcome.error)
                hint = f" /retry {post.id} sends it again." if outcome.status == "uncertain" else ""
                await self._tell_admins(f"Post #{post.id} {outcome.status}: {outcome.error}.{hint}")
            return post

    async def _finish_cancelled(self, post: Post, epoch: int) -> None:
        """Mark a send cancelled midway ``uncertain`` now rather than leave it in ``sending``."""
        try:
            await within(
                self.store.finish_post(post.id, epoch, status="uncertain",
                                       error="the send was cancelled midway"),
                CANCELLED_FINISH_TIMEOUT, name=f"marking post #{post.id} uncertain",
            )
        except Exception as exc:  # noqa: BLE001 - the next leader marks it instead
            log.debug("could not mark cancelled post #%d: %s", post.id, exc)
        else:
            log.warning("post #%d uncertain: the send was cancelled midway", post.id)

    async def _send(self, post: Post) -> SendOutcome:
        """Send once; never raises an ``Exception``.

        Rate limits are the session's (``utils.sending``): a 429 is waited out there, one
        mechanism for every send. If this instance stops while the post still waits for its slot
        there, the post never left: it goes back to the queue. A ``TelegramRetryAfter`` that
        reaches here could not go out within ``SEND_RETRY_MAX_SECONDS``: not sent, so ``failed``.
        """
        send = asyncio.ensure_future(self._send_once(post))
        try:
            await done_unless_set(self._stopping, send)
        except asyncio.CancelledError:
            send.cancel()
            raise
        if not send.done() and self.sends is not None and self.sends.holds(send):
            send.cancel()
            await asyncio.gather(send, return_exceptions=True)
            return SendOutcome("queued", error="this instance stopped while the post waited for its send slot")
        try:
            message = await send
        except TelegramRetryAfter as exc:
            return SendOutcome("failed", error=f"rate limited by Telegram for {exc.retry_after} s, "
                                               "longer than SEND_RETRY_MAX_SECONDS")
        except Exception as exc:  # noqa: BLE001 - every failure ends in a definite state
            outcome = outcome_of(exc)
            return SendOutcome(outcome.status, error=self._masked(outcome.error))
        return SendOutcome("sent", message_id=message.message_id)

    async def _send_once(self, post: Post) -> Message:
        if post.photo:
            return await self.bot.send_photo(self.channel_id, photo=post.photo, caption=post.text)
        return await self.bot.send_message(self.channel_id, post.text or "")

    def _masked(self, text: str | None) -> str | None:
        """*text* without the bot token (an HTTP error may quote the request URL)."""
        return None if text is None else Redactor(token=self.bot.token)(text)

    async def _tell_admins(self, text: str) -> None:
        for admin in sorted(self.admin_ids):
            try:
                await self.bot.send_message(admin, text)
            except Exception as exc:  # noqa: BLE001 - an admin who never started the bot
                log.debug("could not tell admin %d: %s", admin, exc)

    # -- admin commands ------------------------------------------------------------------------

    async def enqueue(
        self, *, text: str | None, photo: str | None, created_by: int
    ) -> tuple[Post, dt.datetime | None]:
        if photo is None and not (text or "").strip():
            raise PostRejected("the post is empty")
        if photo is not None and text and len(text) > CAPTION_LIMIT:
            raise PostRejected(
                f"the caption is {len(text)} characters; Telegram's limit is {CAPTION_LIMIT}"
            )
        if photo is None and text and len(text) > TEXT_LIMIT:
            raise PostRejected(f"the text is {len(text)} characters; Telegram's limit is {TEXT_LIMIT}")
        post = await self.store.add_post(text=text, photo=photo, created_by=created_by)
        queued = await self.store.queued_posts(limit=QUEUE_ESTIMATE_LIMIT)
        position = next((i for i, p in enumerate(queued) if p.id == post.id), None)
        if position is None:  # further back than the estimate looks
            return post, None
        times = self.upcoming(position + 1)
        return post, times[position] if len(times) > position else None

    def describe_when(self, when: dt.datetime | None) -> str:
        if when is None:
            return "at a later slot"
        # Subtract in UTC: two datetimes in the same zone subtract by wall clock, off by the DST
        # shift across a change.
        seconds = max(0, int((when.astimezone(dt.UTC) - self._now()).total_seconds()))
        return f"at {when.strftime('%Y-%m-%d %H:%M:%S %Z')} (in {dt.timedelta(seconds=seconds)})"

    async def describe_queue(self) -> str:
        queued = await self.store.queued_posts(limit=10)
        if not queued:
            return "The queue is empty."
        times = self.upcoming(len(queued))
        paused = " (paused: nothing goes out until /resume)" if await self.is_paused() else ""
        lines = [f"Next posts{paused}:"]
        for i, post in enumerate(queued):
            when = times[i].strftime("%Y-%m-%d %H:%M:%S %Z") if i < len(times) else "?"
            preview = (post.text or "[photo]").replace("\n", " ")[:40]
            lines.append(f"#{post.id} at {when}: {preview}")
        return "\n".join(lines)

    async def cancel(self, post_id: int) -> str:
        if await self.store.set_post_status(post_id, from_statuses=("queued",), to="cancelled"):
            return f"Post #{post_id} cancelled."
        return await self._not_in_state(post_id, "queued")

    async def retry(self, post_id: int) -> str:
        if await self.store.set_post_status(
            post_id, from_statuses=("uncertain", "failed"), to="queued", priority=1
        ):
            return f"Post #{post_id} is queued again, first in line."
        return await self._not_in_state(post_id, "uncertain or failed")

    async def post_now(self, post_id: int) -> str:
        post = await self.store.get_post(post_id)
        if post is None or post.status != "queued":
            return await self._not_in_state(post_id, "queued")
        if not self.epoch:
            await self.store.set_post_status(post_id, from_statuses=("queued",), to="queued",
                                             priority=2)
            return f"Post #{post_id} moved to the front; it goes out at the next slot."
        self._track(self._publish(post_id))
        return f"Publishing post #{post_id} now."

    async def _not_in_state(self, post_id: int, wanted: str) -> str:
        post = await self.store.get_post(post_id)
        if post is None:
            return f"There is no post #{post_id}."
        return f"Post #{post_id} is {post.status}, not {wanted}."

    async def is_paused(self) -> bool:
        return await self.store.get_flag("paused") == "1"

    async def set_paused(self, paused: bool) -> str:
        await self.store.set_flag("paused", "1" if paused else "0")
        log.info("autoposter %s by an admin", "paused" if paused else "resumed")
        return "Paused: nothing is posted until /resume." if paused else "Resumed."

    def schedule_words(self) -> str:
        return (f"{self.schedule.describe()} in {self.tz.key} to {self.channel_id}, "
                f"misfire grace {self.misfire_grace:g} s")

    async def describe_schedule(self) -> str:
        paused = await self.is_paused()
        nxt = self.upcoming(3)
        lines = [f"Schedule: {self.schedule_words()}.", "Paused." if paused else "Running."]
        if nxt:
            lines.append("Next slots: " + ", ".join(s.strftime("%Y-%m-%d %H:%M:%S %Z") for s in nxt))
        return "\n".join(lines)
