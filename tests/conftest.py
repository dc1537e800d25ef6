"""Shared test harness: the fake Bot API, real ``python main.py`` processes, and waiting helpers.

Two promises the harness keeps for every test:

* **No process outlives the suite.** Every bot starts in its own session (so its own process
  group) and is stopped by killing the whole group: a wrapper such as ``unshare -pf`` dies with
  the bot inside it, not instead of it. Every process the tests start inherits
  :data:`OWNER_VARIABLE` (this pytest process's pid), and at the end of the session
  :func:`no_process_left_behind` fails the run if one is still alive (and kills it).
* **Parallel runs (pytest-xdist) do not share a database.** Each worker uses its own database,
  ``test_<worker id>`` (``test_gw0``, ...), created on first use from a connection to the
  configured one; advisory locks and tables are per database, so the workers never meet.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from testbed.fake_bot_api import UNLIMITED_SENDS_ENV, FakeBotAPI
from testbed.waiting import free_port, get_health, wait_until

__all__ = ["free_port", "get_health", "wait_until"]  # the tests import them from here

ROOT = Path(__file__).resolve().parent.parent
BOT_ID = 123456
TOKEN = f"{BOT_ID}:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0"
ADMIN_ID = 777
#: The PostgreSQL the tests use (trust auth); under xdist each worker gets its own database in it.
BASE_DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
#: ``gw0``, ``gw1``, ... in an xdist worker; unset in a plain run.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
#: Marks every process the tests start (inherited through the environment).
OWNER_VARIABLE = "SOLOBOT_TEST_OWNER"
os.environ[OWNER_VARIABLE] = str(os.getpid())
#: Not passed on to the bots the tests start: the harness's DATABASE_URL is where the worker
#: databases are made, not the bots' state (a test that wants PostgreSQL passes its worker's URL;
#: inherited, every worker's bots would share one database and meet in its inbox and epochs).
NOT_INHERITED = frozenset({"DATABASE_URL", "LOCK_BACKEND"})
#: How long a killed process group may take to disappear.
KILL_WAIT = 10.0
#: How long a test waits for a bot to reach a mode. Not a claim about solobot: importing aiogram
#: alone costs about 5 s of CPU, so with both cores busy (pytest-xdist, several bots starting) a
#: start can take 20 s. The wait ends as soon as the mode is reached.
START_WAIT = 60.0
#: A standby's first getUpdates after the leader's SIGTERM or kill -9, at most, in a test. Not the
#: speed (bench/handover.py measures that: tens of ms quiet, ~0.2 s p50 on SIGTERM); a bound that a
#: loaded 2-core machine keeps (0.54 s was seen with the container preparation beside pytest) and a
#: standby that waited for a lease to run out (5 s and more) does not.
HANDOVER_BOUND = 1.5


def worker_database_url(base_url: str, worker: str) -> str:
    """*base_url* with the database ``<base name>_<worker>`` (unchanged outside xdist)."""
    if not worker:
        return base_url
    head, _, tail = base_url.rpartition("/")
    name, question, query = tail.partition("?")
    return f"{head}/{name}_{worker}{question}{query}"


DATABASE_URL = worker_database_url(BASE_DATABASE_URL, XDIST_WORKER)


def ensure_database(base_url: str, url: str) -> None:
    """Create *url*'s database through a connection to *base_url*'s, unless it exists.

    ``TEMPLATE template0``: copying the default template1 fails while anyone is connected to it.
    """
    if url == base_url:
        return
    import psycopg
    from psycopg import sql

    name = url.rpartition("/")[2].partition("?")[0]
    with psycopg.connect(base_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return
        try:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
        except psycopg.errors.DuplicateDatabase:
            pass  # another run created it at the same moment


@pytest.fixture(scope="session", autouse=True)
def worker_database() -> str:
    """This worker's database exists before any test uses :data:`DATABASE_URL`."""
    import psycopg

    try:
        ensure_database(BASE_DATABASE_URL, DATABASE_URL)
    except psycopg.OperationalError as exc:  # no PostgreSQL: only the tests that need it fail
        warnings.warn(f"cannot create the worker database: {exc}", stacklevel=1)
    return DATABASE_URL


