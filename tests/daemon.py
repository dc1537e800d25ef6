"""The whole daemon in the test's event loop: :class:`InProcessDaemon`, as uvicorn's tests run its ``Server``.

Where a test does not need a real signal, kill -9, SIGSTOP, a second process or a container, it
starts the daemon here instead of ``python main.py`` (:class:`tests.conftest.BotProcess`): the same
:class:`utils.ops.server.Server` that main.py runs, against the fake Bot API, with a real health
port, in milliseconds instead of seconds of aiogram imports per process.

Usage (pytest-asyncio's auto mode: a test is ``async def``)::

    from tests.daemon import StartDaemon, in_process, wait_for  # noqa: F401 - in_process: the fixture

    async def test_ping(fake: FakeBotAPI, in_process: StartDaemon) -> None:  # noqa: F811 - the fixture
        bot = await in_process("a", POLLING_TIMEOUT="5")   # started; env as spawn's, plus overrides
        await bot.wait_mode("active")
        msg = fake.send_user_message(BOT_ID, "/ping")
        await wait_for(lambda: fake.replies_to(msg), message="the reply")
        assert (await bot.health())["mode"] == "active"
        assert await bot.stop() == 0                       # SIGTERM's path: drain, release, exit 0
        assert "solobot started" in bot.log()

:func:`in_process` takes the ``fake`` and ``shared_dirs`` fixtures of tests/conftest.py (two
daemons of one test share the lock and state directories, as two ``spawn`` processes do) and stops
whatever is still running at the end of the test. (With ``pytest_plugins = ["tests.daemon"]`` in
tests/conftest.py the fixture needs no import, and the ``noqa`` marks go.) Without the fixture:
``daemon_env(...)``, then ``await InProcessDaemon(name, env).start()``, and ``await daemon.stop()``.

The API follows ``BotProcess`` where it can, but asynchronous: the daemon runs on this very loop,
so a blocking call (``urllib``, ``time.sleep``, ``testbed.waiting.wait_until``) would stall it.
Wait with :func:`wait_for` (plain or async predicates). The fake Bot API runs in its own thread,
so its controls (``fake.send_user_message``...) are fine to call.

Two daemons at once (an active and its standby): ``await in_process("b", own_bot_module=True)``
runs the second on a private copy of the bot module, since aiogram attaches the module's global
``router`` to one dispatcher at a time. Both run in this one process: no fencing by SIGKILL here
(the file backend would signal its own pid), which is a BotProcess test's business.

Differences from a process: :meth:`InProcessDaemon.stop` is the SIGTERM path (a stop request),
not a signal (:meth:`InProcessDaemon.signal` takes SIGTERM/SIGINT the same way), and no signal
handler is installed (``main.py`` does that when run as a program);
:meth:`InProcessDaemon.log` holds the records of the ``solobot`` loggers made by this daemon's
tasks (a context variable tells two daemons of one test apart), masked and formatted as main.py
formats its text lines; aiogram's and other libraries' records are not in it.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib.util
import inspect
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar, overload

import aiohttp
import pytest

from testbed.fake_bot_api import UNLIMITED_SENDS_ENV, FakeBotAPI
from testbed.waiting import free_port
from tests.conftest import ADMIN_ID, START_WAIT, TOKEN
from utils.base.redact import Redactor
from utils.config import Settings
from utils.ops.bot_module import BotModule, bot_module_from
from utils.ops.daemon_config import DaemonConfig
from utils.ops.daemon_settings import load_daemon_settings
from utils.ops.logging_setup import TEXT_FORMAT, SecretMaskingFilter
from utils.ops.server import Server

T = TypeVar("T")

#: The loggers whose records a daemon's log holds.
CAPTURED_LOGGER = "solobot"
#: A /health or other GET gives up after this (a daemon that does not answer counts as "no answer").
HTTP_TIMEOUT = 2.0
#: How long :meth:`InProcessDaemon.stop` waits for the exit (a drain is bounded by SHUTDOWN_TIMEOUT).
STOP_WAIT = 20.0
#: The reason a test's stop request gives (what SIGTERM would log as "received SIGTERM").
TEST_STOP_REASON = "stop requested by the test (SIGTERM's path)"

#: Which in-process daemon the running code belongs to (set in each daemon's task context).
_CURRENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("solobot_test_daemon", default=None)


@overload
async def wait_for(predicate: Callable[[], Awaitable[T | None]], timeout: float = ..., message: str = ...,
                   interval: float = ...) -> T: ...


@overload
async def wait_for(predicate: Callable[[], T | None], timeout: float = ..., message: str = ...,
                   interval: float = ...) -> T: ...


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0,
                   message: str = "condition", interval: float = 0.02) -> Any:
    """``testbed.waiting.wait_until`` for a test whose daemon runs on its own loop: poll *predicate*
    (plain or async) without blocking the loop; return its first truthy value, or fail (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")
        await asyncio.sleep(interval)


def daemon_env(fake: FakeBotAPI, lock_dir: Path, state_dir: Path, name: str, **overrides: str) -> dict[str, str]:
    """The settings a daemon named *name* gets: those ``spawn`` gives a process (tests/conftest.py),
    from nothing else (not this process's environment), with *overrides* on top."""
    env = {
        "BOT_TOKEN": TOKEN,
        "TELEGRAM_API_URL": fake.url(name),
        "LOCK_DIR": str(lock_dir),
        "STATE_DIR": str(state_dir),
        "HEALTH_PORT": str(free_port()),
        "ADMIN_IDS": str(ADMIN_ID),
        "POLLING_TIMEOUT": "10",
        "LOG_LEVEL": "INFO",
        **UNLIMITED_SENDS_ENV,
    }
    env.update(overrides)
    return env


class _DaemonLog(logging.Handler):
    """The text lines of one daemon's records: only those made in its context, masked as main.py's."""

    def __init__(self, name: str, settings: Settings) -> None:
        super().__init__(logging.getLevelName(settings.log_level))
        self.daemon = name
        self.lines: list[str] = []
        self.addFilter(lambda record: _CURRENT.get() == self.daemon)
        self.addFilter(SecretMaskingFilter(Redactor(token=settings.bot_token, database_url=settings.database)))
        self.setFormatter(logging.Formatter(TEXT_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class _LoggerLevel:
    """The ``solobot`` logger's level while daemons run: the lowest they ask for, restored after the last."""

    def __init__(self) -> None:
        self.saved: int | None = None
        self.levels: list[int] = []

    def push(self, level: int) -> None:
        logger = logging.getLogger(CAPTURED_LOGGER)
        if self.saved is None:
            self.saved = logger.level
        self.levels.append(level)
        logger.setLevel(min(self.levels))

    def pop(self, level: int) -> None:
        logger = logging.getLogger(CAPTURED_LOGGER)
        self.levels.remove(level)
        if self.levels:
            logger.setLevel(min(self.levels))
        elif self.saved is not None:
            logger.setLevel(self.saved)
            self.saved = None


_LEVELS = _LoggerLevel()


def fresh_bot_module(name: str) -> BotModule:
    """A private copy of the bot module *name* (executed anew, not put in ``sys.modules``): its own
    ``router``, so two daemons of one process can run at the same time (aiogram attaches a router to
    one dispatcher at a time). One daemon at a time can use the module itself."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.loader is not None, f"no module {name}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return bot_module_from(name, module)


class InProcessDaemon:
    """One :class:`~utils.ops.server.Server` running in a task of the current loop.

    *own_bot_module*: run on a private copy of ``BOT_MODULE`` (:func:`fresh_bot_module`), for a
    daemon that runs beside another one (an active and its standby).
    """

    def __init__(self, name: str, env: dict[str, str], *, own_bot_module: bool = False) -> None:
        self.name = name
        self.env = env
        self.own_bot_module = own_bot_module
        self.settings = load_daemon_settings(env)
        self.port = self.settings.health_port
        self.server: Server | None = None
        self.task: asyncio.Task[int] | None = None
        self._log = _DaemonLog(name, self.settings)
        self._level = logging.getLevelName(self.settings.log_level)
        #: Where this daemon's code runs: its task, and the stop requests made for it.
        self._context = contextvars.copy_context()

    async def start(self) -> InProcessDaemon:
        """Load the configuration (the bot module) and start serving; returns at once (the daemon
        starts in its task: :meth:`wait_mode` for a mode)."""
        logging.getLogger(CAPTURED_LOGGER).addHandler(self._log)
        _LEVELS.push(self._level)
        context = self._context
        context.run(_CURRENT.set, self.name)
        try:
            module = fresh_bot_module(self.settings.bot_module) if self.own_bot_module else None
            config = context.run(lambda: DaemonConfig.load(self.settings, bot_module=module))
        except BaseException:
            self._detach_log()
            raise
        self.server = Server(config)
        self.task = asyncio.create_task(self.server.serve(), name=f"daemon-{self.name}", context=context)
        self.task.add_done_callback(lambda _task: self._detach_log())
        return self

    def _detach_log(self) -> None:
        if self._log in logging.getLogger(CAPTURED_LOGGER).handlers:
            logging.getLogger(CAPTURED_LOGGER).removeHandler(self._log)
            _LEVELS.pop(self._level)

    # -- what BotProcess offers ------------------------------------------------------------------

    @property
    def instance_id(self) -> str:
        assert self.server is not None
        return self.server.config.instance_id

    async def get(self, path: str) -> tuple[int, bytes]:
        """GET *path* on the health port: (status, body); (0, b"") if nothing answers."""
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as session, \
                    session.get(f"http://127.0.0.1:{self.port}{path}") as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError):
            return 0, b""

    async def health(self) -> dict[str, Any] | None:
        """/health as a dict, or None if it does not answer (yet)."""
        status, body = await self.get("/health")
        if status != 200:
            return None
        try:
            return dict(json.loads(body))
        except ValueError:
            return None

    async def mode(self) -> str | None:
        health = await self.health()
        return None if health is None else str(health["mode"])

    async def wait_mode(self, mode: str, timeout: float = START_WAIT) -> None:
        async def reached() -> bool:
            if self.task is not None and self.task.done():
                raise AssertionError(f"{self.name} exited ({self._outcome()}) before being {mode}\n{self.log()}")
            return await self.mode() == mode

        await wait_for(reached, timeout, f"{self.name} to be {mode}\n{self.log()}")

    def log(self) -> str:
        """This daemon's log lines so far (newline-terminated, as a process's log file)."""
        return "".join(line + "\n" for line in self._log.lines)

    def request_stop(self, reason: str = TEST_STOP_REASON) -> None:
        """What SIGTERM does: ask for the orderly stop (it runs in the daemon's task)."""
        assert self.server is not None
        # In the daemon's context, so its log line ("shutdown requested: ...") is in this daemon's log.
        self._context.run(self.server.request_stop, reason)

    def signal(self, sig: int) -> None:
        """SIGTERM or SIGINT as the program's handler takes them: a stop request naming the signal.
        (Others, and a repeated SIGINT's forced exit, need a real process: BotProcess.)"""
        if sig not in (signal.SIGTERM, signal.SIGINT):
            raise ValueError(f"an in-process daemon takes SIGTERM or SIGINT, not {signal.Signals(sig).name}")
        self.request_stop(f"received {signal.Signals(sig).name}")

    async def wait_exit(self, timeout: float = STOP_WAIT) -> int:
        """The exit code, once the daemon has stopped (on its own or asked)."""
        assert self.task is not None
        done, _ = await asyncio.wait({self.task}, timeout=timeout)
        if not done:
            raise AssertionError(f"{self.name} did not exit within {timeout:g} s\n{self.log()}")
        return self.task.result()

    async def stop(self, timeout: float = STOP_WAIT) -> int:
        """Request the stop (SIGTERM's path) and wait for it: the exit code."""
        if self.task is not None and not self.task.done():
            self.request_stop()
        return await self.wait_exit(timeout)

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    def _outcome(self) -> str:
        if self.task is None or not self.task.done():
            return "running"
        if self.task.cancelled():
            return "cancelled"
        exc = self.task.exception()
        return f"exit {self.task.result()}" if exc is None else f"raised {exc!r}"

    async def kill(self) -> None:
        """Cancel the daemon's task (no orderly stop: its shutdown stages still run, bounded)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


class StartDaemon(Protocol):
    """What the :func:`in_process` fixture gives a test. *own_bot_module* is typed ``Any`` here so
    that a test may pass its settings as ``**env`` (a ``dict[str, str]``: mypy matches its values
    against every keyword, the flag included); it is a bool."""

    async def __call__(self, name: str, *, own_bot_module: Any = False, **overrides: str) -> InProcessDaemon: ...


@pytest.fixture
async def in_process(fake: FakeBotAPI, shared_dirs: dict[str, Path]) -> AsyncIterator[StartDaemon]:
    """Start in-process daemons against the fake (``await in_process("a", **env)``); all stopped
    at the end of the test (asked first; cancelled if one does not stop in time)."""
    started: list[InProcessDaemon] = []

    async def start(name: str, *, own_bot_module: bool = False, **overrides: str) -> InProcessDaemon:
        env = daemon_env(fake, shared_dirs["lock"], shared_dirs["state"], name, **overrides)
        daemon = InProcessDaemon(name, env, own_bot_module=own_bot_module)
        started.append(daemon)
        return await daemon.start()

    yield start
    for daemon in started:
        if daemon.running:
            daemon.request_stop("the test ended")
    for daemon in started:
        try:
            await daemon.wait_exit()
        except AssertionError:
            await daemon.kill()


__all__ = ["InProcessDaemon", "StartDaemon", "daemon_env", "fresh_bot_module", "in_process", "wait_for"]
