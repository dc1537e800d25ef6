"""Leadership locks: the policy in :class:`LockBackend`, the mechanism in small subclasses.

Policy, shared by every backend (as filelock's ``BaseFileLock`` holds the policy and its
subclasses only ``_acquire``/``_release``):

* ``acquire`` waits without a retry loop (the mechanism blocks in the kernel or the database)
  and, while waiting, watches the holder's heartbeat; a holder silent for longer than
  ``LOCK_STALE_SECONDS`` is fenced (killed, or all its database sessions terminated) so a hung
  process cannot keep the bot down. Nothing on the way to the lock wait touches a lock that a
  hung holder may hold: the schema and the epoch are written only once the lock is ours.
* each acquisition takes a new *epoch* from the state store; every durable write carries it.
* the active term is a :class:`~utils.base.lease.Lease`; ``heartbeat`` is its verification
  and ``hold`` renews it every second while active.

Mechanisms: ``utils.locking.file_backend.FileLockBackend`` (one host) and
``utils.locking.postgres_backend.PostgresLockBackend`` (across hosts).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

from utils.base.lease import RENEW_FRACTION, Lease
from utils.base.lookup import retrieve_quietly
from utils.state.leader import Takeover
from utils.state.store import StateStore

log = logging.getLogger("solobot.lock")

HEARTBEAT_INTERVAL = 1.0
#: How often a standby reads the holder's heartbeat (from the moment it starts waiting).
HOLDER_CHECK_INTERVAL = 0.5
#: A verification slower than this counts as failed.
VERIFY_TIMEOUT = 2 * HEARTBEAT_INTERVAL
#: A step of the takeover (schema, epoch) slower than this is reported once at WARNING.
SLOW_STEP_WARNING = 2.0


@dataclass(frozen=True)
class HolderInfo:
    """Who is active, as a backend sees it (for /health, /status and ``main.py status``)."""

    instance_id: str | None
    host: str | None
    pid: int | None
    epoch: int
    since: float | None  # wall clock
    heartbeat_age: float | None
    state_id: str | None = None  # the holder's state database, where the backend records it

    def as_dict(self) -> dict[str, object]:
        return {
            "instance_id": self.instance_id,
            "host": self.host,
            "pid": self.pid,
            "epoch": self.epoch,
            "since": self.since,
            "heartbeat_age_s": None if self.heartbeat_age is None else round(self.heartbeat_age, 3),
        }

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} (instance {self.instance_id}, epoch {self.epoch})"


class LockBackend(abc.ABC):
    """One bot's leadership lock. Subclasses provide the mechanism (``_lock_*``, ``holder``...)."""

    name = "abstract"
    #: Wait before the first poll after a holder vanished without releasing while its lease may
    #: still have been running: time for a cut-off holder to notice. Zero where vanishing means
    #: it is dead (the kernel drops a flock only when the process is gone).
    unclean_takeover_delay = 0.0

    def __init__(
        self, store: StateStore, *, instance_id: str, stale_seconds: float, takeover: bool
    ) -> None:
        self.store = store
        self.instance_id = instance_id
        self.stale_seconds = stale_seconds
        self.renew_deadline = RENEW_FRACTION * stale_seconds
        self.takeover = takeover
        self.epoch = 0
        self.fenced_holders = 0
        #: Our state database's identity (file backend), to notice an instance using another one.
        self.state_id: str | None = None
        #: What a standby currently waits on, beyond the lock itself (for /health); None if nothing.
        self.note: str | None = None
        #: How long the last takeover already waited for a vanished predecessor's leftovers to go
        #: (counted against :attr:`unclean_takeover_delay`).
        self.predecessor_waited = 0.0
        #: The last lease verification; still running after an overrun (see :meth:`heartbeat`).
        self.verification: asyncio.Task[bool] | None = None

    # -- policy ------------------------------------------------------------------------------

    async def acquire(self) -> Takeover:
        """Wait until this instance leads; fence a hung holder meanwhile (if allowed)."""
        watcher = asyncio.create_task(self._watch_holder(), name="solobot-holder-watch")
        try:
            await self._lock_acquire()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        self.note = None
        try:
            await self._before_new_epoch()
            async with self._slow_step("applying the state schema"):
                await self.store.migrate()
            async with self._slow_step("taking the next epoch in the state database"):
                takeover = await self.store.leader.advance_epoch(
                    instance_id=self.instance_id, host=socket.gethostname(), pid=os.getpid(),
                    backend_pid=self._backend_pid(),
                )
            self.epoch = takeover.epoch
            await self._lock_acquired(takeover.epoch)
        except BaseException:
            await self._lock_release()
            raise
        return takeover

    def takeover_delay(self, takeover: Takeover) -> float:
        """How long a new leader waits before acting: only while the last holder's lease may live."""
        if takeover.previous_released or not self.unclean_takeover_delay:
            return 0.0
        age = takeover.previous_heartbeat_age
        if age is not None and age >= self.renew_deadline:
            return 0.0  # its lease ran out before we got here: it cannot act any more
        if not self._predecessor_may_act():
            return 0.0  # the mechanism saw it gone (no session left): nothing of it can act
        return max(0.0, self.unclean_takeover_delay - self.predecessor_waited)

    async def heartbeat(self) -> bool:
        """Is the lock still ours and our epoch current? Refreshes the heartbeat if so.

        This is the lease's verification: one round trip, bounded by :data:`VERIFY_TIMEOUT`, a hard
        bound. A call that overruns (a silent server) is not cancelled, because psycopg would wait
        seconds for the server to confirm the cancellation; it is left to end on its own (the lock
        connection's TCP timeouts end it), and until it has, every further verification fails at
        once: a late answer never vouches for a later moment.
        """
        running = self.verification
        if running is not None and not running.done():
            raise TimeoutError("the previous lease verification has not answered yet")
        task = self.verification = asyncio.ensure_future(self._lock_heartbeat())
        task.add_done_callback(retrieve_quietly)
        done, _ = await asyncio.wait({task}, timeout=VERIFY_TIMEOUT)
        if not done:
            raise TimeoutError(f"lease verification: no answer within {VERIFY_TIMEOUT:g} s")
        return task.result()

    async def hold(self, lease: Lease) -> str:
        """Renew *lease* every heartbeat while active; return why it was lost."""
        while lease.valid:
            await self._pause_between_heartbeats()
            await lease.renew()
        return lease.lost or "the active term ended"

    async def release(self, *, clean: bool) -> None:
        """Let go. *clean* says we stopped in order, so the next leader need not wait."""
        epoch, self.epoch = self.epoch, 0
        if clean and epoch:
            try:
                await self.store.leader.mark_released(epoch)
            except Exception as exc:  # noqa: BLE001 - the lock must still be released
                log.warning("could not record a clean release: %s", exc)
        await self._lock_release()

    @contextlib.asynccontextmanager
    async def _slow_step(self, what: str) -> AsyncIterator[None]:
        """Say once at WARNING if *what* blocks (e.g. on a lock a hung process holds)."""

        async def warn() -> None:
            await asyncio.sleep(SLOW_STEP_WARNING)
            blockers = await self._describe_blockers()
            log.warning("taking over: still %s after %.0f s%s", what, SLOW_STEP_WARNING,
                        f"; blocked by {blockers}" if blockers else "")

        warner = asyncio.create_task(warn())
        try:
            yield
        finally:
            warner.cancel()

    async def _watch_holder(self) -> None:
        """Standby side of hung-holder detection: fence a holder whose heartbeat went stale.

        Each outcome is logged once per holder (instance and epoch); again only when it changes.
        """
        said: dict[str, str] = {}
        first = True
        while True:
            if not first:
                await asyncio.sleep(HOLDER_CHECK_INTERVAL)
            first = False
            try:
                holder = await self.holder()
            except Exception:  # e.g. the database is down; keep waiting
                log.debug("could not read the holder", exc_info=True)
                continue
            if (holder is None or holder.heartbeat_age is None or holder.heartbeat_age <= self.stale_seconds
                    or await self.lock_is_held() is False):
                # Fresh, or a stale record of a holder that let go (the lock is free: we get it
                # next): nothing to fence, nothing to say.
                self.note = None
                said.clear()
                continue
            key = f"{holder.instance_id}/{holder.epoch}"
            if not self.takeover:
                self.note = f"holder {key} looks hung but LOCK_TAKEOVER is off"
                if said.get(key) != self.note:
                    log.warning("holder %s looks hung (heartbeat %.1f s old) but LOCK_TAKEOVER is off",
                                holder.describe(), holder.heartbeat_age)
                    said[key] = self.note
                continue
            if key not in said:
                # Log first: fencing frees the lock, and winning it cancels this watcher at once.
                log.warning("fencing hung holder %s: heartbeat %.1f s old > %.0f s",
                            holder.describe(), holder.heartbeat_age, self.stale_seconds)
                said[key] = "fencing"
            outcome = await asyncio.shield(self._fence_holder(holder))
            if outcome is None:
                if said.get(key) != "fenced":
                    self.fenced_holders += 1
                    said[key] = "fenced"
                continue
            self.note = f"hung holder {key} cannot be fenced: {outcome}"
            if said.get(key) != outcome:
                log.warning("could not fence holder %s: %s", holder.describe(), outcome)
                said[key] = outcome

    # -- mechanism ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def _lock_acquire(self) -> None: ...

    async def _before_new_epoch(self) -> None:  # noqa: B027 - optional hook
        """Free whatever a vanished holder may still hold before the epoch row is written."""

    async def _lock_acquired(self, epoch: int) -> None:  # noqa: B027 - optional hook
        """Record the new epoch where the mechanism keeps its holder record."""

    @abc.abstractmethod
    async def _lock_heartbeat(self) -> bool: ...

    @abc.abstractmethod
    async def _lock_release(self) -> None: ...

    @abc.abstractmethod
    async def holder(self) -> HolderInfo | None: ...

    @abc.abstractmethod
    async def _fence_holder(self, holder: HolderInfo) -> str | None:
        """Stop a hung holder; None on success, else why it could not be done."""

    def _backend_pid(self) -> int | None:
        return None

    def _predecessor_may_act(self) -> bool:
        """Could the last holder, which left uncleanly, still be running? True unless known gone."""
        return True

    async def _describe_blockers(self) -> str:
        """Who blocks this instance's state sessions, if the mechanism can tell."""
        return ""

    def describe_failure(self, exc: BaseException) -> str:
        """An acquisition failure as one line for logs and /health (the mechanism may say more)."""
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    async def lock_is_held(self) -> bool | None:
        """Does anybody hold the lock right now? None if the mechanism cannot tell cheaply."""
        return None

    async def holder_is_live(self, holder: HolderInfo) -> bool:
        """Does *holder* still hold the lock (for ``main.py status``)? Default: fresh heartbeat."""
        return holder.heartbeat_age is not None and holder.heartbeat_age <= self.stale_seconds

    async def _pause_between_heartbeats(self) -> None:
        await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Check or create what the mechanism needs on disk, before the first acquire (no I/O in
        the constructor: a start-up that fails later unwinds only what was opened)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Free resources (connections); the lock must already be released."""
