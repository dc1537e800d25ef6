"""PostgreSQL leadership across hosts: a session-level advisory lock on a dedicated connection.

* The key is derived from the bot id (never the token secret); two bots never collide.
* A standby blocks in ``pg_advisory_lock`` on its own connection: the server grants it the moment
  the holder's session ends (release, exit, kill, ``pg_terminate_backend``). No retry loop.
* TCP keepalives and ``tcp_user_timeout`` on the lock connection so a dead peer is noticed.
* The holder heartbeats the leader row on the lock connection every second; that is also the
  lease's verification (it proves the session, hence the lock, is alive and the epoch current).
  Between heartbeats it watches the socket: a connection cut by the server or the network wakes
  it at once, the renewal fails and it steps down.
* Every session of an instance is tagged (``application_name``). Fencing a hung holder ends all
  of them, not only the lock session: a paused process may hold row locks in a state session
  that the new leader's epoch write needs. A new leader whose predecessor did not release cleanly
  does the same before it writes the epoch.
* After a holder vanished without a clean release while its lease may still run, the new leader
  waits :attr:`unclean_takeover_delay` before polling (the time a cut-off holder needs to notice),
  unless the server holds no session of it any more: a killed process cannot poll.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from typing import Any

import psycopg

from utils.locking.backend import HEARTBEAT_INTERVAL, HolderInfo, LockBackend
from utils.state import leader as sql
from utils.state.database import PG_TCP_TIMEOUTS, DatabaseTarget, instance_tag_pattern, session_tag
from utils.state.store import StateStore

log = logging.getLogger("solobot.lock")

CONNECT_ARGS: dict[str, Any] = {"autocommit": True, "connect_timeout": 5, **PG_TCP_TIMEOUTS}
UNLOCK_TIMEOUT = 2.0
#: A vanished predecessor's last sessions get this long to end on their own (a killed process's
#: backends exit one by one, slower on a loaded server) before the takeover delay applies;
#: looked at every PREDECESSOR_EXIT_POLL. Time spent here counts against that delay.
PREDECESSOR_EXIT_WAIT = 0.3
PREDECESSOR_EXIT_POLL = 0.01


def advisory_key(bot_id: int) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock``, from the bot id."""
    digest = hashlib.sha256(f"solobot-leader:{bot_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresLockBackend(LockBackend):
    name = "postgres"
    unclean_takeover_delay = 0.5

    def __init__(self, target: DatabaseTarget, bot_id: int, store: StateStore, **kwargs: Any) -> None:
        super().__init__(store, **kwargs)
        self.target = target
        self.dsn = target.libpq_dsn
        self.bot_id = bot_id
        self.key = advisory_key(bot_id)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._monitor: psycopg.AsyncConnection[Any] | None = None
        self._pid: int | None = None
        self._predecessor_gone = False

    async def _connect(self, purpose: str) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self.dsn, application_name=session_tag(self.bot_id, self.instance_id, purpose), **CONNECT_ARGS
        )

    # -- mechanism ---------------------------------------------------------------------------

    async def _lock_acquire(self) -> None:
        conn = await self._connect("lock")
        try:
            await sql.advisory_lock(conn, self.key)
        except BaseException:
            # Cancelled while waiting (shutdown) or the server went away: the session ends,
            # and with it our place in the lock queue.
            await asyncio.shield(self._close_quietly(conn))
            raise
        self._conn = conn
        self._pid = conn.info.backend_pid

    async def _before_new_epoch(self) -> None:
        """An unclean predecessor may still have sessions inside a transaction, holding row locks
        the epoch write needs (a paused process): end those. Its other sessions are left alone: it
        may be alive as a standby by now.

        Whether it has any session left decides the takeover delay: none means the process is
        gone (kill -9, a crash: the kernel closed all its sockets), so nothing of it can still
        poll. Its sessions end one by one as their backends notice (slower on a loaded server);
        the lock session's went first, which is why we hold the lock. So the rest get
        :data:`PREDECESSOR_EXIT_WAIT` to go, and the time spent counts against the delay. A
        server restart since its last heartbeat ended every session whether the process lives or
        not: then the delay applies in full. (A live holder whose sessions were all ended
        otherwise, by an administrator or a proxy, sees its lock connection close within
        milliseconds and stops; the worst it can do is one stray 409, which the new leader
        retries at once.)
        """
        self._predecessor_gone = False
        self.predecessor_waited = 0.0
        row = await self._query(sql.holder_row, self.bot_id)
        if row is None or row.released or row.instance_id in (None, self.instance_id):
            return
        pattern = instance_tag_pattern(self.bot_id, row.instance_id)
        ended, others = await self._query(sql.end_leftover_sessions, pattern)
        if ended:
            log.info("ended %d leftover session(s) of the previous holder (instance %s)", ended, row.instance_id)
        if await self._query(sql.restarted_since_heartbeat, self.bot_id):
            log.debug("the database server restarted since the previous holder's last heartbeat")
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        left = ended + others
        while left and loop.time() - started < PREDECESSOR_EXIT_WAIT:
            await asyncio.sleep(PREDECESSOR_EXIT_POLL)
            left = await self._query(sql.open_sessions, pattern)
        self.predecessor_waited = loop.time() - started
        self._predecessor_gone = not ended and not left
        log.debug("previous holder %s: %s after %.0f ms", row.instance_id,
                  "no session left" if self._predecessor_gone else f"{left} session(s) left",
                  self.predecessor_waited * 1000)

    def _predecessor_may_act(self) -> bool:
        return not self._predecessor_gone

    def _backend_pid(self) -> int | None:
        return self._pid

    async def _lock_heartbeat(self) -> bool:
        if self._conn is None or self._conn.closed:
            return False
        return await sql.heartbeat(self._conn, self.bot_id, self.epoch)

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
        pending = self.verification
        if pending is not None and not pending.done():
            # The connection is busy with a verification the server has not answered (a silent
            # server). Closing it under psycopg's feet could hand its descriptor to the next
            # socket; close it once that call has ended (its TCP timeouts end it within ~10 s).
            # The server drops the session, and with it the lock, when it sees the close.
            log.debug("lock connection busy with an unanswered verification; closing it when that ends")
            pending.add_done_callback(lambda _done: asyncio.ensure_future(self._close_quietly(conn)))
            return
        try:
            await asyncio.wait_for(sql.advisory_unlock(conn, self.key), timeout=UNLOCK_TIMEOUT)
        except Exception:  # closing the session releases it anyway
            log.debug("advisory unlock failed; closing the session releases it", exc_info=True)
        await self._close_quietly(conn)

    @staticmethod
    async def _close_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            await conn.close()
        except Exception:  # noqa: BLE001
            pass

    async def _query(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one of :mod:`utils.state.leader`'s queries on the monitor connection."""
        if self._monitor is None or self._monitor.closed or self._monitor.broken:
            self._monitor = await self._connect("monitor")
        conn = self._monitor
        try:
            return await query(conn, *args, **kwargs)
        except psycopg.OperationalError:
            # This call's connection, which may not be the current one any more (a bounded lookup
            # can end long after its caller gave up and a new monitor connection was opened).
            await self._close_quietly(conn)
            if self._monitor is conn:
                self._monitor = None
            raise

    async def holder(self) -> HolderInfo | None:
        row = await self._query(sql.holder_row, self.bot_id)
        if row is None or row.released:
            return None
        return HolderInfo(instance_id=row.instance_id, host=row.host, pid=row.pid, epoch=row.epoch,
                          since=row.since, heartbeat_age=row.heartbeat_age)

    async def holder_is_live(self, holder: HolderInfo) -> bool:
        return bool(await self._query(sql.lock_is_granted, self.key))

    def describe_failure(self, exc: BaseException) -> str:
        """Host, port, database and the server's reason; never the password."""
        return self.store.describe_error(exc)

    async def lock_is_held(self) -> bool | None:
        return bool(await self._query(sql.lock_is_granted, self.key))

    async def _fence_holder(self, holder: HolderInfo) -> str | None:
        session = await self._query(sql.lock_session_of, self.bot_id, holder.epoch)
        if session is None:
            return "the holder changed"
        if session.heartbeat_age is not None and session.heartbeat_age <= self.stale_seconds:
            return "it recovered"
        if holder.instance_id is None:
            return "no instance recorded"
        ended = await self._query(sql.terminate_sessions,
                                  instance_tag_pattern(self.bot_id, holder.instance_id))
        if ended:
            return None
        return "no session of it could be terminated (gone already, or no permission)"

    async def _describe_blockers(self) -> str:
        try:
            blockers = await self._query(sql.blockers_of, instance_tag_pattern(self.bot_id, self.instance_id))
        except Exception:  # noqa: BLE001 - only for a log line
            return ""
        return ", ".join(blockers)

    async def close(self) -> None:
        for conn in (self._conn, self._monitor):
            if conn is not None:
                await self._close_quietly(conn)
        self._conn = self._monitor = None
