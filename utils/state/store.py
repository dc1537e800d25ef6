"""``StateStore``: the durable state of one bot, one repository per concern behind one object.

SQLite in ``STATE_DIR`` by default; the same code on PostgreSQL when ``DATABASE_URL`` is set, so a
leader on another host resumes where the last one stopped. All SQL of solobot lives in this
package: the inbox (:mod:`utils.state.inbox`), the leader row and the lock session
(:mod:`utils.state.leader`), fencing (:mod:`utils.state.fencing`), and here the post queue and
flags used by the autoposter.

Fencing: every write made on behalf of the active instance carries its *epoch* and is refused
(:class:`FencedError`) when the leader row holds a newer one. A process that lost leadership
without knowing it (SIGSTOP, a partition) therefore cannot change anything when it wakes up: the
condition is evaluated by the database inside the same statement or transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from utils.state.database import DatabaseTarget, prepare_sqlite_files
from utils.state.errors import describe_database_error
from utils.state.fencing import FencedError, fenced, hold_epoch, raise_if_fenced
from utils.state.fsm_repository import FsmRepository
from utils.state.inbox import InboxRepository
from utils.state.leader import LeaderRepository
from utils.state.recovery import RecoveryRepository
from utils.state.schema import aware, flags_table, migrate, posts_table, utcnow

__all__ = ["FencedError", "Post", "StateStore"]


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


class StateStore:
    """All durable state of one bot (``bot_id``), behind fenced statements."""

    def __init__(self, engine: AsyncEngine, bot_id: int, target: DatabaseTarget | None = None) -> None:
        self.engine = engine
        self.bot_id = bot_id
        self.target = target
        self.is_postgres = engine.dialect.name == "postgresql"
        self.inbox = InboxRepository(engine, bot_id)
        self.leader = LeaderRepository(engine, bot_id)
        self.fsm = FsmRepository(engine, bot_id)
        self.recovery = RecoveryRepository(engine, bot_id)  # takeovers and poison updates
        self._migrated = False

    @classmethod
    def create(cls, target: DatabaseTarget, bot_id: int, instance_id: str) -> StateStore:
        """Build the store without touching anything: :meth:`open` prepares the files, and
        nothing connects until the first statement."""
        return cls(target.create_engine(bot_id=bot_id, instance_id=instance_id), bot_id, target)

    async def open(self) -> None:
        """SQLite: the state directory and the database file, private to this user, before SQLite
        opens them (may raise :class:`~utils.base.private_path.UnsafePathError`; idempotent).
        PostgreSQL: nothing (the first statement connects)."""
        if self.target is not None and self.target.sqlite_path is not None:
            prepare_sqlite_files(self.target.sqlite_path)

    async def close(self) -> None:
        await self.engine.dispose()

    def describe_error(self, exc: BaseException, *, waited: float | None = None) -> str:
        """A database error as one line: where (host, port, database; never the password), why."""
        if self.target is None:
            return describe_database_error(exc, waited=waited)
        return describe_database_error(exc, location=self.target.location, redactor=self.target.redactor,
                                       waited=waited)

    async def migrate(self) -> None:
        """Apply the schema once per process (idempotent; cheap when already current)."""
        if not self._migrated:
            await migrate(self.engine)
            self._migrated = True

    async def _fenced_write(self, conn: Any, statement: sa.Executable, epoch: int) -> int:
        result = await conn.execute(statement)
        if result.rowcount == 0:
            await raise_if_fenced(conn, self.bot_id, epoch)
        return int(result.rowcount)

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
                updated = await self._fenced_write(conn, statement.where(fenced(self.bot_id, epoch)), epoch)
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
            created_at=aware(row.created_at) or utcnow(), sent_at=aware(row.sent_at),
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

    def _post_in(self, post_id: int, *statuses: str) -> sa.ColumnElement[bool]:
        """This bot's post *post_id*, if its status is one of *statuses* (a transition's source)."""
        return sa.and_(posts_table.c.bot_id == self.bot_id, posts_table.c.id == post_id,
                       posts_table.c.status.in_(statuses))

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
                sa.update(posts_table).where(self._post_in(post_id, *from_statuses)).values(**values)
            )
            return bool(result.rowcount)

    async def claim_post(self, epoch: int, post_id: int | None = None) -> Post | None:
        """``queued`` -> ``sending``, fenced: the next post, or *post_id*.

        ``hold_epoch`` fences the whole transaction (the epoch cannot change before it commits),
        so the statements after it need no epoch condition of their own."""
        async with self.engine.begin() as conn:
            await hold_epoch(conn, self.bot_id, epoch)
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
                    sa.update(posts_table).where(self._post_in(post_id, "queued"))
                    .values(status="sending", claimed_at=utcnow(), epoch=epoch)
                    .returning(*posts_table.c)
                )
            ).first()
            return None if row is None else self._post(row)

    async def finish_post(
        self, post_id: int, epoch: int, *, status: str, message_id: int | None = None,
        error: str | None = None,
    ) -> None:
        """``sending`` -> ``sent`` / ``failed`` / ``uncertain`` / back to ``queued`` (fenced)."""
        async with self.engine.begin() as conn:
            await hold_epoch(conn, self.bot_id, epoch)
            await conn.execute(
                sa.update(posts_table).where(self._post_in(post_id, "sending"))
                .values(
                    status=status, message_id=message_id, error=error,
                    sent_at=utcnow() if status == "sent" else None,
                )
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
                    fenced(self.bot_id, epoch),
                )
                .values(status="uncertain", error="interrupted between claim and confirmation")
                .returning(*posts_table.c)
            )
            return [self._post(r) for r in rows]