#: The xdist group whose tests run one after another on one worker (their bounds are about time).
TIMING_GROUP = "timing"
#: The longest tests of all (a minute or more on a loaded machine): each starts six or more real
#: bot processes (poison restarts, SIGSTOP rounds, handover rounds) or waits out a slow handler.
LONGEST = ("test_poison_processes.py::", "::test_sigstop_holder_is_fenced", "test_slow_suspect.py::",
           "::test_conversations_survive_", "::test_status_command_ready_and_metrics")
#: The tests without ``spawn`` that still take 5-10 s (each waits out a timeout it is about; one
#: runs its own process): ranked with the process tests, so that none of them starts last and runs
#: on alone.
LONG_WITHOUT_SPAWN = ("::test_ready_follows_telegram_reachability", "::test_stuck_chat_blocks_nobody_else",
                      "::test_health_answers_quickly_while_the_database_is_silent",
                      "::test_one_stray_409_costs_nothing", "::test_queue_survives_restart_and_pause_persists",
                      "::test_one_chat_429_pauses_it_while_the_others_flow_at_the_overall_limit",
                      "::test_real_process_never_prints_the_password")


def expected_length(item: pytest.Item) -> int:
    """A rank for how long *item* takes: 0 for the timing group (its tests run one after another on
    one worker, so together they are the longest unit), 1 for :data:`LONGEST`, 2 for the other tests
    that start real bot processes (seconds of CPU per start) and for :data:`LONG_WITHOUT_SPAWN`,
    3 for the rest (in-process: well under a second, mostly)."""
    group = item.get_closest_marker("xdist_group")
    if group is not None and group.args and group.args[0] == TIMING_GROUP:
        return 0
    if named_in(item, LONGEST):
        return 1
    if "spawn" in getattr(item, "fixturenames", ()) or named_in(item, LONG_WITHOUT_SPAWN):
        return 2
    return 3


def named_in(item: pytest.Item, parts: tuple[str, ...]) -> bool:
    """True if *item*'s node id contains one of *parts* (a file, a test name, or both)."""
    return any(part in item.nodeid for part in parts)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest first: pytest-xdist hands out work in collection order, and a long test handed
    out last would run alone at the end while the other workers idle (longest-first scheduling).
    A stable sort: within a rank, the files' own order."""
    items.sort(key=expected_length)


def group_members(pgid: int) -> list[psutil.Process]:
    """The live processes of process group *pgid*."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def started_by_us(proc: psutil.Process) -> bool:
    """True for a process that inherited this pytest process's mark (:data:`OWNER_VARIABLE`), or
    a bot process this process forked (:data:`FORKED`)."""
    if proc.pid in FORKED:
        return True
    try:
        return bool(proc.environ().get(OWNER_VARIABLE) == str(os.getpid()))
    except psutil.Error:
        return False


def kill_group(pgid: int) -> list[psutil.Process]:
    """SIGKILL process group *pgid* and wait for its members; return those still alive.

    Only a group that holds a process of ours: once its leader was reaped, its number could in
    principle belong to someone else's group.
    """
    members = group_members(pgid)
    if not any(started_by_us(p) for p in members):
        return []
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return []
    _, alive = psutil.wait_procs(members, timeout=KILL_WAIT)
    return list(alive)


def leftover_processes() -> list[psutil.Process]:
    """Processes started by this pytest process's tests that are still running: any process
    carrying our mark in its environment, and any ``main.py`` below us (started with an
    environment of its own)."""
    below = {p.pid for p in psutil.Process().children(recursive=True)}
    found: list[psutil.Process] = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            marked = started_by_us(proc)
            a_bot = proc.pid in below and any(arg.endswith("main.py") for arg in proc.cmdline())
        except psutil.Error:
            continue
        if marked or a_bot:
            found.append(proc)
    return found


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fails the run if a process started by a test is still alive when the session ends (and kills it)."""
    yield
    leftovers = leftover_processes()
    if not leftovers:
        return
    described = []
    for proc in leftovers:
        try:
            described.append(f"pid {proc.pid}: {' '.join(proc.cmdline())}")
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(leftovers, timeout=KILL_WAIT)
    pytest.fail("processes started by the tests outlived them:\n" + "\n".join(described), pytrace=False)


