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
  waits :data:`UNCLEAN_TAKEOVER_DELAY` before polling (the time a cut-off holder needs to notice),
  unless the server holds no session of it any more: a killed process cannot poll. This is the
  mechanism's own knowledge; it reaches the policy only as the grant's ``settle``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import psycopg

from utils.base.lookup import retrieve_quietly
from utils.locking.backend import Claim, Grant, HolderInfo, LockMechanism, LockUnavailable
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
#: After a holder vanished without a clean release while its lease may still have been running:
#: time for a cut-off holder to notice (its lock connection closes, its next renewal fails).
UNCLEAN_TAKEOVER_DELAY = 0.5


def settle(*, predecessor_gone: bool, waited: float) -> float:
    """How long a predecessor that left uncleanly may still act, after *waited* seconds spent
    waiting for its sessions: nothing if none is left (a killed process cannot poll)."""
    if predecessor_gone:
        return 0.0
    return max(0.0, UNCLEAN_TAKEOVER_DELAY - waited)


def advisory_key(bot_id: int) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock``, from the bot id."""
    digest = hashlib.sha256(f"solobot-leader:{bot_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Lookups:
    """The queries running on one monitor connection, so that its close can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self._then: list[Callable[[], object]] = []

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self.count += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if not self.count:
                self.idle.set()
                then, self._then = self._then, []
                for call in then:
                    call()

    def then(self, call: Callable[[], object]) -> None:
        """Call *call* once no query runs (at once if none does)."""
        if self.count:
            self._then.append(call)
        else:
            call()


