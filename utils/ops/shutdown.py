"""``ShutdownManager``: SIGTERM/SIGINT to an orderly, bounded stop in named stages.

Signals, modelled on uvicorn's server: the handler only records the request and wakes the main
task; the stop itself runs in ordinary code. While stopping, a repeated SIGTERM is logged once and
ignored: an orchestrator that sends SIGTERM twice (some do, on a retry) must not cut the drain
short; it has SIGKILL for that. Only a repeated SIGINT (a human pressing Ctrl-C again) forces an
immediate exit with :data:`EXIT_FORCED`. When the stop is over the previous handlers are restored.

Stages, modelled on aiohttp's runner cleanup: each ``register(name, callback)`` adds a named stage;
they run once, last registered first (resources are torn down in the reverse order of their
creation), each under its own timeout, all under one overall deadline. ``await enter(name, open,
close)`` opens a resource and registers its teardown in the same place, as
``contextlib.AsyncExitStack.enter_async_context`` does: a start-up that fails at any step unwinds
exactly what was made before it, in reverse, with the same deadlines and the errors collected. A stage that fails, times
out or raises ``CancelledError`` is logged and collected, and the remaining stages still run; only
``KeyboardInterrupt`` and ``SystemExit`` pass through.

Timeouts (defaults): DRAIN_TIMEOUT 5 s for in-flight handlers inside the polling stop,
SHUTDOWN_TIMEOUT 8 s overall, below Docker's default 10 s grace period and below the
``TimeoutStopSec=20`` of the systemd units, so the platform never has to SIGKILL us.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from utils.base.exit_codes import EXIT_FORCED, STOP_SIGNALS

log = logging.getLogger("solobot.shutdown")

Callback = Callable[[], Awaitable[object] | object]
SignalHandler = Callable[[int, Any], Any] | int | None  # what signal.getsignal() returns

SIGINTS_TO_FORCE_EXIT = 2

DEFAULT_DEADLINE = 8.0  # overall, for all stages together
DEFAULT_STAGE_TIMEOUT = 5.0
#: A stage that timed out is cancelled and given this long to unwind before the next one starts.
CANCELLED_STAGE_GRACE = 0.5
#: After the stop, how long the process waits for threads that outlived it (all together).
LINGERING_THREADS_GRACE = 1.0


@dataclass(frozen=True)
class Stage:
    name: str
    callback: Callback
    timeout: float


class ShutdownManager:
    def __init__(
        self, *, deadline: float = DEFAULT_DEADLINE, callback_timeout: float = DEFAULT_STAGE_TIMEOUT
    ) -> None:
        self.deadline = deadline
        self.callback_timeout = callback_timeout
        self.reason: str | None = None
        self.errors: list[tuple[str, BaseException]] = []
        self._stages: list[Stage] = []
        self._requested: asyncio.Event | None = None
        self._finished: asyncio.Event | None = None
        self._started = False
        self._sigints = 0
        self._repeat_logged = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_handlers: dict[signal.Signals, SignalHandler] = {}

    # -- registration ------------------------------------------------------------------------

    def register(self, name: str, callback: Callback, *, timeout: float | None = None) -> None:
        """Add stage *name*: *callback* (sync or async) runs at shutdown; later ones run first."""
        self._stages.append(Stage(name, callback, timeout or self.callback_timeout))

    async def enter(self, name: str, open_: Callback, close: Callback, *, timeout: float | None = None) -> None:
        """Run *open_* (sync or async); once it succeeded, register *close* as stage *name*.

        A resource that *open_* could not make is not torn down (its opener cleans up after
        itself); everything entered before it is, by :meth:`run`.
        """
        result = open_()
        if inspect.isawaitable(result):
            await result
        self.register(name, close, timeout=timeout)

    @property
    def stages(self) -> list[str]:
        """The stage names in the order they will run."""
        return [stage.name for stage in reversed(self._stages)]

    # -- signals -----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Take SIGTERM/SIGINT over on the running loop; :meth:`run` gives them back at its end."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            self._previous_handlers.setdefault(sig, signal.getsignal(sig))
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._loop = loop

    def restore_signal_handlers(self) -> None:
        """Put back the handlers that were there before :meth:`install_signal_handlers`.

        The stop signals are blocked during the swap, so one arriving in between is delivered to
        the restored handler instead of finding the default action (which would kill us).
        """
        if self._loop is None:
            return
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for sig, previous in self._previous_handlers.items():
                self._loop.remove_signal_handler(sig)
                if previous is not None:
                    signal.signal(sig, previous)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self._loop = None
        self._previous_handlers.clear()

    def _on_signal(self, sig: signal.Signals) -> None:
        if sig is signal.SIGINT:
            self._sigints += 1
            if self._sigints >= SIGINTS_TO_FORCE_EXIT:
                log.warning("received SIGINT again while stopping; exiting now without finishing")
                logging.shutdown()
                os._exit(EXIT_FORCED)
        if self.reason is None:
            self.request(f"received {sig.name}")
        elif not self._repeat_logged:
            self._repeat_logged = True
            log.warning("received %s again while stopping; ignored, the graceful stop goes on "
                        "(a second SIGINT forces exit)", sig.name)
        else:
            log.debug("received %s again while stopping; ignored", sig.name)

    # -- requests ----------------------------------------------------------------------------

    def _requested_event(self) -> asyncio.Event:
        if self._requested is None:
            self._requested = asyncio.Event()
        return self._requested

    def request(self, reason: str) -> None:
        """Ask for shutdown (signals do this; so can code that must stop the process)."""
        if self.reason is None:
            self.reason = reason
            log.info("shutdown requested: %s", reason)
        self._requested_event().set()

    @property
    def requested(self) -> bool:
        return self.reason is not None

    async def wait(self) -> str:
        await self._requested_event().wait()
        return self.reason or "requested"

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> list[tuple[str, BaseException]]:
        """Run every stage once, LIFO, bounded; restore the signal handlers; return the errors.

        A second call (or a concurrent one) waits for the first and returns the same list.
        """
        if self._finished is None:
            self._finished = asyncio.Event()
        if self._started:
            await self._finished.wait()
            return self.errors
        self._started = True
        started = time.monotonic()
        interrupted = False
        try:
            for stage in reversed(self._stages):
                remaining = self.deadline - (time.monotonic() - started)
                if remaining <= 0:
                    self._skip(stage)
                    continue
                interrupted = await self._run_stage(stage, min(stage.timeout, remaining)) or interrupted
        finally:
            self.restore_signal_handlers()
            self._finished.set()
        log.info("shutdown complete in %.2f s (%d error(s))", time.monotonic() - started,
                 len(self.errors))
        if interrupted:
            raise asyncio.CancelledError  # run() itself was cancelled: say so, now that all ran
        return self.errors

    async def _run_stage(self, stage: Stage, timeout: float) -> bool:
        """Run one stage; collect whatever it raises. True if run() itself was cancelled meanwhile."""
        log.debug("shutdown stage: %s", stage.name)
        try:
            result = stage.callback()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - CancelledError too: collect, go on (aiohttp's runner)
            self._fail(stage, exc)
            return False
        if not inspect.isawaitable(result):
            log.debug("shutdown stage done: %s", stage.name)
            return False
        # Its own task, so a CancelledError the stage raises is told apart from one aimed at us.
        task = asyncio.ensure_future(result)
        interrupted = False
        try:
            await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError:
            interrupted = True
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=CANCELLED_STAGE_GRACE)
            error: BaseException = (
                asyncio.CancelledError("shutdown itself was cancelled") if interrupted
                else TimeoutError(f"timed out after {timeout:.1f} s")
            )
            self._fail(stage, error)
            if not task.done():
                task.add_done_callback(_retrieve_outcome)
            return interrupted
        outcome = _retrieve_outcome(task)
        if outcome is None:
            log.debug("shutdown stage done: %s", stage.name)
        else:
            self._fail(stage, outcome)
        return interrupted

    def _fail(self, stage: Stage, exc: BaseException) -> None:
        self.errors.append((stage.name, exc))
        if isinstance(exc, TimeoutError | asyncio.CancelledError):
            log.error("shutdown stage %s: %s", stage.name, str(exc) or type(exc).__name__)
        else:
            log.error("shutdown stage %s failed: %s", stage.name, exc, exc_info=exc)

    def _skip(self, stage: Stage) -> None:
        self.errors.append((stage.name, TimeoutError("overall shutdown deadline passed before it ran")))
        log.error("shutdown stage %s skipped: the deadline of %.1f s passed", stage.name, self.deadline)


def _retrieve_outcome(task: asyncio.Future[Any]) -> BaseException | None:
    """What a finished stage raised (``CancelledError`` included), or None; marks it retrieved."""
    if task.cancelled():
        try:
            task.result()
        except asyncio.CancelledError as exc:
            return exc
    return task.exception()


def exit_after_stop(code: int) -> NoReturn:
    """End the process with *code* once the stop is over, without waiting on a stuck thread.

    The interpreter's exit joins every non-daemon thread, and a library's worker thread can be
    stuck (aiosqlite's, in a SQLite call waiting out its 30 s busy timeout on another process's
    lock, or never told to stop because the stage that closes its connection was skipped at the
    deadline): the process would outlive its stop deadline, and the platform's grace (Docker's
    10 s, systemd's ``TimeoutStopSec``) ends in SIGKILL. Such threads get
    :data:`LINGERING_THREADS_GRACE`; one still running is named in a WARNING, and the process
    ends with ``os._exit`` after the logs are flushed: everything durable was done or given up by
    the stop, and the kernel releases what the threads hold.
    """
    deadline = time.monotonic() + LINGERING_THREADS_GRACE
    for thread in _lingering_threads():
        thread.join(max(0.0, deadline - time.monotonic()))
    lingering = _lingering_threads()
    if not lingering:
        sys.exit(code)
    log.warning("exiting without waiting for %d thread(s) still running after the stop: %s",
                len(lingering), ", ".join(thread.name for thread in lingering))
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _lingering_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate()
            if thread is not threading.main_thread() and not thread.daemon and thread.is_alive()]