def first_poll_after(fake: FakeBotAPI, tag: str, t0: float) -> float | None:
    """When the server got *tag*'s first (non-failing) getUpdates at or after *t0*."""
    for poll in fake.snapshot_polls():
        if poll.tag == tag and poll.started >= t0 and poll.outcome in ("ok", "pending"):
            return poll.started
    return None


def sigkill_mid_handlers(fake: FakeBotAPI, victim: BotProcess, standby_tag: str,
                         pings: int = 8) -> tuple[float, list[int]]:
    """SIGKILL *victim* while 0.2 s handlers run; return (gap to the standby's first poll, ping ids)."""
    fake.send_delay = 0.2  # every handler's reply takes 0.2 s
    sent = [fake.send_user_message(BOT_ID, "/ping") for _ in range(pings)]
    wait_until(lambda: fake.sending_now > 0, message="handlers in flight")
    t_kill = time.time()
    victim.signal(signal.SIGKILL)
    first = wait_until(lambda: first_poll_after(fake, standby_tag, t_kill), 5, message="the standby polls")
    wait_until(lambda: all(fake.replies_to(m) for m in sent), 20, message="no /ping lost")
    return first - t_kill, sent


def start_pair(spawn: Callable[..., BotProcess], **env: str) -> tuple[BotProcess, BotProcess]:
    """Instance "a" active, then "b" waiting as its standby."""
    a = spawn("a", **env)
    a.wait_mode("active")
    b = spawn("b", **env)
    b.wait_mode("passive")
    wait_until(lambda: "standby: lock held by pid" in b.log(), message="b announces its standby")
    return a, b


#: Set to 1: every bot process is a fresh ``python main.py`` (exec), none forked (:class:`ForkedMain`).
FRESH_PYTHON_VARIABLE = "SOLOBOT_TEST_FRESH_PYTHON"
#: The crash bot's command line (tests/crash_bot.py); forked, the same handler is added in the child.
CRASH_BOT_PREFIX = [sys.executable, "-m", "tests.crash_bot"]
#: Modules of this checkout that hold a bot's routers (the user's bot modules): imported afresh in a
#: forked child, as a fresh Python would (an aiogram router is attached to one dispatcher at a time).
FRESH_IN_CHILD = ("bot", "examples", "tests.form_probe_bot", "tests.crash_bot", "tests.startup_failure_bot")
#: Pids of the bot processes forked by this process (for :func:`started_by_us`: a forked child's
#: /proc environment is its parent's at exec, without the owner mark).
FORKED: set[int] = set()


def fresh_python() -> bool:
    return os.environ.get(FRESH_PYTHON_VARIABLE, "") == "1"


