"""PostgreSQL leadership across hosts: a session-level advisory lock on a dedicated connection.

* The key is derived from the bot id (never the token secret); two bots never collide.
* A standby blocks in ``pg_advisory_lock`` on its own connection: the server grants it the moment
  the holder's session ends (release, exit, kill, ``pg_terminate_backend``). No retry loop.
* TCP keepalives and ``tcp_user_timeout`` on the lock connection so a dead peer is noticed.
* The holder writes a heartbeat row every second on the lock connection, which also proves the
  session (and so the lock) is alive and the epoch current. Between heartbeats it watches the
  socket: a connection cut by the server or the network wakes it at once, and it steps down.
* A hung holder (heartbeat older than ``LOCK_STALE_SECONDS``) is fenced by a standby with
  ``pg_terminate_backend`` on the holder's lock session (needs the same role or
  ``pg_signal_backend``).
* After a holder vanished without a clean release, the new leader waits
  :attr:`unclean_takeover_delay` before polling: the time a cut-off holder needs to notice.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from typing import Any

import psycopg
from psycopg import sql

from utils.locking.backend import HEARTBEAT_INTERVAL, HolderInfo, LockBackend
from utils.state.store import StateStore

log = logging.getLogger("solobot.lock")


def advisory_key(bot_id: int) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock``, from the bot id."""
    digest = hashlib.sha256(f"solobot-leader:{bot_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def libpq_dsn(database_url: str) -> str:
    """``postgresql+psycopg://...`` (SQLAlchemy style) -> ``postgresql://...`` for libpq."""
    _, sep, rest = database_url.partition("://")
    return f"postgresql://{rest}" if sep else database_url


CONNECT_ARGS: dict[str, Any] = {
    "autocommit": True,
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}


class PostgresLockBackend(LockBackend):
    name = "postgres"
    unclean_takeover_delay = 0.5

    def __init__(self, database_url: str, bot_id: int, store: StateStore, **kwargs: Any) -> None:
        super().__init__(store, **kwargs)
        self.dsn = libpq_dsn(database_url)
        self.bot_id = bot_id
        self.key = advisory_key(bot_id)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._monitor: psycopg.AsyncConnection[Any] | None = None
        self._pid: int | None = None

    async def _connect(self, purpose: str) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self.dsn, application_name=f"solobot-{purpose}-{self.bot_id}", **CONNECT_ARGS
        )

    # -- mechanism ---------------------------------------------------------------------------

    async def _lock_acquire(self) -> None:
        conn = await self._connect("lock")
        try:
            await conn.execute("SELECT pg_advisory_lock(%s)", (self.key,))
        except BaseException:
            # Cancelled while waiting (shutdown) or the server went away: the session ends,
            # and with it our place in the lock queue.
            await asyncio.shield(self._close_quietly(conn))
            raise
        self._conn = conn
        self._pid = conn.info.backend_pid

    def _backend_pid(self) -> int | None:
        return self._pid

    async def _lock_heartbeat(self) -> bool:
        assert self._conn is not None
        cur = await self._conn.execute(
            "UPDATE solobot_leader SET heartbeat = now() WHERE bot_id = %s AND epoch = %s",
            (self.bot_id, self.epoch),
        )
        return cur.rowcount == 1

    async def _lock_verify(self) -> bool:
        if self._conn is None or self._conn.closed:
            return False
        cur = await self._conn.execute(
            "SELECT epoch FROM solobot_leader WHERE bot_id = %s", (self.bot_id,)
        )
        row = await cur.fetchone()
        return row is not None and int(row[0]) == self.epoch

    async def _pause_between_heartbeats(self) -> None:
        """Sleep a heartbeat interval, but wake at once if the lock connection's socket stirs.

        An idle session receives nothing; readability means the server or the network closed it.
        The socket is watched through a duplicate descriptor so psycopg's own waits are untouched.
        """
        conn = self._conn
        if conn is None or conn.closed:
            return
        loop = asyncio.get_running_loop()
        fd = os.dup(conn.fileno())
        stirred = loop.create_future()
        def stir() -> None:
            if not stirred.done():
                stirred.set_result(None)

        loop.add_reader(fd, stir)
        try:
            await asyncio.wait_for(stirred, timeout=HEARTBEAT_INTERVAL)
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    async def _lock_release(self) -> None:
        conn, self._conn, self._pid = self._conn, None, None
        if conn is None:
            return
        try:
            await asyncio.wait_for(
                conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,)), timeout=2
            )
        except Exception:  # closing the session releases it anyway
            log.debug("advisory unlock failed; closing the session releases it", exc_info=True)
        await self._close_quietly(conn)

    @staticmethod
    async def _close_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            await conn.close()
        except Exception:  # noqa: BLE001
            pass

    async def _monitor_conn(self) -> psycopg.AsyncConnection[Any]:
        if self._monitor is None or self._monitor.closed or self._monitor.broken:
            self._monitor = await self._connect("monitor")
        return self._monitor

    async def _query_monitor(self, query: sql.SQL | str, params: tuple[Any, ...]) -> Any:
        conn = await self._monitor_conn()
        try:
            cur = await conn.execute(query, params)
            return await cur.fetchone()
        except psycopg.errors.UndefinedTable:
            return None
        except psycopg.OperationalError:
            await self._close_quietly(conn)
            self._monitor = None
            raise

    async def holder(self) -> HolderInfo | None:
        row = await self._query_monitor(
            "SELECT epoch, instance_id, host, pid, extract(epoch FROM since), "
            "extract(epoch FROM now() - heartbeat), released "
            "FROM solobot_leader WHERE bot_id = %s",
            (self.bot_id,),
        )
        if row is None or row[6]:
            return None
        return HolderInfo(
            instance_id=row[1], host=row[2], pid=row[3], epoch=int(row[0]),
            since=float(row[4]) if row[4] is not None else None,
            heartbeat_age=float(row[5]) if row[5] is not None else None,
        )

    async def holder_is_live(self, holder: HolderInfo) -> bool:
        row = await self._query_monitor(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = %s AND objid = %s AND objsubid = 1",
            ((self.key >> 32) & 0xFFFFFFFF, self.key & 0xFFFFFFFF),
        )
        return bool(row and row[0])

    async def _fence_holder(self, holder: HolderInfo) -> str | None:
        row = await self._query_monitor(
            "SELECT backend_pid, extract(epoch FROM now() - heartbeat) FROM solobot_leader "
            "WHERE bot_id = %s AND epoch = %s",
            (self.bot_id, holder.epoch),
        )
        if row is None:
            return "the holder changed"
        if row[1] is not None and float(row[1]) <= self.stale_seconds:
            return "it recovered"
        if row[0] is None:
            return "no lock session recorded"
        done = await self._query_monitor("SELECT pg_terminate_backend(%s)", (int(row[0]),))
        if done and done[0]:
            return None
        return f"pg_terminate_backend({row[0]}) refused (session gone, or no permission)"

    async def close(self) -> None:
        for conn in (self._conn, self._monitor):
            if conn is not None:
                await self._close_quietly(conn)
        self._conn = self._monitor = None
