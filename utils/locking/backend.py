"""Leadership locks: the policy in :class:`LockBackend`, the mechanism in small subclasses.

Policy, shared by every backend:

* ``acquire`` waits without a retry loop (the mechanism blocks in the kernel or the database)
  and, while waiting, watches the holder's heartbeat; a holder silent for longer than
  ``LOCK_STALE_SECONDS`` is fenced (killed, or its database session terminated) so a hung
  process cannot keep the bot down.
* each acquisition takes a new *epoch* from the state store; every durable write carries it.
* ``hold`` runs while active: a heartbeat every second that also proves the lock is still ours.

Mechanisms: :class:`FileLockBackend` here (one host); ``utils.locking.postgres_backend.PostgresLockBackend``.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import socket
from dataclasses import dataclass

from utils.state.store import StateStore

log = logging.getLogger("solobot.lock")

HEARTBEAT_INTERVAL = 1.0


@dataclass(frozen=True)
class Lease:
    """What an acquisition gives: the fencing epoch, and whether the last holder let go cleanly."""

    epoch: int
    previous_released: bool


@dataclass(frozen=True)
class HolderInfo:
    """Who is active, as a backend sees it (for /health, /status and ``main.py status``)."""

    instance_id: str | None
    host: str | None
    pid: int | None
    epoch: int
    since: float | None  # wall clock
    heartbeat_age: float | None

    def as_dict(self) -> dict[str, object]:
        return {
            "instance_id": self.instance_id,
            "host": self.host,
            "pid": self.pid,
            "epoch": self.epoch,
            "since": self.since,
            "heartbeat_age_s": None if self.heartbeat_age is None else round(self.heartbeat_age, 3),
        }


class LockBackend(abc.ABC):
    """One bot's leadership lock. Subclasses provide the mechanism (``_lock_*``/``_holder``...)."""

    name = "abstract"
    #: Extra wait before the first poll after a holder vanished without releasing: time for a
    #: cut-off holder to notice and stop polling. Zero where vanishing means it is dead.
    unclean_takeover_delay = 0.0

    def __init__(
        self, store: StateStore, *, instance_id: str, stale_seconds: float, takeover: bool
    ) -> None:
        self.store = store
        self.instance_id = instance_id
        self.stale_seconds = stale_seconds
        self.takeover = takeover
        self.epoch = 0
        self.fenced_holders = 0

    # -- policy ------------------------------------------------------------------------------

    async def acquire(self) -> Lease:
        """Wait until this instance leads; fence a hung holder meanwhile (if allowed)."""
        watcher = asyncio.create_task(self._watch_holder(), name="solobot-holder-watch")
        try:
            await self._lock_acquire()
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        try:
            epoch, released = await self.store.advance_epoch(
                instance_id=self.instance_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                backend_pid=self._backend_pid(),
            )
            self.epoch = epoch
            await self._lock_acquired(epoch)
        except BaseException:
            await self._lock_release()
            raise
        return Lease(epoch=epoch, previous_released=released)

    async def hold(self) -> str:
        """Heartbeat while active; return why the lease was lost (never returns while it holds)."""
        while True:
            try:
                ok = await asyncio.wait_for(self._lock_heartbeat(), timeout=HEARTBEAT_INTERVAL * 2)
            except TimeoutError:
                return "lock check timed out"
            except Exception as exc:  # noqa: BLE001 - any failure means we cannot prove we lead
                return f"lock check failed ({type(exc).__name__}: {exc})"
            if not ok:
                return "fenced: a newer leader holds the lock"
            await self._pause_between_heartbeats()

    async def verify(self) -> bool:
        """Is the lock still ours and our epoch current? Checked before each getUpdates."""
        try:
            return await asyncio.wait_for(self._lock_verify(), timeout=HEARTBEAT_INTERVAL * 2)
        except Exception:
            log.debug("lock verification failed", exc_info=True)
            return False

    async def release(self, *, clean: bool) -> None:
        """Let go. *clean* says we stopped polling in order, so the next leader need not wait."""
        epoch, self.epoch = self.epoch, 0
        if clean and epoch:
            try:
                await self.store.mark_released(epoch)
            except Exception as exc:  # noqa: BLE001 - the lock must still be released
                log.warning("could not record a clean release: %s", exc)
        await self._lock_release()

    async def _watch_holder(self) -> None:
        """Standby side of hung-holder detection: fence a holder whose heartbeat went stale."""
        reported: str | None = None
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            try:
                holder = await self.holder()
            except Exception:  # e.g. the database is down; keep waiting
                log.debug("could not read the holder", exc_info=True)
                continue
            if holder is None or holder.heartbeat_age is None:
                continue
            if holder.heartbeat_age <= self.stale_seconds:
                reported = None
                continue
            key = f"{holder.instance_id}/{holder.epoch}"
            if not self.takeover:
                if reported != key:
                    log.warning(
                        "holder %s looks hung (heartbeat %.1f s old) but LOCK_TAKEOVER is off",
                        key, holder.heartbeat_age,
                    )
                    reported = key
                continue
            # Log first: fencing frees the lock, and winning it cancels this watcher at once.
            log.warning(
                "fencing hung holder: instance %s pid %s on %s (heartbeat %.1f s old > %.0f s)",
                holder.instance_id, holder.pid, holder.host, holder.heartbeat_age, self.stale_seconds,
            )
            self.fenced_holders += 1
            outcome = await asyncio.shield(self._fence_holder(holder))
            if outcome is not None:
                self.fenced_holders -= 1
                if reported != key:
                    log.warning("could not fence holder %s: %s", key, outcome)
                    reported = key

    # -- mechanism ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def _lock_acquire(self) -> None: ...

    async def _lock_acquired(self, epoch: int) -> None:  # noqa: B027 - optional hook
        """Record the new epoch where the mechanism keeps its holder record."""

    @abc.abstractmethod
    async def _lock_heartbeat(self) -> bool: ...

    @abc.abstractmethod
    async def _lock_verify(self) -> bool: ...

    @abc.abstractmethod
    async def _lock_release(self) -> None: ...

    @abc.abstractmethod
    async def holder(self) -> HolderInfo | None: ...

    @abc.abstractmethod
    async def _fence_holder(self, holder: HolderInfo) -> str | None:
        """Stop a hung holder; None on success, else why it could not be done."""

    def _backend_pid(self) -> int | None:
        return None

    async def holder_is_live(self, holder: HolderInfo) -> bool:
        """Does *holder* still hold the lock (for ``main.py status``)? Default: fresh heartbeat."""
        return holder.heartbeat_age is not None and holder.heartbeat_age <= self.stale_seconds

    async def _pause_between_heartbeats(self) -> None:
        await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Free resources (connections); the lock must already be released."""
