"""``bash tests/run``, the README's test command: where a prerequisite cannot be had, it stops before
any test, in seconds, with one line per missing piece and how to get it (never a traceback from
deep inside the suite)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.conftest import ROOT

#: What the script itself runs with: a shell and a few core utilities, nothing it checks for.
BASE_TOOLS = ("bash", "dirname", "id", "sed", "seq", "sort", "tail", "ls", "sleep", "cat")
#: "In seconds": the check runs no test and installs nothing here.
CHECK_BOUND = 10.0
EX_UNAVAILABLE = 69


def test_missing_prerequisites_stop_before_the_tests_with_one_line_each(tmp_path: Path) -> None:
    """A machine without apt-get (not Debian), PostgreSQL, systemd-analyze, promtool, unshare or
    Python: simulated with a PATH that holds only the shell's basics."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in BASE_TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "DATABASE_URL": "postgresql://tester:s3cret@127.0.0.1:1/test",
           "SOLOBOT_TEST_OWNER": os.environ["SOLOBOT_TEST_OWNER"]}
    started = time.monotonic()
    done = subprocess.run(["bash", str(ROOT / "tests" / "run"), "--setup-only"], env=env,
                          executable=bin_dir / "bash", capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == EX_UNAVAILABLE, done.stdout + done.stderr
    assert elapsed < CHECK_BOUND
    lines = done.stderr.splitlines()
    assert lines[0] == "tests/run: cannot run the tests here; missing:"
    items = [line.removeprefix("  - ") for line in lines[1:]]
    assert all(line.startswith("  - ") for line in lines[1:]), done.stderr
    for piece, how in (("python3 3.11+ with venv", "apt-get install python3 python3-venv"),
                       ("PostgreSQL (psql, pg_isready", "apt-get install postgresql"),
                       ("systemd-analyze", "apt-get install systemd"),
                       ("promtool", "apt-get install prometheus"),
                       ("unshare -pf", "run as root")):
        line = next((item for item in items if item.startswith(piece)), None)
        assert line is not None and how in line, f"{piece}: {done.stderr}"
    assert "s3cret" not in done.stdout + done.stderr and "tester:***@" in done.stderr
    assert "Traceback" not in done.stderr and "pytest" not in done.stdout