class ForkedMain:
    """``python main.py`` forked from this process, whose Python has imported aiogram already: a
    real process (its own pid, session, signals, kill -9, SIGSTOP, locks, sockets) without the 3.5-5 s
    of CPU of a fresh Python's imports. The child runs main.py as ``__main__`` exactly as
    ``python main.py`` would from there on (configuration, logging, the server); the user's bot
    modules are imported afresh. What happens *before* the heavy imports (the first line, exit 78,
    systemd's first STATUS) is a fresh Python's business: those tests exec one (``fresh=True``, or
    their own subprocess). A :class:`subprocess.Popen`-like handle (pid, poll, wait, send_signal)."""

    def __init__(self, env: dict[str, str], log_fd: int, crash: bool) -> None:
        self.returncode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            self._run_main(env, log_fd, crash)
        FORKED.add(self.pid)

    @staticmethod
    def _run_main(env: dict[str, str], log_fd: int, crash: bool) -> None:
        code = 1
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            # Nothing of this process's open files goes on in the child, as nothing would through an
            # exec: a socket of the fake Bot API it held would keep a connection the fake closed
            # half-open, a lock file's descriptor would keep a flock the test released. Each is
            # replaced by /dev/null (the number stays taken: an object of the parent's that closes
            # its descriptor later closes /dev/null, never one the bot has opened since).
            for name in os.listdir("/proc/self/fd"):
                if int(name) not in (0, 1, 2, null):
                    with contextlib.suppress(OSError):
                        os.dup2(null, int(name))
            sys.stdin = open(0, closefd=False)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
                signal.signal(sig, signal.SIG_DFL if sig != signal.SIGPIPE else signal.SIG_IGN)
            os.chdir(ROOT)
            os.environ.clear()
            os.environ.update(env)
            for name in [m for m in sys.modules if m in FRESH_IN_CHILD or m.startswith(FRESH_IN_CHILD)]:
                del sys.modules[name]
            if crash:
                import tests.crash_bot

                tests.crash_bot.install()
            sys.argv = [str(ROOT / "main.py")]
            import runpy

            runpy.run_path(str(ROOT / "main.py"), run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # noqa: BLE001 - what a fresh Python would print, then exit 1
            import traceback

            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by psutil's wait in kill_group, after its SIGKILL
                self.returncode = -signal.SIGKILL
                FORKED.discard(self.pid)
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                FORKED.discard(self.pid)  # reaped: its number may be anyone's now
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(["main.py (forked)"], timeout or 0.0)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


class BotProcess:
    """A real ``python main.py`` with its own health port and log file.

    It runs in its own session, so its own process group: :meth:`stop` kills the group, which
    takes a wrapper (``unshare -pf``) and the bot inside it (PID 1 of its namespace) together.
    Forked from this process (:class:`ForkedMain`) unless *fresh*, a wrapper *prefix*, or
    ``SOLOBOT_TEST_FRESH_PYTHON=1`` asks for a fresh Python (exec).
    """

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, *,
                 prefix: list[str] | None = None, fresh: bool = False) -> None:
        self.name = name
        self.env = env
        self.port = int(env.get("HEALTH_PORT", "0"))
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        crash = prefix == CRASH_BOT_PREFIX
        self.proc: subprocess.Popen[bytes] | ForkedMain
        if not fresh and not fresh_python() and (prefix is None or crash):
            self.proc = ForkedMain(env, self._log.fileno(), crash)
        else:
            self.proc = subprocess.Popen(
                [*(prefix or []), sys.executable, str(ROOT / "main.py")],
                cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def health(self) -> dict[str, Any] | None:
        return get_health(self.port)

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def mode(self) -> str | None:
        h = self.health()
        return None if h is None else str(h["mode"])

    def wait_mode(self, mode: str, timeout: float = START_WAIT) -> None:
        wait_until(lambda: self.mode() == mode, timeout, f"{self.name} to be {mode}\n{self.log()}", 0.02)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Kill the whole process group (even when the process itself has exited) and reap it."""
        alive = kill_group(self.proc.pid)
        self.proc.wait(KILL_WAIT)
        self._log.close()
        assert not alive, f"{self.name}: still alive after SIGKILL to its group: {alive}"


@pytest.fixture
def fake() -> Iterator[FakeBotAPI]:
    server = FakeBotAPI().start_in_thread()
    yield server
    server.stop_thread()


@pytest.fixture
def shared_dirs(tmp_path: Path) -> dict[str, Path]:
    lock_dir = tmp_path / "lock"
    state_dir = tmp_path / "state"
    return {"lock": lock_dir, "state": state_dir, "logs": tmp_path}


@pytest.fixture
def spawn(fake: FakeBotAPI, shared_dirs: dict[str, Path]) -> Iterator[Callable[..., BotProcess]]:
    """Start ``python main.py`` instances against the fake; all killed at the end of the test."""
    procs: list[BotProcess] = []

    def start(name: str, *, prefix: list[str] | None = None, fresh: bool = False, **overrides: str) -> BotProcess:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("NOTIFY_", "WATCHDOG_")) and k not in NOT_INHERITED}
        env.update({
            "ENV_FILE": os.devnull,  # a developer's ./.env must not change what a test runs
            "BOT_TOKEN": TOKEN,
            "TELEGRAM_API_URL": fake.url(name),
            "LOCK_DIR": str(shared_dirs["lock"]),
            "STATE_DIR": str(shared_dirs["state"]),
            "HEALTH_PORT": str(free_port()),
            "ADMIN_IDS": str(ADMIN_ID),
            "POLLING_TIMEOUT": "10",
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            **UNLIMITED_SENDS_ENV,  # a test about send limits sets its own
        })
        env.update(overrides)
        proc = BotProcess(name, env, shared_dirs["logs"], prefix=prefix, fresh=fresh)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


class _LoggingState:
    """The process-wide logging state ``configure_logging`` changes, to put back afterwards."""

    def __init__(self) -> None:
        root = logging.getLogger()
        self.root = (root.handlers[:], root.level)
        self.hooks = (sys.excepthook, threading.excepthook)
        self.loggers = {name: (logger.level, logger.filters[:])
                        for name, logger in logging.root.manager.loggerDict.items()
                        if isinstance(logger, logging.Logger)}

    def restore(self) -> None:
        root = logging.getLogger()
        root.handlers[:], level = self.root
        root.setLevel(level)
        sys.excepthook, threading.excepthook = self.hooks
        logging.captureWarnings(False)
        for name, logger in logging.root.manager.loggerDict.items():
            if not isinstance(logger, logging.Logger):
                continue
            level, filters = self.loggers.get(name, (logging.NOTSET, []))
            logger.setLevel(level)
            logger.filters[:] = filters


def run_main_in_process(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``python main.py ARGS`` up to the point where the bot itself would start, in this process:
    the command line, the configuration (from exactly *env* and *cwd*'s ``.env``), the logging set-up
    and the light commands (``status``, ``inbox``), which is all main.py does before its heavy
    imports. Returns what :func:`subprocess.run` would (exit code, stdout, stderr).

    For the tests of what those steps say and which code they exit with (exit 78 with one line per
    problem, no secret, ``status``'s answer): the same functions main.py calls, without paying for a
    Python start per case. That main.py exits 78 *before* the heavy imports is a property of the
    process, kept by the process tests (tests/README.md). A valid configuration that would start
    the bot is refused here (the daemon in-process is tests/daemon.py).
    """
    import main
    from utils.ops.bootstrap import prepare

    saved_env, saved_cwd, logging_state = dict(os.environ), os.getcwd(), _LoggingState()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(env)
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            outcome = prepare(["main.py", *args], main.__doc__ or "")
    finally:
        logging_state.restore()
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    assert isinstance(outcome, int), f"main.py {' '.join(args)} would start the bot: {outcome!r}"
    return subprocess.CompletedProcess(["main.py", *args], outcome, out.getvalue(), err.getvalue())


def import_cost(*modules: str) -> float:
    """Seconds a fresh Python takes right now to start and import *modules* from this checkout: the
    timing tests' measure of how busy the machine is (their bounds grow by the surplus over idle)."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", f"import {', '.join(modules)}"], cwd=ROOT, check=True, timeout=30)
    return time.monotonic() - started


class LoadAllowance:
    """What a timing test adds to its bound for the machine's load: how much longer than on an idle
    machine a fresh Python takes to start and import *modules*, measured just before and just after
    the timed step (a ``with`` block), the larger of the two kept. Measured only before, a load that
    rose during the step went unseen (a status command took 3.56 s against a bound of 3.53 s with
    the whole suite starting around it)."""

    def __init__(self, *modules: str, idle: float) -> None:
        self.modules = modules
        self.idle = idle
        self.costs: list[float] = []

    def __enter__(self) -> LoadAllowance:
        self.costs.append(import_cost(*self.modules))
        return self

    def __exit__(self, *exc: object) -> None:
        self.costs.append(import_cost(*self.modules))

    @property
    def surplus(self) -> float:
        return max(0.0, max(self.costs) - self.idle)


def have_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-pf", "--mount-proc", "true"], capture_output=True).returncode == 0
