"""``ShutdownManager``: SIGTERM/SIGINT to an orderly, bounded stop.

Modelled on uvicorn's server: the signal handler only records the request and wakes the main
task; the stop itself runs in normal code. Callbacks run once, last registered first (resources
are torn down in the reverse order of their creation, like aiohttp's runner), each under its own
timeout, all under an overall deadline. A callback that fails or times out is logged and the
rest still run. A second signal while stopping forces an immediate exit.

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
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger("solobot.shutdown")

Callback = Callable[[], Awaitable[object] | object]

EXIT_FORCED = 130  # a second signal: the operator insisted


@dataclass
class _Entry:
    name: str
    callback: Callback
    timeout: float


class ShutdownManager:
    def __init__(self, *, deadline: float = 8.0, callback_timeout: float = 5.0) -> None:
        self.deadline = deadline
        self.callback_timeout = callback_timeout
        self._entries: list[_Entry] = []
        self._requested: asyncio.Event | None = None
        self.reason: str | None = None
        self._done = False
        self._running = False
        self.errors: list[tuple[str, BaseException]] = []

    # -- registration ------------------------------------------------------------------------

    def register(self, name: str, callback: Callback, *, timeout: float | None = None) -> None:
        """Run *callback* (sync or async) at shutdown; later registrations run first."""
        self._entries.append(_Entry(name, callback, timeout or self.callback_timeout))

    # -- signals -----------------------------------------------------------------------------

    def _event(self) -> asyncio.Event:
        if self._requested is None:
            self._requested = asyncio.Event()
        return self._requested

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.reason is not None:
            # Second signal: the operator insists; skip the rest of the graceful stop.
            log.warning("received %s again while stopping; exiting now", sig.name)
            logging.shutdown()
            os._exit(EXIT_FORCED)
        self.request(f"received {sig.name}")

    def request(self, reason: str) -> None:
        """Ask for shutdown (signals do this; so can code that must stop the process)."""
        if self.reason is None:
            self.reason = reason
            log.info("shutdown requested: %s", reason)
        self._event().set()

    @property
    def requested(self) -> bool:
        return self.reason is not None

    async def wait(self) -> str:
        await self._event().wait()
        return self.reason or "requested"

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> list[tuple[str, BaseException]]:
        """Run every callback once, LIFO, bounded; return the errors (also logged)."""
        if self._done or self._running:
            return self.errors
        self._running = True
        start = time.monotonic()
        try:
            for entry in reversed(self._entries):
                remaining = self.deadline - (time.monotonic() - start)
                if remaining <= 0:
                    error = TimeoutError("overall shutdown deadline passed before it ran")
                    self.errors.append((entry.name, error))
                    log.error("shutdown: %s skipped: deadline of %.1f s passed",
                              entry.name, self.deadline)
                    continue
                await self._run_one(entry, min(entry.timeout, remaining))
        finally:
            self._done = True
            self._running = False
        log.info("shutdown complete in %.2f s (%d error(s))",
                 time.monotonic() - start, len(self.errors))
        return self.errors

    async def _run_one(self, entry: _Entry, timeout: float) -> None:
        try:
            result = entry.callback()
            if inspect.isawaitable(result):
                await asyncio.wait_for(result, timeout=timeout)
            log.debug("shutdown: %s done", entry.name)
        except TimeoutError as exc:
            self.errors.append((entry.name, exc))
            log.error("shutdown: %s timed out after %.1f s", entry.name, timeout)
        except Exception as exc:  # collect and go on, like aiohttp's runner
            self.errors.append((entry.name, exc))
            log.exception("shutdown: %s failed", entry.name)
