"""``InstanceLock``: one active instance per bot on one host (or one shared directory).

The kernel lock is the authority: an exclusive ``flock`` taken through filelock on
``solobot-<bot_id>.lock``. The kernel drops it when the holder exits or dies, in any PID namespace,
so it is right where PID files alone are not (two containers are both PID 1; a PID is reused).

The PID file beside it is the *record* of who holds the lock: JSON with pid, process start time,
host, PID namespace, instance id, start, epoch and heartbeat. Stale-PID detection reads that
record when the lock is taken and reports why the previous one was left behind (dead process,
reused PID, other namespace, corrupt file) before replacing it: a warning, never a crash.

Waiting is not a retry loop: a standby blocks in ``flock(LOCK_SH)`` on its own descriptor in a
daemon thread. That call returns the moment the exclusive holder releases or dies; the standby
then takes the exclusive lock through filelock (and goes back to waiting if another standby won).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import logging
import os
import random
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import filelock
import psutil

from utils.base.private_path import UnsafePathError, check_private_file, ensure_private_dir

log = logging.getLogger("solobot.lock")


class LockSetupError(UnsafePathError):
    """The lock directory or files are unsafe to use; a configuration problem (exit 78)."""


@dataclass(frozen=True)
class HolderRecord:
    """What the PID file says about the holder."""

    pid: int
    start_time: float  # psutil create_time of the holder process
    host: str
    pid_ns: str  # e.g. "pid:[4026531836]": PIDs only compare within one namespace
    instance_id: str
    started_at: float  # wall clock when it took the lock
    epoch: int = 0
    heartbeat: float = 0.0  # wall clock of the last heartbeat
    state_id: str = ""  # which state database the holder uses (see FileMechanism)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} (instance {self.instance_id}, epoch {self.epoch})"

    def heartbeat_age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - (self.heartbeat or self.started_at))


def current_pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return "unknown"


def process_start_time(pid: int) -> float | None:
    """Start time of *pid* as psutil sees it, or None if there is no such process."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def proc_is_ours() -> bool:
    """True when /proc shows this PID namespace (PIDs in /proc are the ones we see)."""
    try:
        return int(os.readlink("/proc/self")) == os.getpid()
    except (OSError, ValueError):
        return False


