"""Database errors in one line (host, port, database, reason; never the password) and ``main.py status``
against a database that refuses, hangs or does not exist: exit 4 in one line, no traceback."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.exc import OperationalError as SQLAlchemyOperationalError
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import DATABASE_URL, ROOT, TOKEN, LoadAllowance, run_main_in_process
from utils.ops.status import ANSWER_WITHIN, MIN_QUERY_TIMEOUT, query_timeout
from utils.state.database import DatabaseTarget
from utils.state.errors import database_location, describe_database_error

PASSWORD = "s3cret-Pa55"
#: The issue's bound for ``main.py status`` against a database that does not answer.
STATUS_ANSWER_BOUND = 3.0
#: Python's start plus the status command's imports on an idle machine of the project's kind.
#: When the machine is busier (other tests, other workers), the start takes longer than this, and
#: only that surplus, measured just before, is added to the bound: the wait for the database
#: itself must still end in time.
IDLE_START_COST = 0.5


@pytest.fixture
def refused_port() -> int:
    """A port nothing listens on (bound once to pick it, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener completes the TCP handshake (the kernel's backlog) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


def url(port: int, database: str = "test") -> str:
    return f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/{database}"


def worker_database() -> str:
    return DATABASE_URL.rsplit("/", 1)[1]


@pytest.mark.parametrize(("database_url", "where"), [
    ("postgresql://u:pw@db.example:6543/app", "PostgreSQL db.example:6543/app (user u)"),
    ("postgresql://u@db.example/app", "PostgreSQL db.example:5432/app (user u)"),
    ("postgresql+psycopg://u:p%40ss@h1:5432,h2/app", "PostgreSQL h1:5432,h2:5432/app (user u)"),
    ("postgresql://u@[::1]/app", "PostgreSQL [::1]:5432/app (user u)"),
    ("postgresql://u@[::1]:7/app", "PostgreSQL [::1]:7/app (user u)"),
    ("postgresql:///app?host=/run/postgresql", "PostgreSQL /run/postgresql/app"),
    ("postgresql:///app", "PostgreSQL localhost:5432/app"),
    (None, "SQLite state database"),
])
def test_location_names_host_port_database_user(database_url: str | None, where: str) -> None:
    assert describe_database_error(OSError(111, "Connection refused"), database_url) == \
        f"{where}: Connection refused"
    assert database_location(database_url) == where


async def test_refused_psycopg_and_sqlalchemy(refused_port: int) -> None:
    with pytest.raises(psycopg.OperationalError) as raw:
        await psycopg.AsyncConnection.connect(url(refused_port))
    line = describe_database_error(raw.value, url(refused_port))
    assert line == f"PostgreSQL 127.0.0.1:{refused_port}/test (user postgres): Connection refused"
    engine = create_async_engine(url(refused_port).replace("postgresql:", "postgresql+psycopg:"))
    try:
        with pytest.raises(SQLAlchemyOperationalError) as wrapped:
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
    assert describe_database_error(wrapped.value, url(refused_port)) == line


async def test_server_reason_and_no_password() -> None:
    """The real server refuses a database that does not exist; the password is in the URL only."""
    missing = DATABASE_URL.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@")
    missing = missing.rsplit("/", 1)[0] + f"/no_such_db_{PASSWORD}"
    with pytest.raises(psycopg.OperationalError) as raw:
        await psycopg.AsyncConnection.connect(missing)
    line = describe_database_error(raw.value, missing)
    assert "\n" not in line and PASSWORD not in line
    assert line.endswith('database "no_such_db_***" does not exist'), line
    assert "5432/no_such_db_***" in line


async def test_silent_server_times_out(silent_port: int) -> None:
    with pytest.raises(TimeoutError) as timed_out:
        await asyncio.wait_for(psycopg.AsyncConnection.connect(url(silent_port)), 0.5)
    line = describe_database_error(timed_out.value, url(silent_port), waited=0.5)
    assert line == (f"PostgreSQL 127.0.0.1:{silent_port}/test (user postgres): no answer within 0.5 s "
                    "(the server or the network does not respond)")
    # psycopg's own connect_timeout says the same.
    with pytest.raises(psycopg.OperationalError) as own:
        await psycopg.AsyncConnection.connect(url(silent_port), connect_timeout=1)
    assert "no answer" in describe_database_error(own.value, url(silent_port))


def test_every_attempt_of_a_multi_host_failure_in_one_line() -> None:
    text = ("connection failed: Multiple connection attempts failed. All failures were:\n"
            "- host: 'localhost', port: '1', hostaddr: '::1': connection failed: connection to server at "
            "\"::1\", port 1 failed: Connection refused\n\tIs the server running on that host and accepting "
            "TCP/IP connections?\n"
            "- host: 'localhost', port: '1', hostaddr: '127.0.0.1': connection failed: connection to server "
            "at \"127.0.0.1\", port 1 failed: Connection refused\n\tIs the server running on that host and "
            "accepting TCP/IP connections?")
    line = describe_database_error(psycopg.OperationalError(text), "postgresql://u:pw@localhost:1/db")
    assert line == "PostgreSQL localhost:1/db (user u): Connection refused"


def test_status_query_timeout_counts_from_the_start() -> None:
    assert query_timeout(now=100.5, started=100.0) == pytest.approx(ANSWER_WITHIN - 0.5)
    assert query_timeout(now=110.0, started=100.0) == MIN_QUERY_TIMEOUT


def run_status(tmp_path: Path, database_url: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {"PATH": "/usr/bin:/bin", "ENV_FILE": "/dev/null", "BOT_TOKEN": TOKEN, "LOCK_BACKEND": "postgres",
           "DATABASE_URL": database_url, "LOCK_DIR": str(tmp_path / "lock"), "STATE_DIR": str(tmp_path / "s")}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "status"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30)
    return done, time.monotonic() - started


def run_status_in_process(tmp_path: Path, database_url: str) -> subprocess.CompletedProcess[str]:
    """:func:`run_status`'s command in-process (tests/conftest.py): for what it says, not how fast."""
    env = {"PATH": "/usr/bin:/bin", "ENV_FILE": "/dev/null", "BOT_TOKEN": TOKEN, "LOCK_BACKEND": "postgres",
           "DATABASE_URL": database_url, "LOCK_DIR": str(tmp_path / "lock"), "STATE_DIR": str(tmp_path / "s")}
    return run_main_in_process("status", env=env, cwd=tmp_path)


def status_load() -> LoadAllowance:
    """The load allowance for ``main.py status``: Python's start and what the command imports."""
    return LoadAllowance("utils.ops.bootstrap", "utils.ops.status", idle=IDLE_START_COST)


def assert_one_line_exit_4(done: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert done.returncode == 4, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("solobot status: cannot tell who is active: PostgreSQL 127.0.0.1:")
    for text in expected:
        assert text in lines[0]
    assert PASSWORD not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.xdist_group("timing")
def test_status_with_refused_database(tmp_path: Path, refused_port: int) -> None:
    with status_load() as load:
        done, elapsed = run_status(tmp_path, url(refused_port))
    bound = STATUS_ANSWER_BOUND + load.surplus
    assert_one_line_exit_4(done, f":{refused_port}/test (user postgres): Connection refused")
    assert elapsed < bound, f"{elapsed:.2f} s, bound {bound:.2f} s"


@pytest.mark.xdist_group("timing")
def test_status_with_silent_database(tmp_path: Path, silent_port: int) -> None:
    with status_load() as load:
        done, elapsed = run_status(tmp_path, url(silent_port))
    bound = STATUS_ANSWER_BOUND + load.surplus
    assert_one_line_exit_4(done, f":{silent_port}/test (user postgres): no answer within")
    assert elapsed < bound, f"{elapsed:.2f} s, bound {bound:.2f} s"


def test_status_with_missing_database(tmp_path: Path) -> None:
    missing = DATABASE_URL.rsplit("/", 1)[0] + "/no_such_database"
    done = run_status_in_process(tmp_path, missing.replace("postgresql://postgres@", f"postgresql://postgres:{PASSWORD}@"))
    assert_one_line_exit_4(done, 'database "no_such_database" does not exist')


def test_status_no_holder_is_3(tmp_path: Path) -> None:
    done = run_status_in_process(tmp_path, DATABASE_URL)
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.strip() == "no active holder (backend postgres)"


def test_the_target_carries_its_location_and_redactor_parsed_once() -> None:
    """The store's error lines use the target's location (parsed with the URL, once) and mask
    its password, in the URL form and bare."""
    target = DatabaseTarget.parse(f"postgresql://solobot:{PASSWORD}@db.example:6432/app", Path("/nonexistent"))
    assert target.location == "PostgreSQL db.example:6432/app (user solobot)"
    store_line = describe_database_error(OSError(111, f"refused for {PASSWORD}"), location=target.location,
                                         redactor=target.redactor)
    assert store_line == "PostgreSQL db.example:6432/app (user solobot): refused for ***"
    assert DatabaseTarget.parse(None, Path("/nonexistent")).location == "SQLite state database"
