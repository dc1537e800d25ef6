"""The update pipeline: durable inbox -> per-chat workers -> done marks, on the active instance.

Why this shape (and not aiogram's ``start_polling``): aiogram confirms an update to Telegram
before its handler ran, runs every update of a chat concurrently (replies out of order), and has
no notion of a leader. Here an update is confirmed to Telegram only once it is in the inbox (one
transaction per batch), so nothing acknowledged is lost by a crash; the offset never waits for
handlers, so a slow handler holds only its own chat; and done marks are group-committed and fenced
by the epoch, so a new leader runs exactly what the last one did not finish.

A handler killed midway runs again on the next leader (at-least-once for side effects): its
workflow data carries ``attempt`` (1 the first time) so it can use the update id as an
idempotency key. A finished handler never runs again.

Source -> sink (grammY's runner names it so: a source fetches, a sink takes a batch and answers
how many more it can take). :class:`UpdatePipeline` is the one sink; updates reach it from two
sources, each a role of the leadership controller:

* polling (:class:`~utils.updates.polling.PollingManager`): fetched batches, each stored with the
  offset that confirms it (:meth:`UpdatePipeline.put_fetched`);
* webhook adoption (:class:`~utils.updates.webhook.WebhookRole`): rows any replica's receiver
  stored unclaimed (:meth:`UpdatePipeline.take_stored`; also the sink's own sweep for rows an
  operator put back, in polling mode).

Both calls answer the sink's :attr:`~UpdatePipeline.room` (how many more updates it takes before
``INBOX_MAX``); a source that is told 0 waits in :meth:`UpdatePipeline.until_room` before it takes
more, and polling asks Telegram for no more than the room (``getUpdates`` ``limit``). So a flood
waits at Telegram or in the database, never in this process's memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence

from aiogram import Bot, Dispatcher
from aiogram.dispatcher.middlewares.user_context import UserContextMiddleware
from aiogram.fsm.strategy import FSMStrategy
from aiogram.methods import TelegramMethod
from aiogram.types import Update

from utils.base.interrupt import set_within
from utils.base.lease import Lease, LeaseLost
from utils.base.lookup import cancel_within, within
from utils.state.fencing import FencedError
from utils.state.fsm import NoWrites, UpdateWrites
from utils.state.inbox import InboxEntry, NewUpdate
from utils.state.store import StateStore
from utils.updates.ledger import ChatQueues, DoneMarks, QueuedUpdate
from utils.updates.poison import POISON_AFTER_DEFAULT
from utils.updates.recovery import BACKLOG_AHEAD, Recovery
from utils.updates.stats import UpdateStats

log = logging.getLogger("solobot.updates")

#: Group commit of done marks: at most this many per transaction, at most this late.
DONE_BATCH = 100
DONE_DELAY = 0.025
#: A failed done-mark flush is retried after this long (the marks are kept meanwhile).
FLUSH_RETRY = 0.5
#: The last flush at stop may take this long at most.
FINAL_FLUSH_TIMEOUT = 3.0
#: Handlers cancelled at the drain deadline, and the backlog loader and the done-mark flusher at
#: stop, get this long to unwind before stop moves on (a query cancelled on a silent database
#: would otherwise hold the stop for psycopg's cancellation, about 10 s).
CANCEL_GRACE = 1.0
#: Done rows past the de-duplication window are pruned every this many flushes.
PRUNE_EVERY_FLUSHES = 500
#: The leader looks for rows nobody claimed (a retried poison update) this often.
UNCLAIMED_SWEEP = 2.0


def chat_key(update: Update, strategy: FSMStrategy = FSMStrategy.USER_IN_CHAT) -> str | None:
    """The ordering key: the chat, else the user, else None (the update runs on its own).

    It follows the dispatcher's FSM strategy, so two updates that can touch the same FSM storage
    key never run at once: every strategy but ``GLOBAL_USER`` keys state within a chat, so the
    chat orders them; ``GLOBAL_USER`` keys it by user across chats, so the user does. An update
    without a chat (an inline query, a callback from an inline message) is keyed by aiogram on the
    user's private chat (``FSMContextMiddleware.resolve_context``: chat_id = user_id), so it queues
    behind that chat: ``c:<user>``.
    """
    context = UserContextMiddleware.resolve_event_context(update)
    if strategy is FSMStrategy.GLOBAL_USER and context.user is not None:
        return f"u:{context.user.id}"
    if context.chat is not None:
        return f"c:{context.chat.id}"
    if context.user is not None:
        return f"c:{context.user.id}"
    return None


def to_new_update(update: Update, strategy: FSMStrategy = FSMStrategy.USER_IN_CHAT) -> NewUpdate:
    payload = update.model_dump_json(exclude_unset=True)
    fingerprint = hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()
    return NewUpdate(update.update_id, fingerprint, chat_key(update, strategy), payload)


class UpdatePipeline:
    """The sink of both update sources; runs while active, started by the source's role (polling or
    webhook) and stopped by it after the source stopped."""

    def __init__(
        self,
        bot: Bot,
        dispatcher: Dispatcher,
        store: StateStore,
        stats: UpdateStats,
        *,
        step_down: Callable[[str], None],
        concurrency: int = 16,
        drain_timeout: float = 5.0,
        warn_seconds: float = 30.0,
        inbox_max: int = 10_000,
        on_drain_deadline: Callable[[], object] | None = None,
        state_writes: UpdateWrites | None = None,
        poison_after: int = POISON_AFTER_DEFAULT,
        sweep_unclaimed: bool = True,
    ) -> None:
        self.bot = bot
        self.dp = dispatcher
        self.store = store
        self.stats = stats
        self.step_down = step_down
        self.concurrency = concurrency
        self.drain_timeout = drain_timeout
        self.warn_seconds = warn_seconds
        self.inbox_max = inbox_max
        #: Called at the drain deadline, before handlers are cancelled (the flood limiter ends
        #: the sends still waiting for a slot, so those handlers end without sending).
        #: Look for unclaimed rows on a timer (False where another loop adopts them: webhook mode).
        self.sweep_unclaimed = sweep_unclaimed
        self.on_drain_deadline = on_drain_deadline
        #: The FSM storage's writes ride on the done marks (utils/state/fsm.py).
        self.state_writes: UpdateWrites = state_writes or NoWrites()
        self._lease: Lease | None = None
        self._queues = ChatQueues(concurrency)
        self._marks = DoneMarks(max_batch=DONE_BATCH, max_delay=DONE_DELAY)
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._running: dict[asyncio.Task[None], QueuedUpdate] = {}
        self._marked = asyncio.Event()
        self._batch_full = asyncio.Event()
        self._room = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._stopping = False
        self._held = False
        self._flushes = 0
        # Takeover, poison updates and the backlog in pages (utils/updates/recovery.py).
        self.poison_after = poison_after
        self._recovery = Recovery(store, stats, poison_after=poison_after)
        self._deferred: list[QueuedUpdate] = []  # new updates waiting for their chat's backlog
        self._loader: asyncio.Task[None] | None = None
        self._ahead_room = asyncio.Event()
        self._tasks_aside: set[asyncio.Task[None]] = set()  # ending an alone phase (held, not awaited)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, lease: Lease, *, hold: bool = False) -> None:
        """Take over what the inbox holds unfinished (oldest first), then accept new updates.

        With *hold*, the unfinished updates wait in their chats' queues until :meth:`release`:
        the polling role sends its first getUpdates before the recovered handlers compete for the
        event loop, so a takeover under load is not slowed by the work it takes over.
        """
        self._lease = lease
        self._queues = ChatQueues(self.concurrency)
        self._marks = DoneMarks(max_batch=DONE_BATCH, max_delay=DONE_DELAY)
        self._tasks = {}
        self._running = {}
        self._stopping = False
        self._held = hold
        self.state_writes.reset()
        await lease.ensure()
        # The backlog is paged in by _load_backlog once released; here only the suspects.
        self._recovery = Recovery(self.store, self.stats, poison_after=self.poison_after)
        self._deferred = []
        self._push([self._from_entry(e) for e in await self._recovery.begin(lease)], backlog=True)
        self._flusher = asyncio.create_task(self._flush_loop(), name="solobot-done-marks")
        if not hold:
            self._start_loader()

    def release(self) -> None:
        """Start the handlers :meth:`start` held back."""
        if self._held:
            self._held = False
            self._start_loader()
            self._schedule()

    async def stop(self) -> None:
        """Bounded whatever the handlers do: drain up to the deadline, flush done marks."""
        self._stopping = True
        loader, self._loader = self._loader, None
        if loader is not None:
            await cancel_within(loader, CANCEL_GRACE)
        self._deferred = []
        for task in self._tasks_aside:  # an alone phase ending belongs to this term only
            task.cancel()
        dropped = self._queues.drop_waiting()
        tasks = list(self._tasks.values())
        if tasks:
            log.info("draining %d running handler(s) (up to %.1f s); %d queued stay in the inbox",
                     len(tasks), self.drain_timeout, len(dropped))
            _, pending = await asyncio.wait(tasks, timeout=self.drain_timeout)
            if pending and self.on_drain_deadline is not None:
                # Sends still waiting for their slot give up unsent: their handlers end, not done;
                # a handler whose send is on the wire gets its answer and finishes (done, once).
                self.on_drain_deadline()
                _, pending = await asyncio.wait(pending, timeout=CANCEL_GRACE)
            if pending:
                log.warning("%d handler(s) did not finish within DRAIN_TIMEOUT (%.1f s): cancelled; "
                            "they stay in the inbox and the next leader runs them again",
                            len(pending), self.drain_timeout)
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=CANCEL_GRACE)
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            await cancel_within(flusher, CANCEL_GRACE)
        try:
            await within(self._flush(final=True), FINAL_FLUSH_TIMEOUT, name="the last done-mark flush")
        except Exception as exc:  # noqa: BLE001 - the next leader re-runs what is not marked
            log.warning("could not record %d finished update(s) as done: %s", len(self._marks),
                        self.store.describe_error(exc))
        self.stats.inbox_waiting = 0
        self._lease = None

    # -- accepting ---------------------------------------------------------------------------

    @property
    def room(self) -> int:
        """How many more updates the sink takes now: ``INBOX_MAX`` minus what this leader holds
        unfinished (0 when full)."""
        return max(0, self.inbox_max - self._holding)

    async def until_room(self) -> int:
        """Return the room once there is some: a source waits here before it takes more."""
        if self.room:
            return self.room
        log.warning("inbox full (%d updates waiting >= INBOX_MAX); taking new updates pauses until it "
                    "drains", self._holding)
        while not self.room:
            self._room.clear()
            await self._room.wait()
        log.info("inbox has room again (%d waiting); taking new updates resumes", self._holding)
        return self.room

    async def put_fetched(self, updates: Sequence[Update], *, next_offset: int | None) -> int:
        """The polling source's batch: store it durably (with the offset that confirms it), then
        queue it; return the room left.

        Raises :class:`FencedError` if a newer leader exists (nothing was stored).
        """
        lease = self._lease
        if lease is None:
            raise LeaseLost("the pipeline is not running")
        await lease.ensure()
        rows = [to_new_update(u, self.dp.fsm.strategy) for u in updates]
        batch = await self.store.inbox.store_batch(rows, epoch=lease.epoch, next_offset=next_offset)
        self.stats.fetched += len(rows)
        self.stats.duplicates += batch.duplicates
        if self._stopping:
            return self.room  # stored: the next leader runs them
        parsed = {(r.update_id, r.fingerprint): u for r, u in zip(rows, updates, strict=True)}
        fingerprints = {r.update_id: r.fingerprint for r in rows}
        items = [self._from_entry(e, parsed.get((e.update_id, fingerprints.get(e.update_id, ""))))
                 for e in batch.new]
        # A duplicate still waiting that this leader does not hold (stored by a fenced leader in
        # the instant before it was fenced): take it too, rather than let it wait for a handover.
        items += [self._from_entry(e) for e in batch.waiting_duplicates
                  if not self._queues.knows(e.seq) and not self._recovery.book.will_load(e.seq)]
        if batch.duplicates:
            log.debug("%d update(s) already in the inbox; skipped", batch.duplicates)
        self._push(items)
        return self.room

    @property
    def resuming(self) -> bool:
        """The taken-over backlog is still being paged in: new rows wait behind it, so
        :meth:`take_stored` takes none yet (it answers the room)."""
        return self._recovery.book.loading

    async def take_stored(self) -> int:
        """The webhook source: claim the rows stored unclaimed (by any replica's receiver, or put
        back by an operator), oldest first and at most the room; return the room left, or 0 when
        more may wait.

        The caller decides when (a notification, a timer). 0 after the call means more may wait:
        the claim took as many rows as it asked for (even if handlers that finished meanwhile made
        room again), so wait in :meth:`until_room` (at once if there is room) and call again; more
        than 0 means the claim found fewer rows than it asked for: none was left.
        """
        lease = self._lease
        if lease is None or self._stopping or self.resuming:
            return self.room  # the backlog loader takes unclaimed rows of the takeover in order
        room = self.room
        if not room:
            return 0
        await lease.ensure()
        entries = await self.store.inbox.claim_unclaimed(lease.epoch, room)
        self._push([self._from_entry(e) for e in entries if not self._queues.knows(e.seq)])
        if entries:
            log.debug("took %d stored update(s) from the inbox", len(entries))
        return 0 if len(entries) == room else self.room

    def _from_entry(self, entry: InboxEntry, update: Update | None = None) -> QueuedUpdate:
        return QueuedUpdate(entry.seq, entry.update_id, entry.chat_key, entry.attempt, entry.payload, update)

    def _push(self, items: Sequence[QueuedUpdate], *, backlog: bool = False) -> None:
        if not backlog and self._recovery.book.loading:  # behind their chats' older rows
            self._deferred += [i for i in items if self._recovery.must_wait(i.chat_key)]
            items = [i for i in items if not self._recovery.must_wait(i.chat_key)]
        self._queues.extend(items)
        self._schedule()

    @property
    def _holding(self) -> int:
        """Updates this leader holds and has not finished: what counts against ``INBOX_MAX``."""
        return self._queues.held + len(self._deferred)

    # -- the backlog of a takeover -----------------------------------------------------------

    def _start_loader(self) -> None:
        if self._loader is None and self._lease is not None and not self._stopping:
            self._loader = asyncio.create_task(self._load_backlog(self._lease), name="solobot-backlog")

    async def _load_backlog(self, lease: Lease) -> None:
        """Page the taken-over rows in, oldest first, while fewer than BACKLOG_AHEAD are held;
        then queue the new updates that waited behind them."""
        recovery = self._recovery
        failures = 0
        while recovery.book.loading:
            try:
                if recovery.backlog_chats is None:
                    await recovery.load_chats(lease)
                    deferred, self._deferred = self._deferred, []
                    self._push(deferred)  # those of chats without a backlog go now
                while self._queues.held >= BACKLOG_AHEAD:
                    self._ahead_room.clear()
                    await self._ahead_room.wait()
                page = await recovery.next_page(lease)
            except FencedError as exc:
                self.step_down(f"fenced while taking over the inbox: {exc}")
                return
            except LeaseLost:
                return
            except Exception as exc:  # noqa: BLE001 - the database is down: the rows wait; retry
                failures += 1
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "could not take over waiting updates (%s); retrying", self.store.describe_error(exc))
                await asyncio.sleep(FLUSH_RETRY)
                continue
            if page:
                log.info("resuming %d update(s) the inbox holds unfinished (up to seq %d)", len(page), page[-1].seq)
            self._push([self._from_entry(e) for e in page], backlog=True)
        deferred, self._deferred = self._deferred, []
        self._push(deferred)
        if self.sweep_unclaimed:
            await self._sweep_unclaimed()

    async def _sweep_unclaimed(self) -> None:
        """Take rows nobody claimed (an operator's ``inbox retry``) every :data:`UNCLAIMED_SWEEP`:
        one indexed query. Polling mode only: in webhook mode the webhook role's adoption loop
        takes every unclaimed row already."""
        while not self._stopping:
            await asyncio.sleep(UNCLAIMED_SWEEP)
            try:
                if await self.store.inbox.has_unclaimed():
                    await self.take_stored()
            except FencedError as exc:
                self.step_down(f"fenced while taking unclaimed updates: {exc}")
                return
            except LeaseLost:
                return
            except Exception as exc:  # noqa: BLE001 - the database is down: next sweep
                log.debug("could not look for unclaimed updates: %s", exc)

    # -- workers -----------------------------------------------------------------------------

    def _schedule(self) -> None:
        # One at a time while a suspect of a death has not finished (utils/updates/poison.py).
        self._queues.concurrency = 1 if self._recovery.book.alone_phase else self.concurrency
        if not self._stopping and not self._held:
            for item in self._queues.take_runnable():
                task = asyncio.create_task(self._run(item), name=f"solobot-update-{item.update_id}")
                self._tasks[item.seq] = task
                self._running[task] = item
        self.stats.inbox_waiting = self._holding

    async def _run(self, item: QueuedUpdate) -> None:
        loop = asyncio.get_running_loop()
        warning = loop.call_later(self.warn_seconds, self._warn_slow, item)
        started = time.monotonic()
        done = durable = False
        try:
            if not await self._before_run(item):
                return
            update = item.update or Update.model_validate_json(item.payload, context={"bot": self.bot})
            if item.attempt > 1:
                self.stats.redelivered += 1
            self.state_writes.begin_update(item.seq)
            try:
                result = await self.dp.feed_update(self.bot, update, attempt=item.attempt)
                if isinstance(result, TelegramMethod):
                    await self.bot(result)
            except LeaseLost as exc:
                # While stopping the stop's own lines say it once for all (the drain deadline).
                log.log(logging.DEBUG if self._stopping else logging.INFO,
                        "update %d not finished: %s; the next leader runs it", item.update_id, exc)
                return
            except Exception:  # a handler bug must not stop the pipeline; it counts as handled
                self.stats.handler_errors += 1
                log.exception("handler for update %d failed", item.update_id)
            done = True
            self.state_writes.end_update(item.seq, done=True)  # its FSM writes join its done mark
            durable = await self._after_run(item)
        finally:
            warning.cancel()
            self.state_writes.end_update(item.seq, done=done)
            task = self._tasks.pop(item.seq, None)
            if task is not None:
                self._running.pop(task, None)
            self._queues.finish(item)
            self._recovery.book.finished(item.seq)
            if self._queues.held < BACKLOG_AHEAD:
                self._ahead_room.set()
            if done:
                self.stats.handled += 1
                self.stats.handler_seconds.observe(time.monotonic() - started)
            if done and not durable:
                self._marks.add(item.seq, time.monotonic())
                self._marked.set()
                if len(self._marks) >= DONE_BATCH:
                    self._batch_full.set()
            if self._queues.held < self.inbox_max:
                self._room.set()
            self._schedule()

    def waiting_to_send(self, task: asyncio.Task[object], waiting: bool) -> None:
        """A handler's send waits (or stopped waiting) for its slot: it frees its concurrency
        slot meanwhile, so waiting holds only its own chat (``ChatQueues.park``). Not while a
        suspect of a death runs alone: nothing may run beside it (utils/updates/poison.py)."""
        item = self._running.get(task)  # type: ignore[arg-type]
        if item is not None and not (waiting and self._recovery.book.alone_phase):
            self._queues.park(item, waiting)
            if waiting:
                self._schedule()

    async def _before_run(self, item: QueuedUpdate) -> bool:
        """The started record of a tracked update (after a death); False: do not run it now."""
        failures = 0
        while (lease := self._lease) is not None and not self._stopping:
            try:
                await self._recovery.before_run(item.seq, lease, alone=self._recovery.book.alone_phase)
                return True
            except FencedError as exc:
                self.step_down(f"fenced while recording a started update: {exc}")
                return False
            except Exception as exc:  # noqa: BLE001 - its chat waits, as behind a slow handler
                failures += 1
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "update %d waits: could not record it as started (%s); retrying",
                        item.update_id, self.store.describe_error(exc))
                await asyncio.sleep(FLUSH_RETRY)
        return False

    async def _after_run(self, item: QueuedUpdate) -> bool:
        """True if the update is durably done already (one that ran alone); else the group commit
        does it. An update that ran alone holds its slot until its done mark is durable: if the
        others started first, a death before that mark would be counted as an alone death
        against an update that had finished (utils/updates/poison.py)."""
        failures = 0
        while (lease := self._lease) is not None:
            try:
                return await self._recovery.after_run(item.seq, lease, self._mark_done)
            except FencedError as exc:
                self.step_down(f"fenced while recording an update done: {exc}")
                return False
            except Exception as exc:  # noqa: BLE001 - nothing else starts meanwhile; retried
                if self._stopping:
                    break
                failures += 1
                log.log(logging.WARNING if failures == 1 else logging.DEBUG,
                        "update %d ran alone: could not record it as done (%s); retrying",
                        item.update_id, self.store.describe_error(exc))
                await asyncio.sleep(FLUSH_RETRY)
        return False  # stopping or lease gone: the final flush (or the next leader) records it

    async def _mark_done(self, seqs: Sequence[int], epoch: int) -> None:
        """Record *seqs* as done, with the FSM state their handlers wrote, in one fenced transaction."""
        async with self.state_writes.committing(seqs, epoch) as state:
            await self.store.inbox.mark_done(seqs, epoch, also=state)

    def _warn_slow(self, item: QueuedUpdate) -> None:
        if self._recovery.book.alone_phase:  # a slow suspect must not hold every chat for long
            log.warning("handler for update %d (%s), a suspect of a death running alone, still running after "
                        "%.0f s (HANDLER_WARN_SECONDS): the other chats run beside it", item.update_id,
                        item.chat_key or "no chat", self.warn_seconds)
            task = asyncio.create_task(self._end_alone_phase(item), name="solobot-end-alone")
            self._tasks_aside.add(task)
            task.add_done_callback(self._tasks_aside.discard)
            return
        log.warning("handler for update %d (%s) still running after %.0f s (HANDLER_WARN_SECONDS); "
                    "only its chat waits", item.update_id, item.chat_key or "no chat", self.warn_seconds)

    async def _end_alone_phase(self, item: QueuedUpdate) -> None:
        lease = self._lease
        if lease is None or self._stopping:
            return
        try:
            await self._recovery.end_alone_phase(item.seq, lease)
        except Exception as exc:  # noqa: BLE001 - it stays alone: slower, never wrong
            log.warning("could not rewrite the started record of update %d (%s); it keeps running alone",
                        item.update_id, self.store.describe_error(exc))
            return
        self._schedule()

    # -- done marks --------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await self._marked.wait()
            due = self._marks.due_in(time.monotonic())
            if due:
                await set_within(self._batch_full, due)
            self._marked.clear()
            self._batch_full.clear()
            try:
                await self._flush()
            except FencedError as exc:
                self.step_down(f"fenced while recording finished updates: {exc}")
                return
            except LeaseLost:
                return
            except Exception as exc:  # noqa: BLE001 - keep the marks, try again shortly
                log.warning("could not record finished updates as done (%s); retrying",
                            self.store.describe_error(exc))
                self._marked.set()
                await asyncio.sleep(FLUSH_RETRY)

    async def _flush(self, *, final: bool = False) -> None:
        lease = self._lease
        if lease is None or not len(self._marks):
            return
        oldest = self._marks.oldest_age(time.monotonic())
        seqs = self._marks.take()
        started = time.monotonic()
        try:
            if not final:
                await lease.ensure()
            await self._mark_done(seqs, lease.epoch)
        except BaseException:
            self._marks.put_back(seqs, time.monotonic())
            raise
        log.debug("recorded %d update(s) as done in %.1f ms (the oldest finished %.1f ms before)",
                  len(seqs), (time.monotonic() - started) * 1000, (oldest or 0.0) * 1000)
        self._flushes += 1
        if self._flushes % PRUNE_EVERY_FLUSHES == 0:
            pruned = await self.store.inbox.prune()
            log.debug("pruned %d done update(s) past the de-duplication window", pruned)
