"""``PollingManager``: our own getUpdates loop feeding the aiogram Dispatcher.

Why not ``Dispatcher.start_polling``: its ``_listen_updates`` catches every exception (409
included), logs it at ERROR and retries in 1-5 s for ever, so two copies fight silently; and it
confirms an update's offset before the handler finished, and does not wait for handlers on stop.

Here:

* ``TelegramConflictError`` (another poller): before backing off, check that we still hold the
  lock and epoch. If not, step down (the controller goes passive). If so, back off with tenacity,
  exponential 5 s -> 300 s with jitter, re-checking before every retry. One WARNING per episode.
* "webhook is active" 409: one ``deleteWebhook`` (``DELETE_WEBHOOK_ON_CONFLICT=false`` opts out).
* 429 waits ``retry_after``; network and 5xx errors: short capped backoff, reset after a success.
* handlers run as tasks, at most ``HANDLER_CONCURRENCY`` at once. The offset sent to Telegram is
  the lowest update still running (or one past the newest), so only finished updates are
  confirmed. Finished update ids are recorded (fenced) so no later leader handles them again.
* stop: stop fetching, drain handlers (bounded), confirm the offset, in that order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aiogram import Bot, Dispatcher
from aiogram.exceptions import (
    ClientDecodeError,
    TelegramConflictError,
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from aiogram.methods import DeleteWebhook, GetUpdates, TelegramMethod
from aiogram.types import Update
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential,
    wait_random,
)

from utils.locking.backend import Lease
from utils.state.store import FencedError, StateStore

log = logging.getLogger("solobot.polling")

T = TypeVar("T")

CONFLICT_WAIT = wait_exponential(multiplier=5, min=5, max=300) + wait_random(0, 2)
# A proxy answering HTML (ClientDecodeError) is as transient as a dropped connection.
TRANSIENT_ERRORS = (TelegramNetworkError, TelegramServerError, ClientDecodeError, TimeoutError, OSError)
IDLE_RECHECK = 0.25  # while a slow handler pins the offset, how often to look for new updates


class LeadershipLost(Exception):
    """The lock or epoch is gone: stop polling at once."""


class _Stopped(Exception):
    """Stop was requested while fetching."""


class _WebhookDeleted(Exception):
    """Retry at once: the webhook that blocked getUpdates was removed."""


def transient_wait(state: RetryCallState) -> float:
    """429: exactly ``retry_after``; anything else transient: 0.5 s doubling, capped at 10 s."""
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, TelegramRetryAfter):
        return float(exc.retry_after)
    return float(min(10.0, 0.5 * 2 ** (state.attempt_number - 1)))


class PollingStats:
    """Counters read by /health and /metrics."""

    def __init__(self) -> None:
        self.last_ok: float | None = None  # monotonic time of the last good getUpdates
        self.conflicts = 0
        self.updates_processed = 0
        self.updates_skipped = 0
        self.errors: dict[str, int] = {}
        self.handler_seconds: list[float] = []  # drained by the metrics collector
        self.polling = False

    def seconds_since_ok(self) -> float | None:
        return None if self.last_ok is None else round(time.monotonic() - self.last_ok, 3)

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


class PollingManager:
    """Runs while active (a role of the leadership controller)."""

    name = "polling"

    def __init__(
        self,
        bot: Bot,
        dispatcher: Dispatcher,
        store: StateStore,
        *,
        verify_lease: Callable[[], Awaitable[bool]],
        step_down: Callable[[str], None],
        on_fatal: Callable[[str], None] | None = None,
        polling_timeout: int = 30,
        concurrency: int = 16,
        drain_timeout: float = 5.0,
        delete_webhook: bool = True,
        allowed_updates: list[str] | None = None,
    ) -> None:
        self.bot = bot
        self.dp = dispatcher
        self.store = store
        self.verify_lease = verify_lease
        self.step_down = step_down
        self.on_fatal = on_fatal or step_down
        self.polling_timeout = polling_timeout
        self.concurrency = concurrency
        self.drain_timeout = drain_timeout
        self.delete_webhook = delete_webhook
        self.allowed_updates = allowed_updates
        self.stats = PollingStats()
        self._reset(epoch=0)

    def _reset(self, epoch: int) -> None:
        self._epoch = epoch
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        self._semaphore = asyncio.Semaphore(self.concurrency)
        self._running: dict[int, asyncio.Task[None]] = {}
        self._finished: set[int] = set()  # finished ids at or above the offset we confirm
        self._max_seen: int | None = None
        self._start_offset: int | None = None
        self._sent_offset: int | None = None  # offset in the last successful getUpdates
        self._committed_offset: int | None = None  # offset last written to the store
        self._task: asyncio.Task[None] | None = None
        self._conflict_episode = 0
        self._transient_failing = False

    # -- role interface ----------------------------------------------------------------------

    async def start(self, lease: Lease) -> None:
        self._reset(epoch=lease.epoch)
        self._start_offset = await self.store.load_offset()
        self._committed_offset = self._start_offset
        self._task = asyncio.create_task(self._run(), name="solobot-polling")

    async def stop(self, *, voluntary: bool) -> None:
        """Stop fetching, drain handlers (bounded), then confirm what finished (if still leader)."""
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        await self._drain()
        if voluntary:
            await self._confirm_offset()
        self.stats.polling = False

    # -- offsets -----------------------------------------------------------------------------

    def next_offset(self) -> int | None:
        """Lowest update still running, else one past the newest seen: only finished ones confirmed."""
        if self._running:
            return min(self._running)
        if self._max_seen is not None:
            return self._max_seen + 1
        return self._start_offset

    def _known(self, update_id: int) -> bool:
        return update_id in self._running or update_id in self._finished

    async def _commit_offset(self, offset: int | None) -> None:
        if offset is None or (self._committed_offset is not None and offset <= self._committed_offset):
            return
        try:
            await self.store.commit_offset(offset, self._epoch)
        except FencedError as exc:
            raise LeadershipLost(str(exc)) from exc
        self._committed_offset = offset
        self._finished = {u for u in self._finished if u >= offset}

    # -- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        self.stats.polling = True
        try:
            while not self._stop.is_set():
                offset = self.next_offset()
                try:
                    await self._commit_offset(offset)
                    updates = await self._until_stopped(self._fetch(offset))
                except _Stopped:
                    break
                self._sent_offset = offset
                await self._dispatch(updates)
        except LeadershipLost as exc:
            log.warning("stopping polling: %s", exc)
            self.step_down(str(exc))
        except TelegramUnauthorizedError as exc:
            # Retrying cannot help and would only hammer Telegram: a configuration problem.
            log.error("Telegram rejected the token (401 %s): wrong or revoked BOT_TOKEN", exc.message)
            self.on_fatal("Telegram rejected BOT_TOKEN (401 Unauthorized)")
        except Exception as exc:  # unexpected: step down rather than die
            log.exception("polling loop failed")
            self.step_down(f"polling failed: {exc}")
        finally:
            self.stats.polling = False

    async def _until_stopped(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run *coro* unless stop is requested first (then cancel it: no more fetching)."""
        task = asyncio.ensure_future(coro)
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _Stopped

    async def _fetch(self, offset: int | None) -> list[Update]:
        """One successful getUpdates, through conflict backoff and transient retries."""
        conflicts = AsyncRetrying(
            retry=retry_if_exception_type((TelegramConflictError, _WebhookDeleted)),
            wait=self._conflict_wait,
            before_sleep=self._before_conflict_retry,
            reraise=True,
        )
        async for attempt in conflicts:
            with attempt:
                if not await self.verify_lease():
                    raise LeadershipLost("lock or epoch no longer ours")
                try:
                    updates = await self._fetch_transient(offset)
                except TelegramConflictError as exc:
                    await self._on_conflict(exc)
                    raise
        if self._conflict_episode:
            log.info("conflict resolved after %d retries; polling", self._conflict_episode)
            self._conflict_episode = 0
        return updates

    def _conflict_wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _WebhookDeleted):
            return 0.0
        return float(CONFLICT_WAIT(state))

    async def _on_conflict(self, exc: TelegramConflictError) -> None:
        self.stats.conflicts += 1
        self.stats.count_error("conflict")
        if "webhook" in exc.message.lower():
            if self.delete_webhook:
                log.warning("a webhook is set for this bot; deleting it to poll "
                            "(DELETE_WEBHOOK_ON_CONFLICT=false keeps it)")
                await self.bot(DeleteWebhook(drop_pending_updates=False))
                raise _WebhookDeleted from exc
            log.error("a webhook is set for this bot and DELETE_WEBHOOK_ON_CONFLICT=false; "
                      "cannot poll until it is removed")
            return
        # Another poller. Are we still the leader? A fenced instance steps down instead.
        if not await self.verify_lease():
            raise LeadershipLost("409 conflict and the lock or epoch is no longer ours") from exc

    async def _before_conflict_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _WebhookDeleted):
            return
        self._conflict_episode = state.attempt_number
        delay = state.upcoming_sleep
        if state.attempt_number == 1:
            log.warning(
                "409 Conflict: another process polls this bot token; we hold the lock, so it is "
                "outside solobot's control. Backing off %.1f s (exponential up to 300 s)", delay,
            )
        else:
            log.debug("conflict retry %d in %.1f s", state.attempt_number, delay)

    async def _fetch_transient(self, offset: int | None) -> list[Update]:
        transient = AsyncRetrying(
            retry=retry_if_exception_type((TelegramRetryAfter, *TRANSIENT_ERRORS)),
            wait=transient_wait,
            before_sleep=self._before_transient_retry,
            reraise=True,
        )
        async for attempt in transient:
            with attempt:
                method = GetUpdates(
                    offset=offset, timeout=self.polling_timeout, allowed_updates=self.allowed_updates
                )
                updates = await self.bot(method, request_timeout=self.polling_timeout + 15)
        if self._transient_failing:
            log.info("getUpdates works again")
            self._transient_failing = False
        self.stats.last_ok = time.monotonic()
        return list(updates)

    async def _before_transient_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        kind = "rate_limited" if isinstance(exc, TelegramRetryAfter) else type(exc).__name__
        self.stats.count_error(kind)
        if not self._transient_failing:
            self._transient_failing = True
            log.warning("getUpdates failed (%s: %s); retrying in %.1f s",
                        type(exc).__name__, exc, state.upcoming_sleep)
        else:
            log.debug("getUpdates retry %d in %.1f s", state.attempt_number, state.upcoming_sleep)

    # -- handlers ----------------------------------------------------------------------------

    async def _dispatch(self, updates: list[Update]) -> None:
        fresh = [u for u in updates if not self._known(u.update_id)]
        if fresh:
            done_before = await self.store.processed_among(u.update_id for u in fresh)
            for update in fresh:
                uid = update.update_id
                if uid in done_before:
                    # Finished by an earlier leader that died before confirming it.
                    self.stats.updates_skipped += 1
                    self._finished.add(uid)
                    log.debug("update %d already handled by an earlier leader; skipped", uid)
                    continue
                await self._semaphore.acquire()
                self._running[uid] = asyncio.create_task(self._handle(update))
        elif self._running:
            # Only updates we already run came back (a slow handler pins the offset):
            # wait for one to finish, or a moment, instead of spinning.
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=IDLE_RECHECK)
            except TimeoutError:
                pass
        if updates:
            newest = max(u.update_id for u in updates)
            self._max_seen = newest if self._max_seen is None else max(self._max_seen, newest)

    async def _handle(self, update: Update) -> None:
        uid = update.update_id
        started = time.monotonic()
        try:
            try:
                result = await self.dp.feed_update(self.bot, update)
                if isinstance(result, TelegramMethod):
                    await self.bot(result)
            except asyncio.CancelledError:
                raise
            except Exception:  # a handler bug must not stop polling
                log.exception("handler for update %d failed", uid)
            try:
                await self.store.mark_processed(uid, self._epoch)
            except FencedError as exc:
                self.step_down(f"fenced while recording update {uid}: {exc}")
            except Exception as exc:  # noqa: BLE001
                log.warning("could not record update %d as processed: %s", uid, exc)
            self._finished.add(uid)
            self.stats.updates_processed += 1
            self.stats.handler_seconds.append(time.monotonic() - started)
        finally:
            self._running.pop(uid, None)
            self._semaphore.release()
            self._changed.set()

    async def _drain(self) -> None:
        tasks = list(self._running.values())
        if not tasks:
            return
        log.info("draining %d running handler(s) (up to %.1f s)", len(tasks), self.drain_timeout)
        _, pending = await asyncio.wait(tasks, timeout=self.drain_timeout)
        if pending:
            log.warning("%d handler(s) did not finish within %.1f s; cancelled, not confirmed "
                        "(the next leader handles them again)", len(pending), self.drain_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _confirm_offset(self) -> None:
        """Tell Telegram (and the store) that everything below the watermark is done."""
        offset = self.next_offset()
        if offset is None:
            return
        try:
            await self._commit_offset(offset)
        except LeadershipLost as exc:
            log.warning("not confirming offset: %s", exc)
            return
        if self._sent_offset is not None and offset <= self._sent_offset:
            return
        try:
            await self.bot(GetUpdates(offset=offset, limit=1, timeout=0), request_timeout=5)
            self._sent_offset = offset
            log.debug("confirmed offset %d", offset)
        except Exception as exc:  # noqa: BLE001 - the store has it; the next leader re-confirms
            log.warning("could not confirm offset %d to Telegram: %s", offset, exc)
