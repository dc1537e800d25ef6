"""Directories and files only this user can change: the lock directory, the state directory and
the files in them.

Why: whoever can write the lock directory can forge the PID record the bot acts on (and hold
the lock); whoever can write the state directory or the SQLite file (or its -wal/-shm) can read
the inbox and insert updates "from" an admin. The default ``LOCK_DIR`` is under ``/tmp``, where
any local user can create ``/tmp/solobot-<uid>`` first. So before using a path solobot checks,
without following a symlink (``lstat``), that it is

* not a symlink (it would lead somewhere else, chosen by whoever made it),
* owned by the running user (a directory may also be root's: ``/run``, a volume root),
* not writable by the group or others (a directory) - a file of ours that is readable or
  writable by others is tightened to 0600 with one WARNING instead (we made it, or an older
  solobot did, with a looser umask).

A path that fails is refused with :class:`UnsafePathError`: one line naming the path and the
problem, a configuration error (exit 78). Checking the final component is enough: a directory
that passes admits no one else's files, and its own parents are the operator's choice.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("solobot")

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
#: Mode bits that let a user other than the owner read or change a file.
OTHERS_BITS = stat.S_IRWXG | stat.S_IRWXO
#: Mode bits that let a user other than the owner add, remove or rename a directory's entries.
OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


class UnsafePathError(Exception):
    """A directory or file someone else could control; a configuration problem (exit 78)."""


def _owner(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def dir_problem(st: os.stat_result, euid: int) -> str | None:
    """Why a directory with this ``lstat`` result is not private to *euid*, or None (pure)."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink; refusing to follow it (point the setting at the real directory)"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid not in (euid, 0):
        return (f"owned by {_owner(st.st_uid)}, not by the user running solobot ({_owner(euid)}) "
                "or root; someone else could replace what is in it")
    if st.st_mode & OTHERS_WRITE:
        return (f"writable by other users (mode {stat.S_IMODE(st.st_mode):o}); use a private "
                f"directory (chmod {PRIVATE_DIR_MODE:o})")
    return None


def file_problem(st: os.stat_result, euid: int) -> str | None:
    """Why an existing file with this ``lstat`` result may not be used by *euid*, or None (pure).

    A mode open to others is not a problem here: :func:`check_private_file` tightens it."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink; refusing to follow it (remove it)"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != euid:
        return (f"owned by {_owner(st.st_uid)}, not by the user running solobot ({_owner(euid)}); "
                "remove it or give it to that user")
    return None


def ensure_private_dir(path: Path, what: str) -> None:
    """Create *path* 0700 (and its parents) if missing; refuse it unless it is private to us."""
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # a symlink to nowhere or a file: lstat below says which
    except OSError as exc:
        raise UnsafePathError(f"{what} {path}: cannot create it ({exc.strerror})") from exc
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise UnsafePathError(f"{what} {path}: {exc.strerror}") from exc
    problem = dir_problem(st, os.geteuid())
    if problem:
        raise UnsafePathError(f"{what} {path}: {problem}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UnsafePathError(f"{what} {path}: not writable by uid {os.geteuid()}")


def check_private_file(path: Path, what: str) -> bool:
    """Refuse an existing *path* that is a symlink or not ours; tighten ours to 0600 (one WARNING).

    Returns whether the file exists. A missing file is fine (the caller creates it 0600)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise UnsafePathError(f"{what} {path}: {exc.strerror}") from exc
    problem = file_problem(st, os.geteuid())
    if problem:
        raise UnsafePathError(f"{what} {path}: {problem}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & OTHERS_BITS:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            os.fchmod(fd, PRIVATE_FILE_MODE)
        finally:
            os.close(fd)
        log.warning("%s %s was open to other users (mode %o); changed it to %o", what, path, mode,
                    PRIVATE_FILE_MODE)
    return True


def create_private_file(path: Path, what: str) -> None:
    """Check an existing *path* (:func:`check_private_file`), or create it 0600, never through a symlink."""
    if check_private_file(path, what):
        return
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        os.close(os.open(path, flags, PRIVATE_FILE_MODE))
    except FileExistsError:
        check_private_file(path, what)  # made meanwhile (another instance): the same checks
    except OSError as exc:
        raise UnsafePathError(f"{what} {path}: cannot create it ({exc.strerror})") from exc
