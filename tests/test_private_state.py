"""A lock or state directory someone else controls is refused (exit 78), and a PID record is never
enough to make the bot signal a process. The refusals run the whole daemon in-process
(tests/daemon.py); the forged record's test is a real process, for the lock is held by another
process (this test's) and the bot must tell the kernel's word from the record's."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import BOT_ID, BotProcess, wait_until
from tests.daemon import InProcessDaemon, StartDaemon, in_process, wait_for  # noqa: F401
from utils.base.exit_codes import EXIT_CONFIG

Spawn = Callable[..., BotProcess]
NOBODY = 65534


@pytest.fixture
def victim() -> Iterator[psutil.Process]:
    """An unrelated process of ours that a forged PID record names."""
    proc = subprocess.Popen(["sleep", "300"])
    yield psutil.Process(proc.pid)
    proc.kill()
    proc.wait()


def forge_record(lock_dir: Path, victim: psutil.Process) -> None:
    """A PID record naming *victim* with its real start time and a long-dead heartbeat."""
    record = {"pid": victim.pid, "start_time": victim.create_time(), "host": socket.gethostname(),
              "pid_ns": os.readlink("/proc/self/ns/pid"), "instance_id": "forged", "started_at": 1.0,
              "epoch": 1, "heartbeat": time.time() - 3600}
    (lock_dir / f"solobot-{BOT_ID}.pid").write_text(json.dumps(record))


async def refused(bot: InProcessDaemon, *words: str) -> str:
    assert await bot.wait_exit(60) == EXIT_CONFIG, bot.log()
    text = bot.log()
    assert all(w in text for w in words), text
    return text


async def test_symlinked_lock_dir_refused_nothing_signalled(in_process: StartDaemon, tmp_path: Path,  # noqa: F811
                                                             victim: psutil.Process) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    forge_record(real, victim)
    link = tmp_path / "lock-link"
    link.symlink_to(real)
    await refused(await in_process("a", LOCK_DIR=str(link), LOCK_STALE_SECONDS="1"), f"LOCK_DIR {link}: is a symlink")
    assert victim.is_running() and victim.status() != psutil.STATUS_ZOMBIE


async def test_lock_dir_of_another_user_refused_nothing_signalled(in_process: StartDaemon,  # noqa: F811
                                                                  tmp_path: Path, victim: psutil.Process) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    forge_record(theirs, victim)
    os.chown(theirs, NOBODY, NOBODY)
    await refused(await in_process("a", LOCK_DIR=str(theirs), LOCK_STALE_SECONDS="1"),
                  f"LOCK_DIR {theirs}: owned by", f"uid {NOBODY}")
    assert victim.is_running() and victim.status() != psutil.STATUS_ZOMBIE


def test_forged_pid_record_leads_to_no_signal(spawn: Spawn, shared_dirs: dict[str, Path],
                                              victim: psutil.Process) -> None:
    """The lock is held (by this test process) and the record names an unrelated process with its
    real start time: the kernel says who holds the lock, so the bot reports and kills nothing."""
    lock_dir = shared_dirs["lock"]
    lock_dir.mkdir(mode=0o700)
    fd = os.open(lock_dir / f"solobot-{BOT_ID}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        forge_record(lock_dir, victim)
        bot = spawn("a", LOCK_STALE_SECONDS="1")
        wait_until(lambda: "could not fence holder" in bot.log(), 60, message="the bot reports the forgery")
        assert f"pid {victim.pid} does not hold the lock" in bot.log()
        assert f"the kernel says: {os.getpid()}" in bot.log()
        assert victim.is_running() and victim.status() != psutil.STATUS_ZOMBIE
        assert bot.mode() == "passive"
    finally:
        os.close(fd)  # the lock is free: the bot takes it
    bot.wait_mode("active")
    assert victim.is_running() and victim.status() != psutil.STATUS_ZOMBIE


async def test_foreign_state_dir_and_database_refused(in_process: StartDaemon, tmp_path: Path) -> None:  # noqa: F811
    theirs = tmp_path / "state-theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    await refused(await in_process("a", STATE_DIR=str(theirs), DATABASE_URL=""), f"STATE_DIR {theirs}: owned by")
    assert list(theirs.iterdir()) == []

    ours = tmp_path / "state-ours"
    ours.mkdir(mode=0o700)
    db = ours / "solobot.sqlite3"
    db.write_bytes(b"")
    db.chmod(0o666)
    os.chown(db, NOBODY, NOBODY)
    await refused(await in_process("b", STATE_DIR=str(ours), DATABASE_URL=""), f"state database {db}: owned by")
    assert db.read_bytes() == b"" and stat.S_IMODE(db.stat().st_mode) == 0o666


async def test_own_open_database_tightened_once(in_process: StartDaemon, shared_dirs: dict[str, Path]) -> None:  # noqa: F811
    state = shared_dirs["state"]
    state.mkdir(mode=0o700)
    db = state / "solobot.sqlite3"
    db.write_bytes(b"")
    db.chmod(0o644)
    bot = await in_process("a", DATABASE_URL="")  # SQLite in STATE_DIR
    await bot.wait_mode("active")
    assert bot.log().count("was open to other users (mode 644); changed it to 600") == 1, bot.log()
    for path in (db, state / "solobot.sqlite3-wal", state / "solobot.sqlite3-shm"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
