"""``Server``: one run of the daemon, as named stages (the shape of uvicorn's ``Server.serve``).

:meth:`Server.serve` reads top to bottom:

1. **startup**: open and start everything, each resource *entered* with its teardown at the same
   place (:meth:`ShutdownManager.enter`): the state store (its SQLite files), the lock backend (its
   directory), the bot's HTTP session, the dispatcher with the user's router attached, the wiring
   (:class:`~utils.ops.daemon_parts.DaemonParts`, no I/O), the health and webhook listeners,
   aiogram's startup hooks, the leadership controller, systemd's ``READY=1`` and watchdog;
2. **main loop**: wait until a stop is requested (a signal, ``_fatal``, a test) or the leadership
   watcher ends;
3. **shutdown**: the registered stages in reverse, each bounded, all under ``SHUTDOWN_TIMEOUT``,
   errors collected (:class:`~utils.ops.shutdown.ShutdownManager`).

A start-up step that fails unwinds exactly what the steps before it made, in reverse, and picks
the exit code: 78 (``EX_CONFIG``) for a configuration problem no restart fixes (a state or lock
directory that is not ours alone, an unusable bot module), 1 for any other failure (a port in
use). Signals are not the server's business: ``main.py`` installs the handlers when it runs as a
program (:func:`serve_with_signals`); a test embeds the server and calls :meth:`request_stop`.
"""

from __future__ import annotations

import asyncio
import logging

from aiogram import Bot, Dispatcher, Router
from aiogram.client.telegram import TelegramAPIServer

from utils.base.lease import LeaseGate
from utils.base.private_path import UnsafePathError
from utils.config import EX_CONFIG
from utils.locking.controller import Mode
from utils.locking.factory import make_backend
from utils.locking.gated_session import GatedAiohttpSession
from utils.ops.bootstrap import EXIT_FAILURE, EXIT_OK
from utils.ops.bot_module import BotModuleError
from utils.ops.daemon_config import DaemonConfig
from utils.ops.daemon_parts import DaemonParts
from utils.ops.early_stop import EarlyStop
from utils.ops.http_listener import ListenError
from utils.ops.sd_notify import SystemdNotifier
from utils.ops.shutdown import ShutdownManager
from utils.sending.limiter import FloodControl, FloodLimiter
from utils.state.fsm import DurableStorage
from utils.state.store import StateStore

log = logging.getLogger("solobot")

#: Releasing the lock after the roles stopped (a database round trip or two).
RELEASE_ALLOWANCE = 1.0
#: Start-up failures that are configuration errors (exit 78: systemd does not restart in a loop).
CONFIGURATION_FAILURES: tuple[type[Exception], ...] = (UnsafePathError, BotModuleError)


def make_bot(config: DaemonConfig, gate: LeaseGate, flood: FloodControl | None = None) -> Bot:
    """The bot, whose every Bot API call passes the lease gate (none without a valid lease), and
    every send into a chat the flood limiter. Its HTTP session connects on the first call."""
    settings = config.settings
    session = GatedAiohttpSession(gate, flood=flood, api=TelegramAPIServer.from_base(settings.api_url))
    return Bot(settings.bot_token, session=session)


def detach_router(dp: Dispatcher, router: Router) -> None:
    """Undo ``dp.include_router(router)``: aiogram refuses to attach a router that has a parent, and
    the user's router is a module global, so the next server of this process could not include it.
    (aiogram has no public call for this; these are the two links ``include_router`` made.)"""
    if router in dp.sub_routers:
        dp.sub_routers.remove(router)
    if router.parent_router is dp:
        router._parent_router = None


def exit_code_for(exc: Exception) -> int:
    """The exit code of a start-up that failed with *exc*."""
    return EX_CONFIG if isinstance(exc, CONFIGURATION_FAILURES) else EXIT_FAILURE


