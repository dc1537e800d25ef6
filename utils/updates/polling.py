"""``PollingManager``: the polling source of updates: our own getUpdates loop, feeding the sink.

Why not ``Dispatcher.start_polling``: its ``_listen_updates`` catches every exception (409
included), logs it at ERROR and retries in 1-5 s for ever, so two copies fight silently; and it
confirms an update's offset before the handler finished.

Here the fetch loop does only fetching and the conflict policy; the sink, the update pipeline
(:mod:`utils.updates.pipeline`), stores each batch in the inbox and runs the handlers, and
answers how much room it has left, which paces the loop:

* a batch is stored (one transaction, with its offset) before the next getUpdates confirms it;
  the offset never waits for handlers;
* every getUpdates, each retry included, goes through the lease gate: it leaves only with a
  recently verified lease (:mod:`utils.base.lease`);
* ``TelegramConflictError`` (another poller): the lease is verified again. One 409 with a valid
  lease is most likely the last request of a fenced instance: retry at once. 409s that persist
  (a poller outside solobot) back off with tenacity, 5 s -> 300 s with jitter, one WARNING per
  episode. A lost lease steps down instead;
* "webhook is active" 409: one ``deleteWebhook`` (``DELETE_WEBHOOK_ON_CONFLICT=false`` opts out);
* 429 waits ``retry_after``; network and 5xx errors: a short capped backoff, with a WARNING and
  then reminders at growing intervals while it lasts (:mod:`utils.updates.outage`);
* update ids that restart (another Bot API server, Telegram's weekly reset) are recognised (one
  WARNING) and followed, never skipped: de-duplication is on id and content;
* a getUpdates asks for no more updates than the sink has room for; with none (``INBOX_MAX``
  unfinished updates) fetching pauses until there is (Telegram keeps updates for 24 h).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiogram import Bot
from aiogram.exceptions import (
    ClientDecodeError,
    TelegramConflictError,
    TelegramNetworkError,
    TelegramRetryAfter,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from aiogram.methods import DeleteWebhook, GetUpdates
from aiogram.types import Update
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_exponential,
    wait_random,
)

from utils.base.episode import FailureEpisode
from utils.base.interrupt import Interrupted, until_set
from utils.base.lease import Lease, LeaseLost
from utils.base.lookup import cancel_within, retrieve_quietly
from utils.state.fencing import FencedError
from utils.state.store import StateStore
from utils.updates.ledger import OffsetBook
from utils.updates.outage import OutageLog
from utils.updates.pipeline import CANCEL_GRACE, UpdatePipeline
from utils.updates.stats import UpdateStats

log = logging.getLogger("solobot.polling")

#: Conflicts that persist: 5 s doubling to 300 s, plus jitter so two bots never sync up.
CONFLICT_WAIT = wait_exponential(multiplier=5, min=5, max=300) + wait_random(0, 2)
# A proxy answering HTML (ClientDecodeError) is as transient as a dropped connection.
TRANSIENT_ERRORS = (TelegramNetworkError, TelegramServerError, ClientDecodeError, TimeoutError, OSError)
#: Transient getUpdates failures: 0.5 s doubling, capped low so recovery is noticed quickly.
TRANSIENT_FIRST_WAIT, TRANSIENT_MAX_WAIT = 0.5, 3.0
#: The HTTP timeout of a long poll: the poll's own timeout plus this allowance.
REQUEST_TIMEOUT_ALLOWANCE = 15
#: At most this long do a new leader's recovered updates wait for its first getUpdates.
RECOVERED_HOLD_MAX = 1.0
#: A failed batch write is retried after this long (the batch is not confirmed meanwhile).
STORE_RETRY_WAIT = 1.0
#: At stop, a batch write under way gets this long to finish (milliseconds on a healthy database);
#: then it is abandoned: those updates were not confirmed, so Telegram still has them.
STOP_STORE_TIMEOUT = 3.0
#: The most updates one getUpdates returns (Telegram's maximum ``limit``).
FETCH_LIMIT = 100


class _RetryNow(Exception):
    """Retry at once: the webhook that blocked getUpdates was removed."""


def transient_wait(state: RetryCallState) -> float:
    """429: exactly ``retry_after``; anything else transient: 0.5 s doubling, capped at 3 s."""
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, TelegramRetryAfter):
        return float(exc.retry_after)
    return float(min(TRANSIENT_MAX_WAIT, TRANSIENT_FIRST_WAIT * 2 ** (state.attempt_number - 1)))


class PollingManager:
    """The polling source, a role of the leadership controller: runs while this instance is active."""

    name = "polling"

    def __init__(
        self,
        bot: Bot,
        store: StateStore,
        pipeline: UpdatePipeline,
        stats: UpdateStats,
        *,
        step_down: Callable[[str], None],
        on_fatal: Callable[[str], None] | None = None,
        polling_timeout: int = 30,
        delete_webhook: bool = True,
        allowed_updates: list[str] | None = None,
    ) -> None:
        self.bot = bot
        self.store = store
        self.pipeline = pipeline
        self.stats = stats
        self.step_down = step_down
        self.on_fatal = on_fatal or step_down
        self.polling_timeout = polling_timeout
        self.delete_webhook = delete_webhook
        self.allowed_updates = allowed_updates
        self.outage = OutageLog("getUpdates")
        self._lease: Lease | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._book = OffsetBook(None)
        self._conflict_episode = 0
        self._quick_poll = True

    # -- role interface ----------------------------------------------------------------------

    async def start(self, lease: Lease) -> None:
        self._lease = lease
        self._stop = asyncio.Event()
        self._conflict_episode = 0
        # The first poll of a term returns at once, so /ready knows within a round trip that
        # Telegram answers (a long poll on an idle bot would take POLLING_TIMEOUT to tell).
        self._quick_poll = True
        await self.pipeline.start(lease, hold=True)
        # Released after the first getUpdates, or after this long if Telegram does not answer.
        asyncio.get_running_loop().call_later(RECOVERED_HOLD_MAX, self.pipeline.release)
        self._book = OffsetBook(await self.store.inbox.load_offset())
        self._task = asyncio.create_task(self._run(), name="solobot-polling")

    async def stop(self, *, voluntary: bool) -> None:
        """Stop fetching, then let the pipeline drain (bounded) and record what finished."""
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            task.add_done_callback(retrieve_quietly)  # the loop logs its own failures
            done, _ = await asyncio.wait({task}, timeout=STOP_STORE_TIMEOUT)
            if not done:
                log.warning("stopping polling: the batch being stored did not finish within %g s (the "
                            "database does not answer); abandoned, Telegram still has those updates "
                            "(they were not confirmed)", STOP_STORE_TIMEOUT)
                await cancel_within(task, CANCEL_GRACE)
        await self.pipeline.stop()
        self.stats.polling = False
        self._lease = None

    # -- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        self.stats.polling = True
        try:
            room = self.pipeline.room
            while not self._stop.is_set():
                try:
                    if not room:
                        room = await until_set(self._stop, self.pipeline.until_room())
                    sent = self._book.offset
                    updates = await until_set(self._stop, self._fetch(sent, limit=min(room, FETCH_LIMIT)))
                    self.pipeline.release()  # after the first getUpdates of the term: see start()
                    ids = [u.update_id for u in updates]
                    if self._book.after_batch(sent, ids):
                        log.warning(
                            "update ids restarted: got %d after asking from %s (a new Bot API server, "
                            "or Telegram's reset after a week without updates); following the new "
                            "sequence", min(ids), sent,
                        )
                    # Not cancelled by a stop: a short transaction, and a batch half-stored is no
                    # use to anyone. A database that keeps failing gives up at stop.
                    room = await self._store(updates) if updates else self.pipeline.room
                except Interrupted:
                    break
        except LeaseLost as exc:
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

    async def _store(self, updates: list[Update]) -> int:
        """Hand the batch to the sink, which makes it durable (until then it is not confirmed: the
        next getUpdates would); the sink's room left."""
        failing = FailureEpisode()
        while True:
            try:
                room = await self.pipeline.put_fetched(updates, next_offset=self._book.offset)
            except FencedError as exc:
                raise self._lose(f"fenced while storing updates: {exc}") from exc
            except (LeaseLost, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - the database hiccuped: keep the batch, retry
                if self._stop.is_set():
                    log.warning("stopping with %d fetched update(s) not stored: %s; Telegram still "
                                "has them (they were not confirmed)", len(updates), self.store.describe_error(exc))
                    return 0
                if failing.failed():
                    log.warning("could not store %d update(s) in the inbox (%s); retrying, nothing is "
                                "confirmed to Telegram meanwhile", len(updates), self.store.describe_error(exc))
                await asyncio.sleep(STORE_RETRY_WAIT)
                continue
            if failing.recovered():
                log.info("inbox writable again")
            return room

    def _lose(self, reason: str) -> LeaseLost:
        """The term is over: the lease (one source of truth for it) records why; stop polling."""
        if self._lease is not None:
            self._lease.lose(reason)
        return LeaseLost(reason)

    async def _fetch(self, offset: int | None, *, limit: int) -> list[Update]:
        """One successful getUpdates, through the conflict policy and transient retries."""
        conflicts = AsyncRetrying(
            retry=retry_if_exception_type((TelegramConflictError, _RetryNow)),
            wait=self._conflict_wait,
            before_sleep=self._before_conflict_retry,
            reraise=True,
        )
        async for attempt in conflicts:
            with attempt:
                try:
                    updates = await self._fetch_transient(offset, limit)
                except TelegramConflictError as exc:
                    await self._on_conflict(exc)
                    raise
        if self._conflict_episode > 1:
            log.info("conflict resolved after %d retries; polling", self._conflict_episode)
        self._conflict_episode = 0
        return updates

    def _conflict_wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _RetryNow):
            return 0.0
        if state.attempt_number == 1:
            return 0.0  # one stray 409 with a verified lease: most likely a fenced instance
        return float(CONFLICT_WAIT(_shifted(state)))

    async def _on_conflict(self, exc: TelegramConflictError) -> None:
        self.stats.conflicts += 1
        self.stats.count_error("conflict")
        if "webhook" in exc.message.lower():
            if self.delete_webhook:
                log.warning("a webhook is set for this bot; deleting it to poll "
                            "(DELETE_WEBHOOK_ON_CONFLICT=false keeps it)")
                await self.bot(DeleteWebhook(drop_pending_updates=False))
                raise _RetryNow from exc
            log.error("a webhook is set for this bot and DELETE_WEBHOOK_ON_CONFLICT=false; "
                      "cannot poll until it is removed")
            return
        # Another poller. Are we still the leader? A fenced instance steps down instead.
        lease = self._lease
        if lease is None or not await lease.renew():
            raise self._lose("409 conflict and the lock or epoch is no longer ours") from exc

    async def _before_conflict_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _RetryNow):
            return
        self._conflict_episode = state.attempt_number
        delay = state.upcoming_sleep
        if state.attempt_number == 1:
            log.debug("one 409 Conflict with a verified lease (likely a fenced instance's last "
                      "request); retrying at once")
        elif state.attempt_number == 2:
            log.warning(
                "409 Conflict again: another process polls this bot token; we hold the lock, so it "
                "is outside solobot's control. Backing off %.1f s (exponential up to 300 s)", delay,
            )
        else:
            log.debug("conflict retry %d in %.1f s", state.attempt_number, delay)

    async def _fetch_transient(self, offset: int | None, limit: int) -> list[Update]:
        transient = AsyncRetrying(
            retry=retry_if_exception_type((TelegramRetryAfter, *TRANSIENT_ERRORS)),
            wait=transient_wait,
            before_sleep=self._before_transient_retry,
            reraise=True,
        )
        async for attempt in transient:
            with attempt:
                timeout = 0 if self._quick_poll else self.polling_timeout
                method = GetUpdates(offset=offset, limit=limit, timeout=timeout,
                                    allowed_updates=self.allowed_updates)
                updates = await self.bot(method, request_timeout=timeout + REQUEST_TIMEOUT_ALLOWANCE)
        now = time.monotonic()
        recovered = self.outage.success(now)
        if recovered:
            log.info("%s", recovered)
        self._quick_poll = False
        self.stats.last_ok = now
        return list(updates)

    async def _before_transient_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        kind = "rate_limited" if isinstance(exc, TelegramRetryAfter) else type(exc).__name__
        self.stats.count_error(kind)
        self._quick_poll = True
        line = self.outage.failure(time.monotonic(), f"{type(exc).__name__}: {exc}")
        if line:
            log.warning("%s in %.1f s", line, state.upcoming_sleep)
        else:
            log.debug("getUpdates retry %d in %.1f s", state.attempt_number, state.upcoming_sleep)


def _shifted(state: RetryCallState) -> RetryCallState:
    """The conflict backoff counts from the second 409: the first one was retried at once."""
    shifted = RetryCallState(state.retry_object, state.fn, state.args, state.kwargs)
    shifted.attempt_number = max(1, state.attempt_number - 1)
    return shifted
