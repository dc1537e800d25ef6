"""The inbox as a new leader sees it: deaths counted, started records, the backlog in pages,
and the updates set aside (poison). The policy is :mod:`utils.updates.poison`; this is its SQL.

A set-aside row keeps ``done_at`` (it waits for no leader, is no duplicate to re-run, and the
inbox depth does not count it) and has ``set_aside_at``; pruning keeps it until an operator
retries it (back to waiting, unclaimed) or drops it (an ordinary done row).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from utils.state.fencing import epoch_is_current, hold_epoch, raise_if_fenced
from utils.state.inbox import InboxEntry
from utils.state.schema import aware, inbox_table, utcnow

#: ``run_started`` values: the handler of a taken-over update started, with others running or alone.
STARTED_WITH_OTHERS, STARTED_ALONE = 1, 2


@dataclass(frozen=True)
class Suspect:
    """A waiting row that was running at one death or more."""

    entry: InboxEntry
    deaths: int
    alone_deaths: int


@dataclass(frozen=True)
class SetAsideRow:
    seq: int
    update_id: int
    chat_key: str | None
    payload: str
    deaths: int
    set_aside_at: dt.datetime | None


@dataclass(frozen=True)
class Takeover:
    """What :meth:`RecoveryRepository.take_over` found."""

    watermark: int  # the highest seq at the takeover
    suspects: list[Suspect]  # to run alone, claimed by this epoch, oldest first
    set_aside: list[SetAsideRow]  # set aside just now


_ENTRY_COLUMNS = (inbox_table.c.seq, inbox_table.c.update_id, inbox_table.c.chat_key,
                  inbox_table.c.payload, inbox_table.c.attempts)


def _entry(row: Any) -> InboxEntry:
    return InboxEntry(int(row.seq), int(row.update_id), row.chat_key, row.payload, int(row.attempts))


class RecoveryRepository:
    def __init__(self, engine: AsyncEngine, bot_id: int) -> None:
        self.engine = engine
        self.bot_id = bot_id
        self._mine = inbox_table.c.bot_id == bot_id
        self._waiting = sa.and_(self._mine, inbox_table.c.done_at.is_(None))
        self._started_statement = (
            sa.update(inbox_table)
            .where(self._mine, inbox_table.c.seq.in_(sa.bindparam("seqs", expanding=True)),
                   epoch_is_current(engine.dialect.name, bot_id))
            .values(run_started=sa.bindparam("started_kind"))
        )

    async def take_over(
        self, epoch: int, *, predecessor_died: bool, convict: Callable[[int, int], bool]
    ) -> Takeover:
        """Count the deaths, set aside the convicted (*convict(deaths, alone_deaths)*), claim the
        suspects; one fenced transaction that touches only rows with a started record or a death.
        """
        now = utcnow()
        async with self.engine.begin() as conn:
            await hold_epoch(conn, self.bot_id, epoch)
            started = sa.and_(self._waiting, inbox_table.c.run_started.is_not(None))
            if predecessor_died:
                alone = sa.case((inbox_table.c.run_started == STARTED_ALONE, 1), else_=0)
                await conn.execute(sa.update(inbox_table).where(started).values(
                    deaths=inbox_table.c.deaths + 1, alone_deaths=inbox_table.c.alone_deaths + alone,
                    run_started=None))
            else:  # a clean stop: a record left there is a handler cancelled at the drain, not a death
                await conn.execute(sa.update(inbox_table).where(started).values(run_started=None))
            rows = (await conn.execute(
                sa.select(*_ENTRY_COLUMNS, inbox_table.c.deaths, inbox_table.c.alone_deaths)
                .where(self._waiting, inbox_table.c.deaths > 0).order_by(inbox_table.c.seq)
            )).all()
            convicted = [r for r in rows if convict(int(r.deaths), int(r.alone_deaths))]
            kept = [r for r in rows if not convict(int(r.deaths), int(r.alone_deaths))]
            if convicted:
                await conn.execute(sa.update(inbox_table)
                                   .where(self._mine, inbox_table.c.seq.in_([r.seq for r in convicted]))
                                   .values(done_at=now, set_aside_at=now))
            if kept:
                await conn.execute(sa.update(inbox_table)
                                   .where(self._mine, inbox_table.c.seq.in_([r.seq for r in kept]))
                                   .values(attempts=inbox_table.c.attempts + 1, claimed_epoch=epoch))
            watermark = await conn.scalar(sa.select(sa.func.max(inbox_table.c.seq)).where(self._mine))
        suspects = [Suspect(InboxEntry(int(r.seq), int(r.update_id), r.chat_key, r.payload, int(r.attempts) + 1),
                            int(r.deaths), int(r.alone_deaths)) for r in kept]
        aside = [SetAsideRow(int(r.seq), int(r.update_id), r.chat_key, r.payload, int(r.deaths), now)
                 for r in convicted]
        return Takeover(int(watermark or 0), suspects, aside)

    async def claim_page(self, epoch: int, *, after: int, until: int, limit: int) -> list[InboxEntry]:
        """The next *limit* waiting rows with ``after < seq <= until`` that no leader of this
        epoch holds, claimed (fenced, counting the attempt); oldest first."""
        async with self.engine.begin() as conn:
            await hold_epoch(conn, self.bot_id, epoch)
            picked = (
                sa.select(inbox_table.c.seq)
                .where(self._waiting, inbox_table.c.seq > after, inbox_table.c.seq <= until,
                       sa.or_(inbox_table.c.claimed_epoch.is_(None), inbox_table.c.claimed_epoch < epoch))
                .order_by(inbox_table.c.seq).limit(limit)
            )
            rows = await conn.execute(
                sa.update(inbox_table)
                .where(self._mine, inbox_table.c.seq.in_(picked.scalar_subquery()))
                .values(attempts=inbox_table.c.attempts + 1, claimed_epoch=epoch)
                .returning(*_ENTRY_COLUMNS)
            )
            entries = [_entry(r) for r in rows]
        return sorted(entries, key=lambda e: e.seq)

    async def backlog_chats(self, epoch: int, *, after: int, until: int) -> list[str]:
        """The chats of the waiting rows :meth:`claim_page` has yet to page in (one per chat)."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(inbox_table.c.chat_key).distinct()
                .where(self._waiting, inbox_table.c.seq > after, inbox_table.c.seq <= until,
                       inbox_table.c.chat_key.is_not(None),
                       sa.or_(inbox_table.c.claimed_epoch.is_(None), inbox_table.c.claimed_epoch < epoch))
            )
            return [str(r.chat_key) for r in rows]

    async def mark_started_batch(self, started: Sequence[tuple[int, int]], epoch: int) -> None:
        """Started records ``(seq, kind)`` of handlers about to run, in one transaction (fenced)."""
        async with self.engine.begin() as conn:
            changed = 0
            for kind in sorted({k for _, k in started}):
                result = await conn.execute(self._started_statement, {
                    "seqs": [seq for seq, k in started if k == kind], "started_kind": kind, "epoch": epoch})
                changed += int(result.rowcount)
            if changed < len(started):
                await raise_if_fenced(conn, self.bot_id, epoch)

    # -- what an operator sees and does --------------------------------------------------------

    async def set_aside(self) -> list[SetAsideRow]:
        """Every update set aside, oldest first."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(inbox_table.c.seq, inbox_table.c.update_id, inbox_table.c.chat_key,
                          inbox_table.c.payload, inbox_table.c.deaths, inbox_table.c.set_aside_at)
                .where(self._mine, inbox_table.c.set_aside_at.is_not(None)).order_by(inbox_table.c.seq)
            )
            return [SetAsideRow(int(r.seq), int(r.update_id), r.chat_key, r.payload, int(r.deaths),
                                aware(r.set_aside_at)) for r in rows]

    async def exists(self) -> bool:
        """Has a leader ever created the inbox here? (An operator may ask before the first run.)"""
        async with self.engine.connect() as conn:
            return bool(await conn.run_sync(lambda sync: sa.inspect(sync).has_table(inbox_table.name)))

    async def count_set_aside(self) -> int:
        async with self.engine.connect() as conn:
            count = await conn.scalar(sa.select(sa.func.count())
                                      .where(self._mine, inbox_table.c.set_aside_at.is_not(None)))
        return int(count or 0)

    async def retry(self, update_ids: Sequence[int]) -> int:
        """Put set-aside updates back: waiting, unclaimed, no deaths; how many rows changed.

        Not fenced: an operator's act, like a replica's stored delivery. The leader takes it as it
        takes a replica's row (webhook mode at once, polling at its next check or takeover).
        """
        async with self.engine.begin() as conn:
            result = await conn.execute(
                sa.update(inbox_table)
                .where(self._mine, inbox_table.c.update_id.in_(list(update_ids)),
                       inbox_table.c.set_aside_at.is_not(None))
                .values(done_at=None, set_aside_at=None, deaths=0, alone_deaths=0, run_started=None,
                        claimed_epoch=None)
            )
        return int(result.rowcount)

    async def drop(self, update_ids: Sequence[int]) -> int:
        """Mark set-aside updates done for good (an ordinary done row); how many rows changed."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                sa.update(inbox_table)
                .where(self._mine, inbox_table.c.update_id.in_(list(update_ids)),
                       inbox_table.c.set_aside_at.is_not(None))
                .values(set_aside_at=None, done_at=utcnow())
            )
        return int(result.rowcount)
