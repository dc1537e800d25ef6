"""Private paths: the pure checks on lstat results, the kernel's word on a flock, and the files."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

import pytest

from utils.base.private_path import (
    UnsafePathError,
    create_private_file,
    dir_problem,
    ensure_private_dir,
    file_problem,
)
from utils.locking.kernel_locks import exclusive_holders, flock_writers
from utils.state.database import prepare_sqlite_files

ME, OTHER = 1000, 65534


def st(mode: int, uid: int = ME) -> os.stat_result:
    return os.stat_result((mode, 0, 0, 1, uid, uid, 0, 0, 0, 0))


@pytest.mark.parametrize(("mode", "uid", "problem"), [
    (stat.S_IFDIR | 0o700, ME, None),
    (stat.S_IFDIR | 0o755, ME, None),
    (stat.S_IFDIR | 0o755, 0, None),  # root's (/run, a volume root)
    (stat.S_IFDIR | 0o700, OTHER, "owned by"),
    (stat.S_IFDIR | 0o1777, 0, "writable by other users"),
    (stat.S_IFDIR | 0o770, ME, "writable by other users"),
    (stat.S_IFLNK | 0o777, ME, "symlink"),
    (stat.S_IFREG | 0o600, ME, "not a directory"),
])
def test_dir_problem(mode: int, uid: int, problem: str | None) -> None:
    found = dir_problem(st(mode, uid), ME)
    assert (found is None) if problem is None else (found is not None and problem in found)


@pytest.mark.parametrize(("mode", "uid", "problem"), [
    (stat.S_IFREG | 0o600, ME, None),
    (stat.S_IFREG | 0o666, ME, None),  # ours: tightened, not refused
    (stat.S_IFREG | 0o600, 0, "owned by"),
    (stat.S_IFREG | 0o600, OTHER, "owned by"),
    (stat.S_IFLNK | 0o777, ME, "symlink"),
    (stat.S_IFDIR | 0o700, ME, "not a regular file"),
])
def test_file_problem(mode: int, uid: int, problem: str | None) -> None:
    found = file_problem(st(mode, uid), ME)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_own_open_file_tightened_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "f"
    path.write_text("x")
    path.chmod(0o644)
    create_private_file(path, "state database")
    create_private_file(path, "state database")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [r.getMessage() for r in caplog.records] == [
        f"state database {path} was open to other users (mode 644); changed it to 600"]


def test_foreign_state_files_refused(tmp_path: Path) -> None:
    """A STATE_DIR, a database or a -wal of another user (nobody, 65534) is refused, untouched."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    db = state / "solobot.sqlite3"
    wal = state / "solobot.sqlite3-wal"
    for foreign in (wal, db):
        foreign.write_bytes(b"theirs")
        foreign.chmod(0o666)
        os.chown(foreign, OTHER, OTHER)
        with pytest.raises(UnsafePathError, match=f"state database {foreign}: owned by"):
            prepare_sqlite_files(db)
        assert stat.S_IMODE(foreign.stat().st_mode) == 0o666 and foreign.read_bytes() == b"theirs"
        foreign.unlink()
    os.chown(state, OTHER, OTHER)
    with pytest.raises(UnsafePathError, match=f"STATE_DIR {state}: owned by"):
        prepare_sqlite_files(db)
    assert not db.exists()


def test_symlinked_state_dir_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UnsafePathError, match="symlink"):
        ensure_private_dir(tmp_path / "link", "STATE_DIR")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UnsafePathError, match="symlink"):
        create_private_file(tmp_path / "dangling", "x")
    assert not (tmp_path / "nowhere").exists()


def test_flock_writers_parses_proc_locks() -> None:
    dev = os.makedev(0xFE, 0)
    text = ("1: FLOCK  ADVISORY  WRITE 14225 fe:00:2146827 0 EOF\n"
            "1: -> FLOCK  ADVISORY  WRITE 777 fe:00:2146827 0 EOF\n"  # a waiter holds nothing
            "2: FLOCK  ADVISORY  READ 15 fe:00:2146827 0 EOF\n"
            "3: POSIX  ADVISORY  WRITE 16 fe:00:2146827 0 EOF\n"
            "4: FLOCK  ADVISORY  WRITE 17 fe:01:2146827 0 EOF\n"
            "5: FLOCK  ADVISORY  WRITE 18 fe:00:2146828 0 EOF\n"
            "garbage\n")
    assert flock_writers(text, dev, 2146827) == {14225}


def test_exclusive_holders_of_a_real_flock(tmp_path: Path) -> None:
    path = tmp_path / "l"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert exclusive_holders(path) == set()
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert exclusive_holders(path) == {os.getpid()}
    finally:
        os.close(fd)
    assert exclusive_holders(path) == set()
    assert exclusive_holders(tmp_path / "missing") is None
