"""Durable state: fencing epoch, committed offset, processed updates, the post queue, flags.

SQLite in ``STATE_DIR`` by default; the same code on PostgreSQL when ``DATABASE_URL`` is set, so
a leader on another host resumes where the last one stopped.

Fencing: every write made on behalf of the active instance carries its *epoch* and is refused
(:class:`FencedError`) when the ``solobot_leader`` row holds a newer one. A process that lost
leadership without knowing it (SIGSTOP, a partition) therefore cannot change anything when it
wakes up: the condition is evaluated by the database inside the same statement.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

log = logging.getLogger("solobot.state")

SCHEMA_VERSION = 1
PROCESSED_KEEP = 5000  # recent update ids kept for de-duplication across a handover

metadata = sa.MetaData()

schema_table = sa.Table(
    "solobot_schema",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)
leader_table = sa.Table(
    "solobot_leader",
    metadata,
    sa.Column("bot_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("instance_id", sa.String(64)),
    sa.Column("host", sa.String(255)),
    sa.Column("pid", sa.Integer),
    sa.Column("backend_pid", sa.Integer),  # PostgreSQL backend: the lock session, for fencing
    sa.Column("since", sa.DateTime(timezone=True)),
    sa.Column("heartbeat", sa.DateTime(timezone=True)),
    sa.Column("released", sa.Boolean, nullable=False, server_default=sa.false()),
)
offset_table = sa.Table(
    "solobot_offset",
    metadata,
    sa.Column("bot_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("next_offset", sa.BigInteger, nullable=False),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
processed_table = sa.Table(
    "solobot_processed",
    metadata,
    sa.Column("bot_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("update_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
)
posts_table = sa.Table(
    "solobot_posts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("bot_id", sa.BigInteger, nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("text", sa.Text),
    sa.Column("photo", sa.String(255)),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_by", sa.BigInteger),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("claimed_at", sa.DateTime(timezone=True)),
    sa.Column("sent_at", sa.DateTime(timezone=True)),
    sa.Column("message_id", sa.BigInteger),
    sa.Column("error", sa.Text),
    sa.Column("epoch", sa.BigInteger),
)
flags_table = sa.Table(
    "solobot_flags",
    metadata,
    sa.Column("bot_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("epoch", sa.BigInteger),
)


class FencedError(RuntimeError):
    """A newer leader exists: this instance's write was refused."""


@dataclass(frozen=True)
class Post:
    id: int
    status: str
    text: str | None
    photo: str | None
    created_at: dt.datetime
    sent_at: dt.datetime | None
    message_id: int | None
    error: str | None


@dataclass(frozen=True)
class LeaderRow:
    epoch: int
    instance_id: str | None
    host: str | None
    pid: int | None
    backend_pid: int | None
    since: dt.datetime | None
    heartbeat_age: float | None
    released: bool


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes; everything here is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def async_url(database_url: str | None, state_dir: Path) -> str:
    """Map the configured target to an async SQLAlchemy URL."""
    if not database_url:
        return f"sqlite+aiosqlite:///{(state_dir / 'solobot.sqlite3').resolve()}"
    _, _, rest = database_url.partition("://")
    return f"postgresql+psycopg://{rest}"


