"""The leader row: epochs (fencing tokens), clean releases, and the PostgreSQL lock session's SQL.

``solobot_leader`` has one row per bot: the current epoch, who holds it, its heartbeat, and
whether it let go cleanly. The file backend keeps its heartbeat in the PID record instead; the
PostgreSQL backend heartbeats this row on its lock connection (raw psycopg, below), which also
proves that the session - and with it the advisory lock - is alive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, LiteralString, NamedTuple

import psycopg
import sqlalchemy as sa
from psycopg.rows import class_row, scalar_row
from sqlalchemy.ext.asyncio import AsyncEngine

from utils.state.schema import aware, leader_table, utcnow


@dataclass(frozen=True)
class Takeover:
    """What a new leader learns when it takes the next epoch."""

    epoch: int
    previous_released: bool  # the last holder stopped in order
    previous_instance: str | None
    previous_heartbeat_age: float | None  # seconds, by the database's clock


class LeaderRepository:
    def __init__(self, engine: AsyncEngine, bot_id: int) -> None:
        self.engine = engine
        self.bot_id = bot_id

    async def advance_epoch(
        self, *, instance_id: str, host: str, pid: int, backend_pid: int | None = None
    ) -> Takeover:
        """Take the next epoch. Called only while holding the leadership lock.

        The row is read ``FOR UPDATE``: a fenced-off leader's batch transaction that holds it
        ``FOR KEY SHARE`` commits first, so everything it stored is visible to this leader.
        """
        now = utcnow()
        async with self.engine.begin() as conn:
            query = sa.select(leader_table.c.epoch, leader_table.c.released, leader_table.c.instance_id,
                              leader_table.c.heartbeat).where(leader_table.c.bot_id == self.bot_id)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()
            row = (await conn.execute(query)).first()
            values: dict[str, Any] = dict(
                instance_id=instance_id, host=host, pid=pid, backend_pid=backend_pid,
                since=now, heartbeat=now, released=False,
            )
            if row is None:
                await conn.execute(sa.insert(leader_table).values(bot_id=self.bot_id, epoch=1, **values))
                return Takeover(1, True, None, None)
            epoch = int(row.epoch) + 1
            await conn.execute(
                sa.update(leader_table).where(leader_table.c.bot_id == self.bot_id)
                .values(epoch=epoch, **values)
            )
        heartbeat = aware(row.heartbeat)
        age = (now - heartbeat).total_seconds() if heartbeat is not None else None
        return Takeover(epoch, bool(row.released), row.instance_id, age)

    async def mark_released(self, epoch: int) -> None:
        """Say the leader with *epoch* stepped down cleanly (the next one need not wait)."""
        async with self.engine.begin() as conn:
            await conn.execute(
                sa.update(leader_table)
                .where(leader_table.c.bot_id == self.bot_id, leader_table.c.epoch == epoch)
                .values(released=True)
            )


# -- the PostgreSQL lock session (raw psycopg: these run on dedicated autocommit connections) ----

PgConn = psycopg.AsyncConnection[Any]


class HolderRow(NamedTuple):
    """The leader row as the lock session reads it (times by the database's clock)."""

    epoch: int
    instance_id: str | None
    host: str | None
    pid: int | None
    since: float | None  # unix time
    heartbeat_age: float | None  # seconds
    released: bool


class LockSession(NamedTuple):
    """The holder's lock session as the leader row records it."""

    backend_pid: int | None
    heartbeat_age: float | None  # seconds


class SessionCounts(NamedTuple):
    """One instance's sessions found at a takeover."""

    ended: int  # inside a transaction: ended
    others: int  # the rest, still open


async def _scalar(conn: PgConn, query: LiteralString, params: tuple[Any, ...]) -> Any:
    """The one value of a one-column query; None without a row."""
    cur = await conn.cursor(row_factory=scalar_row).execute(query, params)
    return await cur.fetchone()


async def advisory_lock(conn: PgConn, key: int) -> None:
    await conn.execute("SELECT pg_advisory_lock(%s)", (key,))


async def advisory_unlock(conn: PgConn, key: int) -> None:
    await conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


async def heartbeat(conn: PgConn, bot_id: int, epoch: int) -> bool:
    """Refresh the heartbeat if *epoch* is still current: the lease's verification."""
    cur = await conn.execute(
        "UPDATE solobot_leader SET heartbeat = now() WHERE bot_id = %s AND epoch = %s", (bot_id, epoch)
    )
    return cur.rowcount == 1


async def holder_row(conn: PgConn, bot_id: int) -> HolderRow | None:
    """The leader row, or None (none yet, or no table yet)."""
    try:
        cur = await conn.cursor(row_factory=class_row(HolderRow)).execute(
            "SELECT epoch, instance_id, host, pid, extract(epoch FROM since)::float8 AS since, "
            "extract(epoch FROM now() - heartbeat)::float8 AS heartbeat_age, released "
            "FROM solobot_leader WHERE bot_id = %s",
            (bot_id,),
        )
    except psycopg.errors.UndefinedTable:
        return None
    return await cur.fetchone()


async def lock_is_granted(conn: PgConn, key: int) -> bool:
    return bool(await _scalar(
        conn,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND classid = %s AND objid = %s AND objsubid = 1 "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        ((key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF),
    ))


async def lock_session_of(conn: PgConn, bot_id: int, epoch: int) -> LockSession | None:
    """The lock session of the holder with *epoch*, or None."""
    cur = await conn.cursor(row_factory=class_row(LockSession)).execute(
        "SELECT backend_pid, extract(epoch FROM now() - heartbeat)::float8 AS heartbeat_age "
        "FROM solobot_leader WHERE bot_id = %s AND epoch = %s",
        (bot_id, epoch),
    )
    return await cur.fetchone()


async def terminate_sessions(conn: PgConn, pattern: str) -> int:
    """End every session whose ``application_name`` matches *pattern* (one instance's); count them."""
    return int(await _scalar(
        conn,
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE application_name LIKE %s AND pid <> pg_backend_pid()",
        (pattern,),
    ) or 0)


async def end_leftover_sessions(conn: PgConn, pattern: str) -> SessionCounts:
    """Of one instance's sessions (``application_name`` matching *pattern*): end those inside a
    transaction (they may hold row locks a new leader needs; not one that merely waits for the
    advisory lock, a live standby's), count the rest.
    """
    cur = await conn.cursor(row_factory=class_row(SessionCounts)).execute(
        # CASE, not AND: SQL does not promise to evaluate AND's operands left to right.
        "SELECT count(*) FILTER (WHERE CASE WHEN in_transaction THEN pg_terminate_backend(pid) END) AS ended, "
        "count(*) FILTER (WHERE NOT in_transaction) AS others "
        "FROM (SELECT pid, xact_start IS NOT NULL AND coalesce(wait_event, '') <> 'advisory' AS in_transaction "
        "FROM pg_stat_activity WHERE application_name LIKE %s AND pid <> pg_backend_pid()) AS sessions",
        (pattern,),
    )
    return await cur.fetchone() or SessionCounts(0, 0)


async def open_sessions(conn: PgConn, pattern: str) -> int:
    """How many sessions of one instance (``application_name`` matching *pattern*) the server
    still lists (an ending one is listed until its backend has exited)."""
    return int(await _scalar(
        conn,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s AND pid <> pg_backend_pid()",
        (pattern,),
    ) or 0)


async def restarted_since_heartbeat(conn: PgConn, bot_id: int) -> bool:
    """Did the server start after the leader row's last heartbeat? Then every session ended
    with the restart, whether or not its process is alive."""
    return bool(await _scalar(
        conn, "SELECT pg_postmaster_start_time() > heartbeat FROM solobot_leader WHERE bot_id = %s", (bot_id,)
    ))


async def blockers_of(conn: PgConn, pattern: str) -> list[str]:
    """Who blocks the sessions matching *pattern*: ``application_name (pid N)`` each."""
    cur = await conn.execute(
        "SELECT DISTINCT b.application_name, b.pid FROM pg_stat_activity w "
        "JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS blocker(pid) ON true "
        "JOIN pg_stat_activity b ON b.pid = blocker.pid WHERE w.application_name LIKE %s",
        (pattern,),
    )
    return [f"{name or '?'} (pid {pid})" for name, pid in await cur.fetchall()]
