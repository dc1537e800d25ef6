"""A new leader's takeover of the inbox: deaths counted, poison set aside, the backlog paged in.

The policy (who is tracked, who runs alone, who is set aside) is :mod:`utils.updates.poison`;
the SQL is :mod:`utils.state.recovery`; :class:`utils.updates.pipeline.UpdatePipeline` calls
the hooks here. What it costs: in normal running nothing; after a takeover, one transaction
that touches only the rows with a started record or a death, then the backlog in pages of
:data:`BACKLOG_PAGE` while the first getUpdates is already out; after a *death* (no clean
release), the started records of the updates it took over (one transaction per scheduling round),
and one done mark per update that runs alone.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from utils.base.lease import Lease
from utils.state.inbox import InboxEntry
from utils.state.recovery import STARTED_ALONE, STARTED_WITH_OTHERS
from utils.state.store import StateStore
from utils.updates.group_commit import GroupCommit
from utils.updates.poison import RecoveryBook, Verdict, update_type, verdict
from utils.updates.stats import UpdateStats

log = logging.getLogger("solobot.updates")

#: Taken-over rows are claimed and queued this many at a time ...
BACKLOG_PAGE = 500
#: ... whenever the leader holds fewer than this many: memory stays bounded by the queue ahead
#: of the handlers, not by the backlog (up to INBOX_MAX, or more stored by webhook replicas).
BACKLOG_AHEAD = 1000


class Recovery:
    """One term's view of what it took over (see :mod:`utils.updates.poison` for the why)."""

    def __init__(self, store: StateStore, stats: UpdateStats, *, poison_after: int) -> None:
        self.store = store
        self.stats = stats
        self.poison_after = poison_after
        self.book = RecoveryBook(died=False, watermark=0, suspects=set(), loading=False)
        #: Chats with taken-over rows not paged in yet (None: not known yet): their new updates wait.
        self.backlog_chats: set[str] | None = None
        self._started: GroupCommit[tuple[int, int]] = GroupCommit(self._write_started, name="started records")
        self._ran_alone: set[int] = set()
        self._epoch = 0

    def _convicted(self, deaths: int, alone_deaths: int) -> bool:
        return verdict(deaths, alone_deaths, self.poison_after) is Verdict.SET_ASIDE

    async def begin(self, lease: Lease) -> list[InboxEntry]:
        """Count the deaths, set aside the convicted; the suspects to run alone (oldest first)."""
        died = not lease.previous_released
        self._epoch = lease.epoch
        takeover = await self.store.recovery.take_over(lease.epoch, predecessor_died=died,
                                                       convict=self._convicted)
        for row in takeover.set_aside:
            self.stats.set_aside += 1
            log.error("update %d (%s, %s) set aside: its handler was running at %d deaths of the process "
                      "(POISON_AFTER=%d); the chat goes on with its next update. "
                      "See `python main.py inbox`; retry with `inbox retry %d`, drop with `inbox drop %d`",
                      row.update_id, row.chat_key or "no chat", update_type(row.payload), row.deaths,
                      self.poison_after, row.update_id, row.update_id)
        suspects = [s.entry for s in takeover.suspects]
        self.book = RecoveryBook(died=died, watermark=takeover.watermark, suspects={e.seq for e in suspects})
        self.backlog_chats = None
        if suspects:
            log.warning("%d update(s) were running when a leader died; they run one at a time first: %s",
                        len(suspects), ", ".join(f"{s.entry.update_id} ({s.deaths} death(s))"
                                                 for s in takeover.suspects))
        elif died:
            log.info("the last leader died (no clean release): the updates it left run under a started record")
        return suspects

    async def load_chats(self, lease: Lease) -> None:
        """Learn which chats have taken-over rows still to page in (their new updates wait)."""
        self.backlog_chats = set(await self.store.recovery.backlog_chats(
            lease.epoch, after=self.book.cursor, until=self.book.watermark))

    async def next_page(self, lease: Lease) -> list[InboxEntry]:
        """Claim the next page of the backlog; empty once it is all paged in."""
        if not self.book.loading:
            return []
        entries = await self.store.recovery.claim_page(lease.epoch, after=self.book.cursor,
                                                       until=self.book.watermark, limit=BACKLOG_PAGE)
        self.book.paged(entries[-1].seq if entries else None)
        if not self.book.loading:
            self.backlog_chats = set()
        return entries

    def must_wait(self, chat_key: str | None) -> bool:
        """Must a new update wait for the backlog (its chat may have older rows not paged in)?"""
        if not self.book.loading:
            return False
        return chat_key is not None and (self.backlog_chats is None or chat_key in self.backlog_chats)

    async def before_run(self, seq: int, lease: Lease, *, alone: bool) -> None:
        """A tracked update's durable started record, before its handler runs. Handlers starting
        together share one transaction (group commit: the records of one scheduling round)."""
        if not self.book.tracks(seq):
            return
        await self._started.submit((seq, STARTED_ALONE if alone else STARTED_WITH_OTHERS))
        if alone:
            self._ran_alone.add(seq)

    async def after_run(self, seq: int, lease: Lease,
                        mark_done: Callable[[Sequence[int], int], Awaitable[None]]) -> bool:
        """True if the update is durably done now. One that ran alone is marked done at once,
        before anything else starts, so no later death is counted against it; the others go
        through the group commit of done marks (one finished in its window and caught by a
        death counts that death "with others": it runs alone once more, nothing worse)."""
        if seq not in self._ran_alone:
            return False
        await mark_done([seq], lease.epoch)  # with the state its handler wrote (utils/state/fsm.py)
        self._ran_alone.discard(seq)
        return True

    async def end_alone_phase(self, seq: int, lease: Lease) -> None:
        """*seq* has run alone for long (a slow handler, not a crash): rewrite its record as "with
        others" (durably, first), then let the others run beside it for the rest of the term."""
        await self.store.recovery.mark_started_batch([(seq, STARTED_WITH_OTHERS)], lease.epoch)
        self._ran_alone.discard(seq)
        self.book.alone_ended = True

    async def _write_started(self, started: Sequence[tuple[int, int]]) -> list[bool]:
        await self.store.recovery.mark_started_batch(started, self._epoch)
        return [True] * len(started)