class StateStore:
    """All durable state of one bot (``bot_id``), behind fenced statements."""

    def __init__(self, engine: AsyncEngine, bot_id: int) -> None:
        self.engine = engine
        self.bot_id = bot_id
        self.is_postgres = engine.dialect.name == "postgresql"

    @classmethod
    def create(cls, database_url: str | None, state_dir: Path, bot_id: int) -> StateStore:
        url = async_url(database_url, state_dir)
        if url.startswith("sqlite"):
            state_dir.mkdir(parents=True, exist_ok=True)
            engine = create_async_engine(url, connect_args={"timeout": 30})
            _sqlite_serialised_writes(engine)
        else:
            engine = create_async_engine(url, pool_pre_ping=True, pool_size=4, max_overflow=4)
        return cls(engine, bot_id)

    async def close(self) -> None:
        await self.engine.dispose()

    # -- schema -----------------------------------------------------------------------------

    async def migrate(self) -> None:
        """Apply the schema idempotently; concurrent starters serialise on a lock."""
        async with self.engine.begin() as conn:
            if self.is_postgres:
                await conn.execute(sa.text("SELECT pg_advisory_xact_lock(7160100001)"))
            await conn.run_sync(metadata.create_all, checkfirst=True)
            present = await conn.scalar(sa.select(sa.func.max(schema_table.c.version)))
            if present is None or present < SCHEMA_VERSION:
                await conn.execute(
                    sa.insert(schema_table).values(version=SCHEMA_VERSION, applied_at=utcnow())
                )
                log.info("state schema at version %d (%s)", SCHEMA_VERSION, self.engine.dialect.name)

    # -- leadership and fencing -------------------------------------------------------------

    async def advance_epoch(
        self, *, instance_id: str, host: str, pid: int, backend_pid: int | None = None
    ) -> tuple[int, bool]:
        """Take the next epoch for a new leader; return it and whether the last one released cleanly.

        Called only while holding the lock (file or advisory), so the increment cannot race.
        """
        now = utcnow()
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    sa.select(leader_table.c.epoch, leader_table.c.released).where(
                        leader_table.c.bot_id == self.bot_id
                    )
                )
            ).first()
            values: dict[str, Any] = dict(
                instance_id=instance_id, host=host, pid=pid, backend_pid=backend_pid,
                since=now, heartbeat=now, released=False,
            )
            if row is None:
                await conn.execute(
                    sa.insert(leader_table).values(bot_id=self.bot_id, epoch=1, **values)
                )
                return 1, True
            epoch = int(row.epoch) + 1
            await conn.execute(
                sa.update(leader_table)
                .where(leader_table.c.bot_id == self.bot_id)
                .values(epoch=epoch, **values)
            )
            return epoch, bool(row.released)

    async def mark_released(self, epoch: int) -> None:
        """Say the leader with *epoch* stepped down cleanly (the next one need not wait)."""
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.update(leader_table)
                .where(leader_table.c.bot_id == self.bot_id, leader_table.c.epoch == epoch)
                .values(released=True)
            )

    async def current_epoch(self) -> int:
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                sa.select(leader_table.c.epoch).where(leader_table.c.bot_id == self.bot_id)
            )
        return int(value or 0)

    async def leader(self) -> LeaderRow | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(sa.select(leader_table).where(leader_table.c.bot_id == self.bot_id))
            ).first()
        if row is None:
            return None
        heartbeat = _aware(row.heartbeat)
        age = (utcnow() - heartbeat).total_seconds() if heartbeat else None
        return LeaderRow(
            epoch=int(row.epoch), instance_id=row.instance_id, host=row.host, pid=row.pid,
            backend_pid=row.backend_pid, since=_aware(row.since), heartbeat_age=age,
            released=bool(row.released),
        )

    def _fence(self, epoch: int) -> sa.ColumnElement[bool]:
        current = (
            sa.select(leader_table.c.epoch)
            .where(leader_table.c.bot_id == self.bot_id)
            .scalar_subquery()
        )
        return sa.literal(epoch, sa.BigInteger) >= current

    async def _fenced_write(self, conn: AsyncConnection, statement: sa.Executable, epoch: int) -> int:
        result = await conn.execute(statement)
        if result.rowcount == 0:
            await self._raise_if_fenced(conn, epoch)
        return int(result.rowcount)

    # -- offsets and processed updates ------------------------------------------------------

    async def load_offset(self) -> int | None:
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                sa.select(offset_table.c.next_offset).where(offset_table.c.bot_id == self.bot_id)
            )
        return None if value is None else int(value)

    async def commit_offset(self, next_offset: int, epoch: int) -> None:
        """Record that every update below *next_offset* is done (fenced)."""
        now = utcnow()
        async with self.engine.begin() as conn:
            updated = await self._fenced_write(
                conn,
                sa.update(offset_table)
                .where(offset_table.c.bot_id == self.bot_id, self._fence(epoch))
                .values(next_offset=sa.func.max(offset_table.c.next_offset, next_offset)
                        if not self.is_postgres
                        else sa.func.greatest(offset_table.c.next_offset, next_offset),
                        epoch=epoch, updated_at=now),
                epoch,
            )
            if updated == 0:
                inserted = await conn.execute(
                    sa.insert(offset_table)
                    .from_select(
                        ["bot_id", "next_offset", "epoch", "updated_at"],
                        sa.select(
                            sa.literal(self.bot_id, sa.BigInteger),
                            sa.literal(next_offset, sa.BigInteger),
                            sa.literal(epoch, sa.BigInteger),
                            sa.literal(now, sa.DateTime(timezone=True)),
                        ).where(self._fence(epoch)),
                    )
                    .returning(offset_table.c.bot_id)
                )
                if inserted.first() is None:
                    await self._raise_if_fenced(conn, epoch)
            await conn.execute(
                sa.delete(processed_table).where(
                    processed_table.c.bot_id == self.bot_id,
                    processed_table.c.update_id < next_offset - PROCESSED_KEEP,
                )
            )

    async def processed_among(self, update_ids: Iterable[int]) -> set[int]:
        ids = list(update_ids)
        if not ids:
            return set()
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(processed_table.c.update_id).where(
                    processed_table.c.bot_id == self.bot_id,
                    processed_table.c.update_id.in_(ids),
                )
            )
            return {int(r[0]) for r in rows}

    async def mark_processed(self, update_id: int, epoch: int) -> None:
        """Record a finished update (fenced), so a later leader never handles it again."""
        async with self.engine.begin() as conn:
            inserted = await conn.execute(
                sa.insert(processed_table)
                .from_select(
                    ["bot_id", "update_id", "epoch", "processed_at"],
                    sa.select(
                        sa.literal(self.bot_id, sa.BigInteger),
                        sa.literal(update_id, sa.BigInteger),
                        sa.literal(epoch, sa.BigInteger),
                        sa.literal(utcnow(), sa.DateTime(timezone=True)),
                    ).where(
                        self._fence(epoch),
                        ~sa.exists().where(
                            processed_table.c.bot_id == self.bot_id,
                            processed_table.c.update_id == update_id,
                        ),
                    ),
                )
                .returning(processed_table.c.update_id)
            )
            if inserted.first() is None:
                await self._raise_if_fenced(conn, epoch)

    async def _raise_if_fenced(self, conn: AsyncConnection, epoch: int) -> None:
        newer = await conn.scalar(
            sa.select(leader_table.c.epoch).where(leader_table.c.bot_id == self.bot_id)
        )
        if newer is not None and int(newer) > epoch:
            raise FencedError(f"epoch {epoch} is fenced off by epoch {newer}")

    # -- flags --------------------------------------------------------------------------------

    async def get_flag(self, name: str) -> str | None:
        async with self.engine.connect() as conn:
            value = await conn.scalar(
                sa.select(flags_table.c.value).where(
                    flags_table.c.bot_id == self.bot_id, flags_table.c.name == name
                )
            )
        return None if value is None else str(value)

    async def set_flag(self, name: str, value: str, epoch: int | None = None) -> None:
        """Set a flag. With *epoch*, the write is fenced (scheduler state); without, it is an admin's."""
        async with self.engine.begin() as conn:
            where = [flags_table.c.bot_id == self.bot_id, flags_table.c.name == name]
            statement = sa.update(flags_table).where(*where).values(value=value, epoch=epoch)
            if epoch is not None:
                updated = await self._fenced_write(conn, statement.where(self._fence(epoch)), epoch)
            else:
                updated = (await conn.execute(statement)).rowcount
            if updated == 0:
                await conn.execute(
                    sa.insert(flags_table).values(
                        bot_id=self.bot_id, name=name, value=value, epoch=epoch
                    )
                )

    # -- posts --------------------------------------------------------------------------------

    def _post(self, row: Any) -> Post:
        return Post(
            id=int(row.id), status=row.status, text=row.text, photo=row.photo,
            created_at=_aware(row.created_at) or utcnow(), sent_at=_aware(row.sent_at),
            message_id=row.message_id, error=row.error,
        )

    async def add_post(self, *, text: str | None, photo: str | None, created_by: int) -> Post:
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    sa.insert(posts_table)
                    .values(
                        bot_id=self.bot_id, status="queued", text=text, photo=photo,
                        created_by=created_by, created_at=utcnow(),
                    )
                    .returning(*posts_table.c)
                )
            ).one()
        return self._post(row)

    async def get_post(self, post_id: int) -> Post | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(posts_table).where(
                        posts_table.c.bot_id == self.bot_id, posts_table.c.id == post_id
                    )
                )
            ).first()
        return None if row is None else self._post(row)

    def _queue_order(self) -> Sequence[sa.ColumnElement[Any]]:
        return (posts_table.c.priority.desc(), posts_table.c.id)

    async def queued_posts(self, limit: int = 100) -> list[Post]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(posts_table)
                .where(posts_table.c.bot_id == self.bot_id, posts_table.c.status == "queued")
                .order_by(*self._queue_order())
                .limit(limit)
            )
            return [self._post(r) for r in rows]

    async def posts_with_status(self, status: str) -> list[Post]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                sa.select(posts_table)
                .where(posts_table.c.bot_id == self.bot_id, posts_table.c.status == status)
                .order_by(posts_table.c.id)
            )
            return [self._post(r) for r in rows]

    async def set_post_status(
        self, post_id: int, *, from_statuses: Sequence[str], to: str, priority: int | None = None
    ) -> bool:
        """Admin transitions (cancel, retry, postnow priority): True if the post was in *from_statuses*."""
        values: dict[str, Any] = {"status": to}
        if priority is not None:
            values["priority"] = priority
        async with self.engine.begin() as conn:
            result = await conn.execute(
                sa.update(posts_table)
                .where(
                    posts_table.c.bot_id == self.bot_id,
                    posts_table.c.id == post_id,
                    posts_table.c.status.in_(from_statuses),
                )
                .values(**values)
            )
            return bool(result.rowcount)

    async def claim_post(self, epoch: int, post_id: int | None = None) -> Post | None:
        """``queued`` -> ``sending`` in one fenced statement: the next post, or *post_id*."""
        async with self.engine.begin() as conn:
            if post_id is None:
                post_id = await conn.scalar(
                    sa.select(posts_table.c.id)
                    .where(posts_table.c.bot_id == self.bot_id, posts_table.c.status == "queued")
                    .order_by(*self._queue_order())
                    .limit(1)
                )
                if post_id is None:
                    return None
            row = (
                await conn.execute(
                    sa.update(posts_table)
                    .where(
                        posts_table.c.bot_id == self.bot_id,
                        posts_table.c.id == post_id,
                        posts_table.c.status == "queued",
                        self._fence(epoch),
                    )
                    .values(status="sending", claimed_at=utcnow(), epoch=epoch)
                    .returning(*posts_table.c)
                )
            ).first()
            if row is None:
                await self._raise_if_fenced(conn, epoch)
                return None
            return self._post(row)

    async def finish_post(
        self, post_id: int, epoch: int, *, status: str, message_id: int | None = None,
        error: str | None = None,
    ) -> None:
        """``sending`` -> ``sent`` / ``failed`` / ``uncertain`` / back to ``queued`` (fenced)."""
        async with self.engine.begin() as conn:
            await self._fenced_write(
                conn,
                sa.update(posts_table)
                .where(
                    posts_table.c.bot_id == self.bot_id,
                    posts_table.c.id == post_id,
                    posts_table.c.status == "sending",
                    self._fence(epoch),
                )
                .values(
                    status=status, message_id=message_id, error=error,
                    sent_at=utcnow() if status == "sent" else None,
                ),
                epoch,
            )

    async def mark_interrupted_uncertain(self, epoch: int) -> list[Post]:
        """Posts left in ``sending`` by an earlier leader become ``uncertain`` (never re-sent blindly)."""
        async with self.engine.begin() as conn:
            rows = await conn.execute(
                sa.update(posts_table)
                .where(
                    posts_table.c.bot_id == self.bot_id,
                    posts_table.c.status == "sending",
                    sa.or_(posts_table.c.epoch.is_(None), posts_table.c.epoch < epoch),
                    self._fence(epoch),
                )
                .values(status="uncertain", error="interrupted between claim and confirmation")
                .returning(*posts_table.c)
            )
            return [self._post(r) for r in rows]


def _sqlite_serialised_writes(engine: AsyncEngine) -> None:
    """Make every SQLite transaction ``BEGIN IMMEDIATE`` and use WAL.

    pysqlite's deferred transactions upgrade read locks to write locks late, which two processes
    turn into instant SQLITE_BUSY errors; taking the write lock up front makes them wait instead.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
