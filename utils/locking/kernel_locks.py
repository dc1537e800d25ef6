"""Who holds a ``flock`` on a file, as the kernel says (``/proc/locks``), not as a file claims.

Why: fencing a hung holder means SIGKILL to the PID in its record, and a record is only a file.
Before a signal, the standby proves that this PID holds the exclusive kernel lock on this very
lock file (device and inode). A forged record naming some other process, or a PID that was
reused, then leads to a report and no signal.

``/proc/locks`` lines look like ``1: FLOCK  ADVISORY  WRITE 14225 fe:00:2146827 0 EOF``: the lock
kind, READ or WRITE, the owner's PID (in the reader's PID namespace), then the file as
``major:minor:inode`` (major and minor in hex). A waiter's line has ``->`` after the number and
holds nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC_LOCKS = Path("/proc/locks")


def flock_writers(text: str, device: int, inode: int) -> set[int]:
    """PIDs holding an exclusive ``flock`` on the file (*device*, *inode*) in a /proc/locks text (pure)."""
    holders: set[int] = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":
            continue
        kind, access, pid, where = fields[1], fields[3], fields[4], fields[5]
        if kind != "FLOCK" or access != "WRITE":
            continue
        major, _, rest = where.partition(":")
        minor, _, ino = rest.partition(":")
        try:
            same = (int(major, 16), int(minor, 16), int(ino)) == (os.major(device), os.minor(device), inode)
            owner = int(pid)
        except ValueError:
            continue
        if same and owner > 0:
            holders.add(owner)
    return holders


def exclusive_holders(path: Path) -> set[int] | None:
    """PIDs that hold an exclusive ``flock`` on *path* right now, or None when the kernel cannot tell
    us (no /proc/locks, the file is gone)."""
    try:
        st = os.stat(path, follow_symlinks=False)
        text = PROC_LOCKS.read_text()
    except OSError:
        return None
    return flock_writers(text, st.st_dev, st.st_ino)
