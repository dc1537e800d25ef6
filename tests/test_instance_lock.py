"""InstanceLock: the kernel lock decides; the PID file is a record, checked for staleness."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from utils.base.private_path import UnsafePathError
from utils.locking.instance_lock import InstanceLock, process_start_time


def make(tmp_path: Path, name: str = "i1") -> InstanceLock:
    lock = InstanceLock(tmp_path / "locks", "123456", name)
    lock.prepare()
    return lock


def test_one_holder_and_record(tmp_path: Path) -> None:
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    assert a.try_acquire()
    assert not b.try_acquire()
    record, problem = b.read_record()
    assert problem is None and record is not None
    assert (record.pid, record.instance_id) == (os.getpid(), "a")
    assert record.start_time == process_start_time(os.getpid())
    assert b.is_taken_elsewhere()
    a.release()
    assert not a.pid_path.exists()
    assert b.try_acquire()
    b.release()


def test_directory_created_private(tmp_path: Path) -> None:
    lock = make(tmp_path)
    assert (lock.lock_dir.stat().st_mode & 0o777) == 0o700


def test_dir_writable_by_others_refused_even_sticky(tmp_path: Path) -> None:
    """Anyone who can add entries could create the PID file first (sticky or not)."""
    d = tmp_path / "open"
    d.mkdir()
    for mode in (0o777, 0o1777, 0o775):
        d.chmod(mode)
        with pytest.raises(UnsafePathError, match=f"LOCK_DIR {d}: writable by other users"):
            InstanceLock(d, "1", "x").prepare()
    d.chmod(0o755)
    InstanceLock(d, "1", "x").prepare()


def test_symlinked_dir_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UnsafePathError, match="is a symlink"):
        InstanceLock(link, "1", "x").prepare()


def test_symlinked_pid_file_refused(tmp_path: Path) -> None:
    lock = make(tmp_path)
    target = tmp_path / "elsewhere"
    target.write_text("x")
    lock.pid_path.symlink_to(target)
    with pytest.raises(UnsafePathError, match="symlink"):
        lock.prepare()
    assert target.read_text() == "x"


def write_record(lock: InstanceLock, **fields: object) -> None:
    base: dict[str, object] = {
        "pid": os.getpid(), "start_time": process_start_time(os.getpid()), "host": os.uname().nodename,
        "pid_ns": os.readlink("/proc/self/ns/pid"), "instance_id": "old", "started_at": time.time(),
    }
    base.update(fields)
    lock.pid_path.write_text(json.dumps(base))


def stale_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture, **fields: object) -> str:
    lock = make(tmp_path)
    write_record(lock, **fields)
    with caplog.at_level("WARNING"):
        assert lock.try_acquire()
    record, _ = lock.read_record()
    assert record is not None and record.instance_id == "i1", "stale record replaced"
    lock.release()
    return caplog.text


def test_stale_record_of_dead_process(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert "dead" in stale_warning(tmp_path, caplog, pid=dead.pid)


def test_stale_record_with_reused_pid(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert "reused" in stale_warning(tmp_path, caplog, start_time=1.0)


def test_stale_record_from_other_namespace(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert "another host or PID namespace" in stale_warning(tmp_path, caplog, pid=1, pid_ns="pid:[1]")


def test_corrupt_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = make(tmp_path)
    lock.pid_path.write_text("{{{")
    with caplog.at_level("WARNING"):
        assert lock.try_acquire()
    assert "corrupt" in caplog.text
    lock.release()


async def assert_waiter_wakes_promptly(waiter_lock: InstanceLock, free_the_lock: Callable[[], object]) -> None:
    """*waiter_lock* waits while the lock is held, then gets it within 0.5 s of *free_the_lock*."""
    waiter = asyncio.create_task(waiter_lock.acquire())
    await asyncio.sleep(0.2)
    assert not waiter.done()
    freed = time.monotonic()
    free_the_lock()
    await asyncio.wait_for(waiter, 2)
    assert time.monotonic() - freed < 0.5  # typically a few ms: a blocked flock, no polling
    waiter_lock.release()


async def test_waiter_wakes_when_holder_releases(tmp_path: Path) -> None:
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    assert a.try_acquire()
    await assert_waiter_wakes_promptly(b, a.release)


async def test_waiter_wakes_when_holder_process_dies(tmp_path: Path) -> None:
    lock_dir = tmp_path / "locks"
    root = str(Path(__file__).parent.parent)
    code = (f"import sys, time; sys.path.insert(0, {root!r})\n"
            "from utils.locking.instance_lock import InstanceLock\n"
            f"l = InstanceLock({str(lock_dir)!r}, '123456', 'holder'); l.prepare(); assert l.try_acquire()\n"
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)  # noqa: ASYNC220
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"

    def kill_holder() -> None:
        holder.kill()
        holder.wait()

    await assert_waiter_wakes_promptly(InstanceLock(lock_dir, "123456", "b"), kill_holder)


async def test_waiting_can_be_cancelled(tmp_path: Path) -> None:
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    assert a.try_acquire()
    waiter = asyncio.create_task(b.acquire())
    await asyncio.sleep(0.1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not b.is_held
    a.release()
