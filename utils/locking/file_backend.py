"""The file mechanism of :class:`LockBackend`: :class:`InstanceLock` on one host (or a shared directory).

The kernel lock decides who leads; the PID record beside it carries the epoch and the heartbeat.
A hung holder is fenced by SIGKILL after its pid and start time are checked, which also frees any
SQLite lock it held (SQLite's locks die with the process).
"""

from __future__ import annotations

import os
import signal
import socket

from utils.locking.backend import HolderInfo, LockBackend
from utils.locking.instance_lock import (
    InstanceLock,
    current_pid_ns,
    proc_is_ours,
    process_start_time,
)
from utils.state.store import StateStore


class FileLockBackend(LockBackend):
    """Same host (or a shared directory): :class:`InstanceLock`; heartbeat and epoch in its record."""

    name = "file"

    def __init__(self, lock: InstanceLock, store: StateStore, **kwargs: object) -> None:
        super().__init__(store, **kwargs)  # type: ignore[arg-type]
        self.lock = lock

    async def _lock_acquire(self) -> None:
        await self.lock.acquire()

    async def _lock_acquired(self, epoch: int) -> None:
        self.lock.write_record(epoch)

    async def _lock_heartbeat(self) -> bool:
        if not await self._lock_verify():
            return False
        self.lock.write_record(self.epoch)
        return True

    async def _lock_verify(self) -> bool:
        if not self.lock.is_held:
            return False
        record, _ = self.lock.read_record()
        return record is not None and (record.instance_id, record.epoch) == (
            self.instance_id,
            self.epoch,
        )

    async def _lock_release(self) -> None:
        self.lock.release()

    async def holder(self) -> HolderInfo | None:
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
        )

    async def holder_is_live(self, holder: HolderInfo) -> bool:
        return self.lock.is_taken_elsewhere()

    async def _fence_holder(self, holder: HolderInfo) -> str | None:
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
        if start is None or abs(start - record.start_time) > 1.0:
            return f"pid {record.pid} is not the recorded process any more"
        try:
            os.kill(record.pid, signal.SIGKILL)
        except ProcessLookupError:
            return None  # it died on its own
        except PermissionError:
            return f"no permission to signal pid {record.pid}"
        return None