class InstanceLock:
    """The file lock of one bot in *lock_dir*, plus the PID file recording its holder."""

    def __init__(self, lock_dir: Path, key: str, instance_id: str) -> None:
        self.lock_dir = Path(lock_dir)
        self.key = key
        self.instance_id = instance_id
        self.lock_path = self.lock_dir / f"solobot-{key}.lock"
        self.pid_path = self.lock_dir / f"solobot-{key}.pid"
        self._lock: filelock.UnixFileLock | None = None
        self._record: HolderRecord | None = None
        self.state_id = ""  # written into our record; set by the backend
        # Fixed for the life of the process; read once, not at every heartbeat.
        self._start_time = process_start_time(os.getpid()) or 0.0
        self._host = socket.gethostname()
        self._pid_ns = current_pid_ns()

    # -- setup -------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the directory (0700) and refuse one someone else could control (a symlink, not
        ours or root's, writable by others), and lock or PID files that are symlinks or not ours
        (:mod:`utils.base.private_path`): whoever controls them could forge the record we act on."""
        ensure_private_dir(self.lock_dir, "LOCK_DIR")
        for path in (self.lock_path, self.pid_path):
            check_private_file(path, "lock file" if path == self.lock_path else "PID file")

    # -- acquisition -------------------------------------------------------------------------

    @property
    def is_held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def try_acquire(self) -> bool:
        """One non-blocking attempt; on success the stale record (if any) is reported and replaced."""
        if self.is_held:
            return True
        if self.lock_path.is_symlink():
            raise LockSetupError(f"{self.lock_path}: is a symlink; refusing to follow it")
        lock = filelock.UnixFileLock(str(self.lock_path), mode=0o600, thread_local=False)
        try:
            lock.acquire(blocking=False)
        except filelock.Timeout:
            return False
        self._lock = lock
        try:
            self._report_stale_record()
            self.write_record(epoch=0)
        except BaseException:
            self.release()
            raise
        return True

    def wait_until_free(self) -> None:
        """Block (in a thread) until no process holds the exclusive lock. Not a poll: one flock call."""
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.lock_path, flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def is_taken_elsewhere(self) -> bool:
        """Does another open file description hold the exclusive lock right now?"""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops the shared lock, if we got it
        return False

    async def acquire(self) -> None:
        """Wait until this instance holds the lock. Cancel the awaiting task to give up."""
        loop = asyncio.get_running_loop()
        while not self.try_acquire():
            # A dedicated daemon thread, not the default executor: a standby that shuts down
            # while waiting must not be kept alive by a thread blocked in flock.
            freed: asyncio.Future[None] = loop.create_future()

            def wait(fut: asyncio.Future[None] = freed) -> None:
                try:
                    self.wait_until_free()
                    error: BaseException | None = None
                except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                    error = exc

                def settle() -> None:
                    if fut.done():
                        return
                    if error is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(error)

                try:
                    loop.call_soon_threadsafe(settle)
                except RuntimeError:  # the loop closed while we waited
                    pass

            threading.Thread(target=wait, name="solobot-lock-wait", daemon=True).start()
            await freed
            # Several standbys wake together; a few ms of jitter keeps them from colliding.
            await asyncio.sleep(random.uniform(0, 0.003))

    def release(self) -> None:
        """Remove our record (only if it is ours) and drop the kernel lock."""
        if self._lock is None:
            return
        try:
            record, _ = self.read_record()
            if record is not None and record.instance_id == self.instance_id:
                self.pid_path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove PID file %s: %s", self.pid_path, exc)
        finally:
            lock, self._lock, self._record = self._lock, None, None
            lock.release(force=True)

    # -- the record --------------------------------------------------------------------------

    def own_record(self, epoch: int) -> HolderRecord:
        now = time.time()
        pid = os.getpid()
        started = self._record.started_at if self._record else now
        return HolderRecord(
            pid=pid,
            start_time=self._start_time,
            host=self._host,
            pid_ns=self._pid_ns,
            instance_id=self.instance_id,
            started_at=started,
            epoch=epoch,
            heartbeat=now,
            state_id=self.state_id,
        )

    def write_record(self, epoch: int) -> HolderRecord:
        """Atomically (re)write the PID file: also the file backend's heartbeat."""
        record = self.own_record(epoch)
        tmp = self.pid_path.with_name(self.pid_path.name + f".{os.getpid()}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, json.dumps(asdict(record)).encode())
        finally:
            os.close(fd)
        os.replace(tmp, self.pid_path)
        self._record = record
        return record

    def read_record(self) -> tuple[HolderRecord | None, str | None]:
        """The record and, when it is unusable, why (missing is ``(None, None)``)."""
        try:
            fd = os.open(self.pid_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return None, "it is a symlink"
            return None, f"unreadable ({exc.strerror})"
        try:
            raw = os.read(fd, 65536)
        finally:
            os.close(fd)
        try:
            data: Any = json.loads(raw)
            return HolderRecord(**data), None
        except (ValueError, TypeError) as exc:
            return None, f"corrupt ({type(exc).__name__})"

    def _report_stale_record(self) -> None:
        """We hold the kernel lock, so any record left behind is stale: say why, then replace it."""
        record, problem = self.read_record()
        if problem:
            log.warning("stale PID file %s is %s; replacing it", self.pid_path, problem)
            return
        if record is None:
            return
        same_place = record.host == socket.gethostname() and record.pid_ns == current_pid_ns()
        if not same_place or not proc_is_ours():
            log.warning(
                "stale PID file: %s left no lock behind (another host or PID namespace, "
                "so its PID means nothing here); replacing it",
                record.describe(),
            )
            return
        start = process_start_time(record.pid)
        if start is None:
            reason = "that process is dead"
        elif abs(start - record.start_time) > 1.0:
            reason = "that PID now belongs to another process (PID reused)"
        else:
            reason = "that process is alive but no longer holds the lock"
        log.warning("stale PID file: %s, but %s; replacing it", record.describe(), reason)