class Server:
    """One run of the daemon: :meth:`serve` returns its exit code. Built without I/O."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        settings = config.settings
        self.shutdown = ShutdownManager(deadline=settings.shutdown_timeout,
                                        callback_timeout=config.role_stop_timeout)
        self.notifier = SystemdNotifier.from_environment()
        self.exit_code = EXIT_OK
        #: The wired parts, once start-up got that far (for /health, tests).
        self.parts: DaemonParts | None = None
        self._watcher: asyncio.Task[None] | None = None

    # -- the three stages ----------------------------------------------------------------------

    async def serve(self) -> int:
        """Start up, run until asked to stop, shut down; the exit code."""
        try:
            try:
                running = await self.startup()
            except Exception as exc:  # every start-up failure: one line, and its exit code
                self.exit_code = exit_code_for(exc)
                if isinstance(exc, (*CONFIGURATION_FAILURES, ListenError)):
                    log.error("%s", exc)
                else:
                    log.error("start-up failed: %s", exc, exc_info=exc)
                running = False
            if running:
                await self.main_loop()
        finally:
            errors = await self.shutdown.run()
        if self.exit_code != EXIT_OK:
            return self.exit_code
        return EXIT_OK if not errors else EXIT_FAILURE

    async def startup(self) -> bool:
        """Every resource, entered with its teardown; False if a stop was requested meanwhile."""
        sd, config = self.shutdown, self.config
        settings = config.settings
        sd.register("close systemd socket", self.notifier.close)  # last: STOPPING=1 goes out before
        # The state and the lock: files checked or created, nothing connected yet.
        store = StateStore.create(config.target, settings.bot_id, config.instance_id)
        await sd.enter("close state store", store.open, store.close)
        backend = make_backend(settings, store, config.instance_id)
        await sd.enter("close lock backend", backend.open, backend.close)
        # Telegram's send limits, for every send into a chat whoever makes it (utils/sending).
        gate = LeaseGate()
        sends = FloodLimiter(settings.send_limits)
        flood = FloodControl(sends, gate)
        bot = make_bot(config, gate, flood)
        sd.register("close bot session", bot.session.close)
        # The user's bot (BOT_MODULE) on a dispatcher whose FSM state lives in the state store,
        # committed with each update's done mark (utils/state/fsm.py) unless the module replaces it.
        storage = DurableStorage(store.fsm, lambda: gate.lease)
        dp = Dispatcher(storage=storage)
        router = config.bot_module.router
        await sd.enter("detach the bot module's router", lambda: dp.include_router(router),
                       lambda: detach_router(dp, router))
        config.bot_module.setup(dp)
        # Everything else, wired without I/O; then the listeners (passive replicas answer too).
        parts = self.parts = DaemonParts.wire(config, store=store, backend=backend, bot=bot, dp=dp,
                                              storage=storage, gate=gate, sends=sends, flood=flood,
                                              on_fatal=self._fatal)
        parts.controller.add_listener(self._on_mode)
        if parts.health is not None:
            await sd.enter("stop health endpoint", parts.health.start, parts.health.stop)
        if parts.webhook_server is not None:
            await sd.enter("stop webhook endpoint", parts.webhook_server.start, parts.webhook_server.stop)
        if sd.requested:  # a stop before we lead anything: the listeners answered meanwhile
            return False
        # The user's startup hooks, then leadership: polling or the webhook role once we lead.
        hooks = {"bot": bot, "dispatcher": dp, "bots": [bot]}
        await sd.enter("aiogram shutdown hooks", lambda: dp.emit_startup(**hooks),
                       lambda: dp.emit_shutdown(**hooks))
        await sd.enter("stop polling, drain, release the lock", self._start_controller, self._stop_controller,
                       timeout=config.role_stop_timeout + RELEASE_ALLOWANCE)
        sd.register("notify systemd", lambda: self.notifier.notify("STOPPING=1"))
        self.notifier.notify("READY=1")
        await sd.enter("stop watchdog", self.notifier.start_watchdog, self.notifier.stop_watchdog)
        if parts.webhook is not None and settings.webhook_insecure:
            log.warning("WEBHOOK_URL is plain http: only for a local Bot API server or tests "
                        "(Telegram's cloud server posts to https only)")
        log.info("solobot started: bot %s, instance %s, lock backend %s, state %s",
                 settings.masked_token, config.instance_id, backend.name, settings.database_target)
        return True

    async def main_loop(self) -> None:
        """Until a stop is requested, or the leadership watcher ends (a bug: logged, then stop)."""
        assert self._watcher is not None
        stopper = asyncio.create_task(self.shutdown.wait(), name="solobot-stop-request")
        try:
            await asyncio.wait({self._watcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            await asyncio.gather(stopper, return_exceptions=True)
        if self._watcher.done() and not self.shutdown.requested:
            exc = None if self._watcher.cancelled() else self._watcher.exception()
            log.error("leadership watcher ended unexpectedly: %r", exc)
            self.shutdown.request("leadership watcher ended")

    # -- requests --------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """Stop as SIGTERM would: drain, release, exit 0 (embedding code and tests call this)."""
        self.shutdown.request(reason)

    def _fatal(self, reason: str) -> None:
        """A problem no retry fixes (revoked token): stop with exit 78 so systemd does not loop."""
        self.exit_code = EX_CONFIG
        self.shutdown.request(reason)

    def _on_mode(self, mode: Mode, detail: str) -> None:
        words = {Mode.ACTIVE: f"active: {self.config.settings.bot_mode}", Mode.PASSIVE: "passive: standby",
                 Mode.STOPPING: "stopping"}[mode]
        self.notifier.notify(f"STATUS={words} ({detail})")

    def _start_controller(self) -> None:
        assert self.parts is not None
        self._watcher = asyncio.create_task(self.parts.controller.run(), name="solobot-leadership")

    async def _stop_controller(self) -> None:
        assert self.parts is not None and self._watcher is not None
        self.parts.controller.request_stop()
        await self._watcher


async def serve_with_signals(server: Server, early: EarlyStop | None = None) -> int:
    """:meth:`Server.serve` as a program runs it: SIGTERM/SIGINT handled on the loop (and given
    back when the stop is over), a signal that arrived since *early* took over honoured."""
    server.shutdown.install_signal_handlers()
    received = early.received if early is not None else None
    if received is not None:  # arrived between the bootstrap and the loop's handlers
        server.request_stop(f"received {received.name}")
    return await server.serve()


__all__ = ["Server", "detach_router", "exit_code_for", "make_bot", "serve_with_signals"]
