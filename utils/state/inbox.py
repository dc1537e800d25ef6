"""The durable inbox: every update received is a row until its handler finished.

Polling writes each getUpdates batch in one transaction (with the offset that confirms it), and
only then confirms it to Telegram; webhook deliveries are stored before their 200, concurrent ones
in one transaction (``utils.updates.group_commit``).
Any process of the bot may write here; only the leader handles rows and marks them done.

De-duplication is on (update id, fingerprint of its content): a re-delivered update is
byte-for-byte the same, an unrelated update that reuses an id (ids restart per Bot API server and
after a week without updates) is not, so it is never skipped.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from utils.state.fencing import epoch_is_current, hold_epoch, raise_if_fenced
from utils.state.schema import aware, inbox_table, offset_table, utcnow

#: Done rows are kept this long for de-duplication: Telegram keeps (and may re-deliver) an
#: update for up to 24 hours.
DONE_RETENTION = dt.timedelta(hours=26)
#: ... and at most this many, whatever their age.
DONE_KEEP_MAX = 100_000


PG_INSERT_UNNEST = sa.text(
    "INSERT INTO solobot_inbox (bot_id, update_id, fingerprint, chat_key, payload, received_at, "
    "attempts, claimed_epoch) "
    "SELECT :bot_id, u.update_id, u.fingerprint, u.chat_key, u.payload, :now, :attempts, "
    "CAST(:epoch AS bigint) "
    "FROM unnest(CAST(:ids AS bigint[]), CAST(:fps AS text[]), CAST(:chats AS text[]), "
    "CAST(:payloads AS text[])) AS u(update_id, fingerprint, chat_key, payload) "
    "ON CONFLICT (bot_id, update_id, fingerprint) DO NOTHING "
    "RETURNING seq, update_id, fingerprint"
)


@dataclass(frozen=True)
class NewUpdate:
    """An update about to be stored."""

    update_id: int
    fingerprint: str
    chat_key: str | None
    payload: str  # the update as JSON


#: The range of the inbox's ``update_id`` column (a signed 64-bit integer, as Telegram's ids are).
UPDATE_ID_RANGE = range(-(1 << 63), 1 << 63)


def unstorable(update: NewUpdate) -> str | None:
    """Why *update* does not fit the inbox's columns, or None (pure): a delivery that cannot be
    stored is refused alone, before it shares a transaction with others."""
    if update.update_id not in UPDATE_ID_RANGE:
        return "update_id out of range"
    limit = getattr(inbox_table.c.chat_key.type, "length", None)
    if update.chat_key is not None and limit is not None and len(update.chat_key) > limit:
        return "chat or user id out of range"
    return None


def is_row_error(exc: BaseException) -> bool:
    """Whether a failed write was refused for the data of a row (not for the database being down):
    a value the database or the driver cannot hold. Retrying such a row alone settles it."""
    orig = getattr(exc, "orig", None)
    return isinstance(exc, (sa.exc.DataError, sa.exc.IntegrityError, OverflowError)) or isinstance(
        orig, (OverflowError, ValueError)) or (isinstance(exc, sa.exc.StatementError) and orig is None
                                               and "Overflow" in str(exc))


@dataclass(frozen=True)
class InboxEntry:
    """A stored update waiting to be handled."""

    seq: int  # insertion order: per-chat order follows it, whatever the update ids do
    update_id: int
    chat_key: str | None
    payload: str
    attempt: int  # 1 the first time a leader takes it; more after a crash or a cancelled drain


@dataclass(frozen=True)
class StoredBatch:
    new: list[InboxEntry]  # in the order given
    duplicates: int  # already in the inbox (handled or waiting)
    waiting_duplicates: list[InboxEntry]  # of those, the ones still waiting (a caller may not know them)


def age_of(stored_at: dt.datetime | None) -> float | None:
    """Seconds since *stored_at* (a UTC time from the database), None for none."""
    when = aware(stored_at)
    return (utcnow() - when).total_seconds() if when is not None else None


class InboxRepository:
    def __init__(self, engine: AsyncEngine, bot_id: int) -> None:
        self.engine = engine
        self.bot_id = bot_id
        self._is_postgres = engine.dialect.name == "postgresql"
        self._insert: Any = postgresql.insert if self._is_postgres else sqlite.insert
        self._insert_statement = (
            self._insert(inbox_table)
            .on_conflict_do_nothing(index_elements=["bot_id", "update_id", "fingerprint"])
            .returning(inbox_table.c.seq, inbox_table.c.update_id, inbox_table.c.fingerprint)
        )
        self._done_statement = (
            sa.update(inbox_table)
            .where(inbox_table.c.bot_id == self.bot_id,
                   inbox_table.c.seq.in_(sa.bindparam("seqs", expanding=True)),
                   epoch_is_current(engine.dialect.name, self.bot_id))
            .values(done_at=sa.bindparam("now"))
        )

    async def store_batch(
        self, updates: Sequence[NewUpdate], *, epoch: int | None, next_offset: int | None = None
    ) -> StoredBatch:
        """Store *updates* in one transaction; with *epoch* (the leader) fenced and claimed.

        *next_offset* (polling) is recorded in the same transaction: the offset that will confirm
        this batch to Telegram is durable exactly when the batch is.
        """
        now = utcnow()
        attempt = 1 if epoch is not None else 0
        rows = [
            {"bot_id": self.bot_id, "update_id": u.update_id, "fingerprint": u.fingerprint,
             "chat_key": u.chat_key, "payload": u.payload, "received_at": now,
             "attempts": attempt, "claimed_epoch": epoch}
            for u in updates
        ]
        async with self.engine.begin() as conn:
            if epoch is not None:
                await hold_epoch(conn, self.bot_id, epoch)
                if next_offset is not None:
                    await self._save_offset(conn, next_offset, epoch, now)
            inserted: dict[tuple[int, str], int] = {}
            if rows:
                for seq, update_id, fingerprint in await self._insert_rows(conn, rows):
                    inserted[(int(update_id), str(fingerprint))] = int(seq)
            new = [InboxEntry(inserted[(u.update_id, u.fingerprint)], u.update_id, u.chat_key,
                              u.payload, attempt)
                   for u in updates if (u.update_id, u.fingerprint) in inserted]
            seen = [u for u in updates if (u.update_id, u.fingerprint) not in inserted]
            waiting = await self._waiting_among(conn, seen) if seen else []
        return StoredBatch(new=new, duplicates=len(seen), waiting_duplicates=waiting)

    async def _insert_rows(self, conn: Any, rows: list[dict[str, Any]]) -> Any:
        """Insert, skipping duplicates; the (seq, update_id, fingerprint) of the new rows.

        One statement for every batch size, compiled once. PostgreSQL: the columns as arrays
        through ``unnest`` (a third of the client CPU of a multi-row VALUES); SQLite: executemany.
        """
        if self._is_postgres:
            first = rows[0]
            return await conn.execute(PG_INSERT_UNNEST, {
                "bot_id": self.bot_id, "now": first["received_at"], "attempts": first["attempts"],
                "epoch": first["claimed_epoch"],
                "ids": [r["update_id"] for r in rows], "fps": [r["fingerprint"] for r in rows],
                "chats": [r["chat_key"] for r in rows], "payloads": [r["payload"] for r in rows],
            })
        return await conn.execute(self._insert_statement, rows)

    async def _waiting_among(self, conn: Any, updates: Sequence[NewUpdate]) -> list[InboxEntry]:
        keys = [(u.update_id, u.fingerprint) for u in updates]
        rows = await conn.execute(
            sa.select(inbox_table.c.seq, inbox_table.c.update_id, inbox_table.c.chat_key,
                      inbox_table.c.payload, inbox_table.c.attempts)
            .where(inbox_table.c.bot_id == self.bot_id, inbox_table.c.done_at.is_(None),
                   sa.tuple_(inbox_table.c.update_id, inbox_table.c.fingerprint).in_(keys))
            .order_by(inbox_table.c.seq)
        )
        return [InboxEntry(int(r.seq), int(r.update_id), r.chat_key, r.payload, max(1, int(r.attempts)))
                for r in rows]

    async def _save_offset(self, conn: Any, next_offset: int, epoch: int, now: dt.datetime) -> None:
        values = {"next_offset": next_offset, "epoch": epoch, "updated_at": now}
        statement = (
            self._insert(offset_table).values(bot_id=self.bot_id, **values)
            .on_conflict_do_update(index_elements=["bot_id"], set_=values)
        )
        await conn.execute(statement)

    async def load_offset(self) -> int | None:
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                sa.select(offset_table.c.next_offset).where(offset_table.c.bot_id == self.bot_id)
            )
        return None if value is None else int(value)

    async def claim_unclaimed(self, epoch: int, limit: int) -> list[InboxEntry]:
        """The leader takes rows other processes stored (webhook replicas), oldest first.

        Keyed on ``claimed_epoch IS NULL``, not on a sequence watermark: on PostgreSQL a row with a
        lower ``seq`` can commit after one with a higher, and must not be missed.
        """
        async with self.engine.begin() as conn:
            await hold_epoch(conn, self.bot_id, epoch)
            picked = (
                sa.select(inbox_table.c.seq)
                .where(inbox_table.c.bot_id == self.bot_id, inbox_table.c.done_at.is_(None),
                       inbox_table.c.claimed_epoch.is_(None))
                .order_by(inbox_table.c.seq).limit(limit)
            )
            rows = await conn.execute(
                sa.update(inbox_table)
                .where(inbox_table.c.seq.in_(picked.scalar_subquery()))
                .values(attempts=inbox_table.c.attempts + 1, claimed_epoch=epoch)
                .returning(inbox_table.c.seq, inbox_table.c.update_id, inbox_table.c.chat_key,
                           inbox_table.c.payload, inbox_table.c.attempts)
            )
            entries = [InboxEntry(int(r.seq), int(r.update_id), r.chat_key, r.payload, int(r.attempts))
                       for r in rows]
        return sorted(entries, key=lambda e: e.seq)

    async def mark_done(self, seqs: Sequence[int], epoch: int,
                        also: Callable[[AsyncConnection], Awaitable[None]] | None = None) -> None:
        """Group commit of finished updates (fenced): no later leader handles them again.

        One statement: the epoch check is a sub-select of it (``FOR KEY SHARE`` on PostgreSQL, so
        a new leader's epoch write waits for it; SQLite holds its write lock anyway). *also* (the
        FSM state those updates set) runs in the same transaction, once the epoch is held: by that
        statement when it marked a row, else by :func:`hold_epoch` (no extra round trip usually).
        """
        if not seqs:
            return
        async with self.engine.begin() as conn:
            result = await conn.execute(self._done_statement,
                                        {"seqs": list(seqs), "now": utcnow(), "epoch": epoch})
            if result.rowcount == 0:
                await raise_if_fenced(conn, self.bot_id, epoch)
                if also is not None:
                    await hold_epoch(conn, self.bot_id, epoch)
            if also is not None:
                await also(conn)

    async def prune(self) -> int:
        """Forget done rows past the de-duplication window; return how many went."""
        cutoff = utcnow() - DONE_RETENTION
        async with self.engine.begin() as conn:
            by_age = await conn.execute(
                sa.delete(inbox_table).where(
                    inbox_table.c.bot_id == self.bot_id, inbox_table.c.done_at.is_not(None),
                    inbox_table.c.set_aside_at.is_(None),  # kept until an operator acts
                    inbox_table.c.received_at < cutoff,
                )
            )
            floor = await conn.scalar(
                sa.select(inbox_table.c.seq).where(inbox_table.c.bot_id == self.bot_id)
                .order_by(inbox_table.c.seq.desc()).offset(DONE_KEEP_MAX).limit(1)
            )
            by_count = 0
            if floor is not None:
                result = await conn.execute(
                    sa.delete(inbox_table).where(
                        inbox_table.c.bot_id == self.bot_id, inbox_table.c.done_at.is_not(None),
                        inbox_table.c.set_aside_at.is_(None),
                        inbox_table.c.seq <= floor,
                    )
                )
                by_count = int(result.rowcount)
        return int(by_age.rowcount) + by_count

    async def depth(self) -> tuple[int, float | None]:
        """Waiting rows and the age in seconds of the oldest (for /health)."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(
                sa.select(sa.func.count().label("waiting"), sa.func.min(inbox_table.c.received_at).label("oldest"))
                .where(inbox_table.c.bot_id == self.bot_id, inbox_table.c.done_at.is_(None))
            )).one()
        return int(row.waiting), age_of(row.oldest)

    def _unclaimed(self) -> Any:
        """Rows stored by a process that is not the leader (webhook replicas), not taken yet."""
        return sa.and_(inbox_table.c.bot_id == self.bot_id, inbox_table.c.done_at.is_(None),
                       inbox_table.c.claimed_epoch.is_(None))

    async def has_unclaimed(self) -> bool:
        """True if a row another process stored waits for the leader (cheap: stops at one row)."""
        async with self.engine.connect() as conn:
            found = await conn.scalar(sa.select(inbox_table.c.seq).where(self._unclaimed()).limit(1))
        return found is not None

    async def oldest_unclaimed_age(self) -> float | None:
        """Seconds since the oldest row no leader has taken was stored (None: there is none).

        A leader takes rows within milliseconds of their commit, so an old one means nobody leads.
        """
        async with self.engine.connect() as conn:
            oldest = await conn.scalar(sa.select(sa.func.min(inbox_table.c.received_at)).where(self._unclaimed()))
        return age_of(oldest)
