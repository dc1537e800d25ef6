"""The channel autoposter: a durable queue published on schedule by the active instance only.

APScheduler 3 cannot share a job store between processes, so the scheduler runs only while this
instance leads: a fresh ``AsyncIOScheduler`` (with the ``AsyncIOExecutor``) per activation, shut
down before the lock is released. A fresh one each time sidesteps APScheduler's restart caveats
(MemoryJobStore drops jobs on shutdown; executors cannot restart).

Delivery is exactly-once as far as Telegram allows: a post is claimed ``queued`` -> ``sending`` in
one fenced statement before the send and marked ``sent`` with Telegram's message_id after. A post
found in ``sending`` by a new leader is marked ``uncertain`` and reported to admins, never re-sent
blindly. Missed slots: the last slot is persisted; a new leader serves at most one catch-up post
if the missed slot is within ``POST_MISFIRE_GRACE``, then goes back on schedule (never a burst).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any
from zoneinfo import ZoneInfo

from aiogram import Bot
from aiogram.exceptions import (
    TelegramBadRequest,
    TelegramForbiddenError,
    TelegramNetworkError,
    TelegramNotFound,
    TelegramRetryAfter,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from aiogram.types import Message
from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from utils.locking.backend import Lease
from utils.state.store import FencedError, Post, StateStore

log = logging.getLogger("solobot.autoposter")

TEXT_LIMIT = 4096
CAPTION_LIMIT = 1024
MAX_RATE_LIMIT_RETRIES = 5


class PostRejected(ValueError):
    """A post that cannot be queued; the message says why."""


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
    ) -> None:
        self.bot = bot
        self.store = store
        self.channel_id: int | str = int(channel_id) if channel_id.lstrip("-").isdigit() else channel_id
        self.post_cron = post_cron
        self.post_interval = post_interval
        self.tz = ZoneInfo(timezone)
        self.misfire_grace = misfire_grace
        self.admin_ids = admin_ids
        self.step_down = step_down
        self.epoch = 0
        self.scheduler: AsyncIOScheduler | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self._publish_lock = asyncio.Lock()
        self.posts_sent = 0

    # -- schedule ----------------------------------------------------------------------------

    def trigger(self) -> BaseTrigger:
        if self.post_cron:
            return CronTrigger.from_crontab(self.post_cron, timezone=self.tz)
        assert self.post_interval is not None
        return IntervalTrigger(seconds=self.post_interval, timezone=self.tz)

    def upcoming(self, count: int, after: dt.datetime | None = None) -> list[dt.datetime]:
        """The next *count* slots after *after* (default: now, or the scheduler's next run)."""
        now = dt.datetime.now(self.tz)
        start = after
        if start is None and self.scheduler is not None:
            job = self.scheduler.get_job("autopost")
            start = job.next_run_time if job is not None else None
        if start is None:
            start = now + dt.timedelta(seconds=self.post_interval) if self.post_interval else None
        slots: list[dt.datetime] = []
        if self.post_interval:
            first = start or now
            return [first + dt.timedelta(seconds=self.post_interval * i) for i in range(count)]
        trigger = self.trigger()
        previous: dt.datetime | None = None
        cursor = start or now
        while len(slots) < count:
            nxt = trigger.get_next_fire_time(previous, cursor)
            if nxt is None:
                break
            slots.append(nxt)
            previous, cursor = nxt, nxt + dt.timedelta(seconds=1)
        return slots

    @property
    def state(self) -> str:
        return "running" if self.scheduler is not None else "standby"

    # -- role --------------------------------------------------------------------------------

    async def start(self, lease: Lease) -> None:
        self.epoch = lease.epoch
        interrupted = await self.store.mark_interrupted_uncertain(lease.epoch)
        for post in interrupted:
            log.warning("post #%d was interrupted between send and confirmation; marked uncertain",
                        post.id)
            await self._tell_admins(
                f"Post #{post.id} may or may not have been published: the instance sending it "
                f"stopped before Telegram confirmed it. Check the channel; /retry {post.id} sends it "
                "again."
            )
        now = dt.datetime.now(self.tz)
        catch_up = await self._missed_slot(now)
        scheduler = AsyncIOScheduler(
            timezone=self.tz,
            executors={"default": AsyncIOExecutor()},
            job_defaults={
                "misfire_grace_time": int(self.misfire_grace),
                "coalesce": True,
                "max_instances": 1,
            },
        )
        kwargs: dict[str, Any] = {}
        if catch_up is not None:
            log.info("missed slot at %s is within POST_MISFIRE_GRACE; one catch-up post now",
                     catch_up.isoformat(timespec="seconds"))
            kwargs["next_run_time"] = now
        elif self.post_interval:
            kwargs["next_run_time"] = await self._interval_next(now)
        scheduler.add_job(self._slot, self.trigger(), id="autopost", name="autopost", **kwargs)
        scheduler.start()
        self.scheduler = scheduler
        log.info("autoposter running: %s", self.schedule_words())

    async def stop(self, *, voluntary: bool) -> None:
        scheduler, self.scheduler = self.scheduler, None
        if scheduler is not None:
            scheduler.shutdown(wait=False)
        if self._inflight:
            # A send in progress finishes and is marked before the lock goes.
            await asyncio.wait(set(self._inflight), timeout=5.0)
        self.epoch = 0

    async def _last_slot(self) -> dt.datetime | None:
        raw = await self.store.get_flag("last_slot")
        return dt.datetime.fromisoformat(raw) if raw else None

    async def _missed_slot(self, now: dt.datetime) -> dt.datetime | None:
        """The first slot after the last served one, if it passed within the grace period."""
        last = await self._last_slot()
        if last is None:
            return None
        if self.post_interval:
            missed = last + dt.timedelta(seconds=self.post_interval)
        else:
            missed_or_none = self.trigger().get_next_fire_time(None, last + dt.timedelta(seconds=1))
            if missed_or_none is None:
                return None
            missed = missed_or_none
        if missed <= now and (now - missed).total_seconds() <= self.misfire_grace:
            return missed
        return None

    async def _interval_next(self, now: dt.datetime) -> dt.datetime:
        """Keep an interval schedule's cadence across a handover (last slot + interval)."""
        last = await self._last_slot()
        assert self.post_interval is not None
        if last is not None:
            nxt = last + dt.timedelta(seconds=self.post_interval)
            if nxt > now:
                return nxt
        return now + dt.timedelta(seconds=self.post_interval)

    # -- publishing ----------------------------------------------------------------------------

    def _track(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return task

    async def _slot(self) -> None:
        """One schedule slot: at most one post.

        APScheduler's executor cancels running jobs on shutdown; a post being sent must instead
        finish and be marked before the lock goes, so the work runs as our own tracked task
        (awaited by :meth:`stop`), shielded from that cancellation.
        """
        await asyncio.shield(self._track(self._serve_slot()))

    async def _serve_slot(self) -> None:
        epoch = self.epoch
        if not epoch:
            return
        try:
            await self.store.set_flag(
                "last_slot", dt.datetime.now(self.tz).isoformat(), epoch=epoch
            )
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
            status, message_id, error = await self._send(post)
            try:
                await self.store.finish_post(
                    post.id, epoch, status=status, message_id=message_id, error=error
                )
            except FencedError as exc:
                self.step_down(f"autoposter fenced: {exc}")
                return None
            if status == "sent":
                self.posts_sent += 1
                log.info("post #%d published (message %s)", post.id, message_id)
            else:
                log.warning("post #%d %s: %s", post.id, status, error)
                hint = f" /retry {post.id} sends it again." if status == "uncertain" else ""
                await self._tell_admins(f"Post #{post.id} {status}: {error}.{hint}")
            return post

    async def _send(self, post: Post) -> tuple[str, int | None, str | None]:
        """Send once (429: wait retry_after and again); return (status, message_id, error)."""
        for _ in range(MAX_RATE_LIMIT_RETRIES + 1):
            try:
                message: Message
                if post.photo:
                    message = await self.bot.send_photo(
                        self.channel_id, photo=post.photo, caption=post.text
                    )
                else:
                    message = await self.bot.send_message(self.channel_id, post.text or "")
                return "sent", message.message_id, None
            except TelegramRetryAfter as exc:
                log.warning("post #%d rate limited; waiting %d s", post.id, exc.retry_after)
                await asyncio.sleep(exc.retry_after)
            except (TelegramBadRequest, TelegramForbiddenError, TelegramNotFound,
                    TelegramUnauthorizedError) as exc:
                return "failed", None, exc.message
            except (TimeoutError, TelegramNetworkError, TelegramServerError) as exc:
                return "uncertain", None, f"sending failed midway ({type(exc).__name__})"
        return "failed", None, f"still rate limited after {MAX_RATE_LIMIT_RETRIES} waits"

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
        queued = await self.store.queued_posts(limit=1000)
        position = next((i for i, p in enumerate(queued) if p.id == post.id), len(queued) - 1)
        slots = self.upcoming(position + 1)
        return post, slots[position] if len(slots) > position else None

    def describe_when(self, when: dt.datetime | None) -> str:
        if when is None:
            return "when the schedule next fires"
        seconds = max(0, int((when - dt.datetime.now(self.tz)).total_seconds()))
        return f"at {when.strftime('%Y-%m-%d %H:%M:%S %Z')} (in {dt.timedelta(seconds=seconds)})"

    async def describe_queue(self) -> str:
        queued = await self.store.queued_posts(limit=10)
        if not queued:
            return "The queue is empty."
        slots = self.upcoming(len(queued))
        paused = " (paused: nothing goes out until /resume)" if await self.is_paused() else ""
        lines = [f"Next posts{paused}:"]
        for i, post in enumerate(queued):
            when = slots[i].strftime("%Y-%m-%d %H:%M:%S %Z") if i < len(slots) else "?"
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
        what = f"cron '{self.post_cron}'" if self.post_cron else f"every {self.post_interval:g} s"
        return f"{what} in {self.tz.key} to {self.channel_id}, misfire grace {self.misfire_grace:g} s"

    async def describe_schedule(self) -> str:
        paused = await self.is_paused()
        nxt = self.upcoming(3)
        lines = [f"Schedule: {self.schedule_words()}.", "Paused." if paused else "Running."]
        if nxt:
            lines.append("Next slots: " + ", ".join(s.strftime("%Y-%m-%d %H:%M:%S") for s in nxt))
        return "\n".join(lines)