class PostgresMechanism(LockMechanism):
    name = "postgres"

    def __init__(self, target: DatabaseTarget, bot_id: int, store: StateStore, *, instance_id: str,
                 stale_seconds: float) -> None:
        self.target = target
        self.dsn = target.libpq_dsn
        self.bot_id = bot_id
        self.store = store
        self.instance_id = instance_id
        self.stale_seconds = stale_seconds  # a fenced holder's session is looked at again: recovered?
        self.key = advisory_key(bot_id)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._monitor: psycopg.AsyncConnection[Any] | None = None
        #: The lookups running on the monitor connection now (its close waits for them).
        self._monitor_lookups = Lookups()
        #: The lease's unverified heartbeat (the last verification, still running after an overrun).
        self._pending: asyncio.Future[bool] | None = None
        #: While held: the duplicate descriptor of the lock connection's socket being watched, and
        #: whom to wake when it stirs (:meth:`Claim.wake`).
        self._watched: int | None = None
        self._wake: Callable[[], None] | None = None

    async def _connect(self, purpose: str) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self.dsn, application_name=session_tag(self.bot_id, self.instance_id, purpose), **CONNECT_ARGS
        )

    async def acquire(self, claim: Claim) -> Grant:
        try:
            conn = await self._connect("lock")
            try:
                await sql.advisory_lock(conn, self.key)
            except BaseException:
                # Cancelled while waiting (shutdown) or the server went away: the session ends,
                # and with it our place in the lock queue.
                await asyncio.shield(self._close_quietly(conn))
                raise
            self._conn = conn
            await claim.locked()
            waited = await self._end_predecessor()
            takeover = await claim.take_epoch(backend_pid=conn.info.backend_pid, blockers=self._describe_blockers)
        except LockUnavailable:
            raise
        except Exception as exc:  # the server: host, port, database and its reason; never the password
            raise LockUnavailable(self.store.describe_error(exc)) from exc
        self._wake = claim.wake
        self._watch_socket()
        return Grant(takeover, waited)

    async def _end_predecessor(self) -> float:
        """An unclean predecessor may still have sessions inside a transaction, holding row locks
        the epoch write needs (a paused process): end those. Its other sessions are left alone: it
        may be alive as a standby by now. Returns how long it may still act (:func:`settle`).

        Whether it has any session left decides that: none means the process is gone (kill -9, a
        crash: the kernel closed all its sockets), so nothing of it can still poll. Its sessions
        end one by one as their backends notice (slower on a loaded server); the lock session's
        went first, which is why we hold the lock. So the rest get :data:`PREDECESSOR_EXIT_WAIT`
        to go, and the time spent counts against the delay. A server restart since its last
        heartbeat ended every session whether the process lives or not: then the delay applies
        in full. (A live holder whose sessions were all ended otherwise, by an administrator or a
        proxy, sees its lock connection close within milliseconds and stops; the worst it can do
        is one stray 409, which the new leader retries at once.)
        """
        row = await self._query(sql.holder_row, self.bot_id)
        if row is None or row.released or row.instance_id in (None, self.instance_id):
            return settle(predecessor_gone=False, waited=0.0)
        pattern = instance_tag_pattern(self.bot_id, row.instance_id)
        ended, others = await self._query(sql.end_leftover_sessions, pattern)
        if ended:
            log.info("ended %d leftover session(s) of the previous holder (instance %s)", ended, row.instance_id)
        if await self._query(sql.restarted_since_heartbeat, self.bot_id):
            log.debug("the database server restarted since the previous holder's last heartbeat")
            return settle(predecessor_gone=False, waited=0.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        left = ended + others
        while left and loop.time() - started < PREDECESSOR_EXIT_WAIT:
            await asyncio.sleep(PREDECESSOR_EXIT_POLL)
            left = await self._query(sql.open_sessions, pattern)
        waited = loop.time() - started
        gone = not ended and not left
        log.debug("previous holder %s: %s after %.0f ms", row.instance_id,
                  "no session left" if gone else f"{left} session(s) left", waited * 1000)
        return settle(predecessor_gone=gone, waited=waited)

    async def heartbeat(self, epoch: int) -> bool:
        conn = self._conn
        if conn is None or conn.closed:
            return False
        self._unwatch_socket()  # the answer makes the socket readable: not a stir
        self._pending = future = asyncio.ensure_future(sql.heartbeat(conn, self.bot_id, epoch))
        try:
            return await asyncio.shield(future)
        finally:
            if future.done() and self._conn is conn:
                self._watch_socket()

    def _watch_socket(self) -> None:
        """Between heartbeats, wake the lease keeping at once if the lock connection's socket
        stirs: an idle session receives nothing, so readability means the server or the network
        closed it. Watched through a duplicate descriptor, so psycopg's own waits are untouched;
        one-shot (a heartbeat arms it again)."""
        conn = self._conn
        if self._watched is not None or self._wake is None or conn is None or conn.closed or conn.broken:
            return
        fd = os.dup(conn.fileno())
        asyncio.get_running_loop().add_reader(fd, self._stirred)
        self._watched = fd

    def _unwatch_socket(self) -> None:
        fd, self._watched = self._watched, None
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def _stirred(self) -> None:
        self._unwatch_socket()
        if self._wake is not None:
            self._wake()

    async def release(self) -> None:
        """Unlock and close the lock connection, and the monitor connection once its lookups have
        ended (opened again by the next look at the holder). A lookup that overran (a silent
        server) is not closed under: psycopg could hand its descriptor to the next socket while it
        still waits on it; that connection closes when the lookup ends (its TCP timeouts end it)."""
        self._wake = None
        self._unwatch_socket()
        monitor, lookups = self._monitor, self._monitor_lookups
        self._monitor, self._monitor_lookups = None, Lookups()  # the next look opens a new one
        if monitor is not None:
            await self._close_when_done(monitor, lookups)
        conn, self._conn = self._conn, None
        if conn is None:
            return
        pending = self._pending
        if pending is not None and not pending.done():
            # The connection is busy with a verification the server has not answered (a silent
            # server). Closing it under psycopg's feet could hand its descriptor to the next
            # socket; close it once that call has ended (its TCP timeouts end it within ~10 s).
            # The server drops the session, and with it the lock, when it sees the close.
            log.debug("lock connection busy with an unanswered verification; closing it when that ends")
            self._close_once_ended(pending, conn)
            return
        unlock = asyncio.ensure_future(sql.advisory_unlock(conn, self.key))
        try:
            done, _ = await asyncio.wait({unlock}, timeout=UNLOCK_TIMEOUT)
        except BaseException:
            unlock.cancel()
            self._close_once_ended(unlock, conn)
            raise
        if not done:
            # A silent server: psycopg answers the cancellation by asking the server to cancel
            # (seconds); as above, the connection is closed once that call has ended.
            log.debug("advisory unlock unanswered within %g s; closing the session when it ends", UNLOCK_TIMEOUT)
            unlock.cancel()
            self._close_once_ended(unlock, conn)
            return
        if unlock.cancelled() or unlock.exception() is not None:
            log.debug("advisory unlock failed; closing the session releases it anyway")
        await self._close_quietly(conn)

    def _close_once_ended(self, call: asyncio.Future[Any], conn: psycopg.AsyncConnection[Any]) -> None:
        """Close *conn* once *call* on it has ended, never under it (its outcome retrieved quietly)."""
        call.add_done_callback(retrieve_quietly)
        call.add_done_callback(lambda _done: asyncio.ensure_future(self._close_quietly(conn)))

    @staticmethod
    async def _close_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            await conn.close()
        except Exception:  # noqa: BLE001
            pass

    async def _close_when_done(self, conn: psycopg.AsyncConnection[Any], lookups: Lookups) -> None:
        """Close *conn* once *lookups* on it have ended: waited for :data:`UNLOCK_TIMEOUT` (a
        healthy server answers in milliseconds), else closed when the last one ends."""
        try:
            await asyncio.wait_for(lookups.idle.wait(), timeout=UNLOCK_TIMEOUT)
        except TimeoutError:
            log.debug("monitor connection busy with an unanswered lookup; closing it when that ends")
            lookups.then(lambda: asyncio.ensure_future(self._close_quietly(conn)))
            return
        await self._close_quietly(conn)

    async def _query(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one of :mod:`utils.state.leader`'s queries on the monitor connection."""
        if self._monitor is None or self._monitor.closed or self._monitor.broken:
            self._monitor = await self._connect("monitor")
        conn, lookups = self._monitor, self._monitor_lookups
        try:
            with lookups.running():
                return await query(conn, *args, **kwargs)
        except psycopg.OperationalError:
            # This call's connection, which may not be the current one any more (a bounded lookup
            # can end long after its caller gave up and a new monitor connection was opened).
            await self._close_quietly(conn)
            if self._monitor is conn:
                self._monitor = None
            raise

    async def holder(self, *, probe: bool = False) -> HolderInfo | None:
        row = await self._query(sql.holder_row, self.bot_id)
        if row is None or row.released:
            return None
        return HolderInfo(
            instance_id=row.instance_id, host=row.host, pid=row.pid, epoch=row.epoch,
            since=row.since, heartbeat_age=row.heartbeat_age,
            lock_held=bool(await self._query(sql.lock_is_granted, self.key)) if probe else None,
        )

    async def fence(self, holder: HolderInfo) -> str | None:
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
