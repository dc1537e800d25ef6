"""The file mechanism of the leadership lock: :class:`InstanceLock` on one host (or a shared directory).

The kernel lock decides who leads; the PID record beside it carries the epoch and the heartbeat.
A hung holder is fenced by SIGKILL, which also frees any SQLite lock it held (SQLite's locks die
with the process), but only once the kernel confirms that the recorded PID holds the lock on this
very file (``/proc/locks``, :mod:`utils.locking.kernel_locks`) and its start time matches the
record: the record alone is a file anyone with access could have written, and a signal on its
word could kill an unrelated process.
"""

from __future__ import annotations

import os
import signal
import socket

from utils.locking.backend import Claim, Grant, HolderInfo, LockMechanism
from utils.locking.instance_lock import (
    InstanceLock,
    current_pid_ns,
    proc_is_ours,
    process_start_time,
)
from utils.locking.kernel_locks import exclusive_holders
from utils.state.store import StateStore


def state_identity(store: StateStore) -> str:
    """Which state database this instance uses, comparable across containers on one host.

    Two containers of one bot must share the state volume as well as the lock volume, or the
    epochs, the inbox and the post states do not carry across a handover. The SQLite file's
    directory is identified by device and inode: the same volume mounted in two containers gives
    the same pair, two volumes do not.
    """
    target = store.target
    if target is None or target.sqlite_path is None:
        return target.display if target is not None else ""
    try:
        st = target.sqlite_path.parent.stat()
    except OSError:
        return str(target.sqlite_path)
    return f"sqlite:{st.st_dev}:{st.st_ino}"


#: psutil start times of one process agree to well within this (seconds); a reused PID does not.
START_TIME_TOLERANCE = 1.0


class FileMechanism(LockMechanism):
    """Same host (or a shared directory): :class:`InstanceLock`; heartbeat and epoch in its record.

    A vanished holder is a dead one (the kernel drops a flock only with the process), so a grant
    never asks the new leader to wait (:attr:`Grant.settle` is zero).
    """

    name = "file"

    def __init__(self, lock: InstanceLock, store: StateStore, *, stale_seconds: float) -> None:
        self.lock = lock
        self.stale_seconds = stale_seconds  # a fenced holder's record is read again: recovered?
        self.instance_id = lock.instance_id
        self.store = store

    async def open(self) -> None:
        """The lock directory, private to this user (:meth:`InstanceLock.prepare`), and the state
        database's identity for our record (the state directory exists once the store is open)."""
        self.lock.prepare()
        self.lock.state_id = self.state_id = state_identity(self.store)

    async def acquire(self, claim: Claim) -> Grant:
        await self.lock.acquire()
        await claim.locked()
        takeover = await claim.take_epoch()
        self.lock.write_record(takeover.epoch)
        return Grant(takeover)

    async def heartbeat(self, epoch: int) -> bool:
        """Still ours (the kernel lock, and the record names us with our epoch)? Then refresh it."""
        if not self.lock.is_held:
            return False
        record, _ = self.lock.read_record()
        if record is None or (record.instance_id, record.epoch) != (self.instance_id, epoch):
            return False
        self.lock.write_record(epoch)
        return True

    async def release(self) -> None:
        self.lock.release()

    async def holder(self, *, probe: bool = False) -> HolderInfo | None:
        record, _ = self.lock.read_record()
        if record is None:
            return None
        return HolderInfo(
            instance_id=record.instance_id,
            host=record.host,
            pid=record.pid,
            epoch=record.epoch,
            since=record.started_at,
            heartbeat_age=record.heartbeat_age(),
            state_id=record.state_id or None,
            lock_held=self.lock.is_taken_elsewhere() if probe else None,
        )

    async def fence(self, holder: HolderInfo) -> str | None:
        record, problem = self.lock.read_record()
        if record is None or problem:
            return problem or "no holder record"
        if record.host != socket.gethostname() or record.pid_ns != current_pid_ns():
            return "it runs on another host or in another PID namespace"
        if not proc_is_ours():
            return "/proc does not show this PID namespace"
        if record.heartbeat_age() <= self.stale_seconds:
            return "it recovered"
        start = process_start_time(record.pid)
        if start is None or abs(start - record.start_time) > START_TIME_TOLERANCE:
            return f"pid {record.pid} is not the recorded process any more"
        holders = exclusive_holders(self.lock.lock_path)
        if holders is None:
            return "the kernel cannot say who holds the lock (/proc/locks unreadable); not signalled"
        if record.pid not in holders:
            shown = ", ".join(map(str, sorted(holders))) or "none visible"
            return (f"pid {record.pid} does not hold the lock on {self.lock.lock_path} (the kernel "
                    f"says: {shown}); the record is wrong, so nothing is signalled")
        try:
            os.kill(record.pid, signal.SIGKILL)
        except ProcessLookupError:
            return None  # it died on its own
        except PermissionError:
            return f"no permission to signal pid {record.pid}"
        return None
