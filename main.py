"""solobot: a Telegram bot daemon that is never two.

    python main.py            run the bot (active if it gets the lock, else a quiet standby)
    python main.py status     print who is active for the configured backend; exit 0 if an
                              active holder exists, 3 if none, 4 if it cannot tell (the
                              database is unreachable or does not answer; one line says why)
    python main.py --help     this text
    python main.py inbox      list the updates set aside as poison (their handler was running
                              at POISON_AFTER deaths of the process); `inbox retry ID` puts one
                              back, `inbox drop ID` marks it done (exit 3: ID is not set aside)

Exit codes: 0 clean stop, 1 runtime failure (e.g. health port in use), 2 usage, 3 status: no
active holder (inbox: no such update set aside), 4 status or inbox: cannot tell (database
unreachable), 78 configuration error (also an
unreadable .env line or a placeholder token), 130 forced by a repeated SIGINT.
"""

from __future__ import annotations

import sys

from utils.ops.early_stop import EarlyStop

# First: a container's PID 1 must honour SIGTERM from its first instruction (utils/ops/early_stop.py).
EARLY_STOP = EarlyStop.install()

from utils.ops.bootstrap import prepare  # noqa: E402 - after the signal handlers, still light

# Before anything heavy: a bad configuration must exit 78 without paying for aiogram's imports.
PREPARED = prepare(sys.argv, __doc__ or "") if __name__ == "__main__" else None
if isinstance(PREPARED, int):
    sys.exit(PREPARED)

import asyncio  # noqa: E402 - deliberately after the bootstrap above
import gc  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from aiogram import Bot, Dispatcher  # noqa: E402
from aiogram.client.telegram import TelegramAPIServer  # noqa: E402

from utils.autoposter.role import Autoposter  # noqa: E402
from utils.base.exit_codes import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK  # noqa: E402
from utils.base.lease import LeaseGate  # noqa: E402
from utils.base.lookup import HEALTH_LOOKUP_TIMEOUT, BoundedLookup  # noqa: E402
from utils.base.private_path import UnsafePathError  # noqa: E402
from utils.config import Settings  # noqa: E402
from utils.locking.controller import LeadershipController, Mode  # noqa: E402
from utils.locking.factory import make_backend  # noqa: E402
from utils.locking.gated_session import GatedAiohttpSession  # noqa: E402
from utils.ops.bot_module import BotContext, BotModuleError, load_bot_module  # noqa: E402
from utils.ops.daemon_settings import DaemonSettings  # noqa: E402
from utils.ops.health import OPS_HTTP_CONNECTIONS, HealthServer, RouteServer, scrubber  # noqa: E402
from utils.ops.http_listener import ListenError  # noqa: E402
from utils.ops.metrics import Metrics  # noqa: E402
from utils.ops.sd_notify import SystemdNotifier  # noqa: E402
from utils.ops.shutdown import ShutdownManager  # noqa: E402
from utils.sending.limiter import FloodControl, FloodLimiter  # noqa: E402
from utils.state.database import DatabaseTarget  # noqa: E402
from utils.state.fsm import DurableStorage  # noqa: E402
from utils.state.store import StateStore  # noqa: E402
from utils.updates.passive_notice import PassiveNotice  # noqa: E402
from utils.updates.pipeline import UpdatePipeline  # noqa: E402
from utils.updates.polling import PollingManager  # noqa: E402
from utils.updates.stats import UpdateStats  # noqa: E402
from utils.updates.webhook import (  # noqa: E402
    WEBHOOK_HTTP_CONNECTIONS,
    Registration,
    WebhookReceiver,
    WebhookRole,
    webhook_path,
)

log = logging.getLogger("solobot")

#: A role's stop is bounded by DRAIN_TIMEOUT plus this (the done marks' final flush, closing).
ROLE_STOP_ALLOWANCE = 2.0
#: /ready: a successful getUpdates within POLLING_TIMEOUT plus this, or not ready.
READY_MARGIN = 5.0
#: Releasing the lock after the roles stopped (a database round trip or two).
RELEASE_ALLOWANCE = 1.0


def make_bot(settings: Settings, gate: LeaseGate, flood: FloodControl | None = None) -> Bot:
    """The bot, whose every Bot API call passes the lease gate (none without a valid lease), and
    every send into a chat the flood limiter."""
    session = GatedAiohttpSession(gate, flood=flood, api=TelegramAPIServer.from_base(settings.api_url))
    return Bot(settings.bot_token, session=session)


class App:
    """Everything one process runs, wired once; :meth:`serve` runs it until a signal."""

    def __init__(self, settings: DaemonSettings) -> None:
        self.settings = settings
        self.instance_id = uuid.uuid4().hex[:12]
        self.exit_code = EXIT_OK
        self.shutdown = ShutdownManager(deadline=settings.shutdown_timeout,
                                        callback_timeout=settings.drain_timeout + ROLE_STOP_ALLOWANCE)
        self.target = DatabaseTarget.parse(settings.database, settings.state_dir)
        self.store = StateStore.create(self.target, settings.bot_id, self.instance_id)
        self.backend = make_backend(settings, self.store, self.instance_id)
        self.gate = LeaseGate()
        # Telegram's send limits, for every send into a chat whoever makes it (utils/sending).
        self.sends = FloodLimiter(settings.send_limits)
        self.flood = FloodControl(self.sends, self.gate)
        self.bot = make_bot(settings, self.gate, self.flood)
        # The user's bot (BOT_MODULE) on a dispatcher whose FSM state lives in the state store,
        # committed with each update's done mark (utils/state/fsm.py) unless the module replaces it.
        self.user_bot = load_bot_module(settings.bot_module)
        self.storage = DurableStorage(self.store.fsm, lambda: self.gate.lease)
        self.dp = Dispatcher(storage=self.storage)
        self.dp.include_router(self.user_bot.router)
        self.user_bot.setup(self.dp)
        # Resolved once: only the update types the handlers use (as start_polling would).
        allowed = self.dp.resolve_used_update_types()
        self.stats = UpdateStats()
        self.pipeline = UpdatePipeline(
            self.bot, self.dp, self.store, self.stats,
            step_down=self._step_down,
            concurrency=settings.handler_concurrency,
            drain_timeout=settings.drain_timeout,
            warn_seconds=settings.handler_warn_seconds,
            inbox_max=settings.inbox_max,
            on_drain_deadline=lambda: self.flood.close("the drain deadline passed"),
            state_writes=self.storage if self.dp.fsm.storage is self.storage else None,
            poison_after=settings.poison_after,
            sweep_unclaimed=settings.bot_mode != "webhook",
        )
        self.sends.on_wait = self.pipeline.waiting_to_send
        self.polling = PollingManager(
            self.bot, self.store, self.pipeline, self.stats,
            step_down=self._step_down,
            on_fatal=self._fatal,
            polling_timeout=settings.polling_timeout,
            delete_webhook=settings.delete_webhook_on_conflict,
            allowed_updates=allowed,
        )
        self.webhook: WebhookRole | None = None
        self.receiver: WebhookReceiver | None = None
        if settings.bot_mode == "webhook" and settings.webhook_url:
            self.webhook = WebhookRole(
                self.bot, self.store, self.pipeline,
                registration=Registration(settings.webhook_url, settings.webhook_secret, tuple(allowed),
                                          settings.webhook_max_connections),
                target=self.target, instance_id=self.instance_id, step_down=self._step_down,
            )
            self.receiver = WebhookReceiver(
                self.store, path=webhook_path(settings.webhook_url), secret=settings.webhook_secret,
                on_stored=self.webhook.wake,
                notice=PassiveNotice(settings.passive_notice) if settings.passive_notice else None,
                strategy=self.dp.fsm.strategy,
            )
        self.autoposter: Autoposter | None = None
        if settings.autoposter.channel_id:
            self.autoposter = Autoposter(
                self.bot, self.store,
                channel_id=settings.autoposter.channel_id,
                post_cron=settings.autoposter.post_cron,
                post_interval=settings.autoposter.post_interval,
                timezone=settings.autoposter.post_timezone,
                misfire_grace=settings.autoposter.post_misfire_grace,
                admin_ids=settings.admin_ids,
                step_down=self._step_down,
                sends=self.sends,
            )
        roles: list[Any] = [self.webhook or self.polling] + ([self.autoposter] if self.autoposter else [])
        roles += self.user_bot.active_roles(BotContext(self.bot, self.dp, self.dp.fsm.storage, settings))
        self.controller = LeadershipController(
            self.backend, roles, instance_id=self.instance_id,
            role_stop_timeout=settings.drain_timeout + ROLE_STOP_ALLOWANCE, gate=self.gate,
        )
        # The database lookups of /health and /metrics: each answers within HEALTH_LOOKUP_TIMEOUT or
        # says it could not, and a stuck one is never started twice (utils/base/lookup.py). One inbox
        # lookup serves both endpoints.
        self._inbox_lookup = BoundedLookup(self.store.inbox.depth, HEALTH_LOOKUP_TIMEOUT, name="inbox depth")
        self._set_aside_lookup = BoundedLookup(self.store.recovery.count_set_aside, HEALTH_LOOKUP_TIMEOUT,
                                               name="set-aside count")
        self._paused_lookup = (BoundedLookup(self.autoposter.is_paused, HEALTH_LOOKUP_TIMEOUT, name="pause flag")
                               if self.autoposter else None)
        self.metrics = Metrics(controller=self.controller, stats=self.stats, autoposter=self.autoposter,
                               backend=self.backend, inbox_depth=self._inbox_lookup,
                               set_aside=self._set_aside_lookup,
                               deliveries=self.receiver.stats if self.receiver else None,
                               webhook=self.webhook, sends=self.sends)
        self.notifier = SystemdNotifier.from_environment()
        self.controller.add_listener(self._on_mode)
        self.dp["admin_ids"] = settings.admin_ids
        self.dp["status"] = self.status
        self.dp["autoposter"] = self.autoposter
        self.health: HealthServer | None = None
        # The webhook on a port of its own (WEBHOOK_PORT), else on HEALTH_PORT, which is then public.
        self.webhook_server: RouteServer | None = None
        shared = self.receiver is not None and not settings.webhook_port
        if self.receiver is not None and settings.webhook_port:
            self.webhook_server = RouteServer("WEBHOOK_PORT", settings.webhook_host, settings.webhook_port,
                                              self.receiver.routes(), max_connections=WEBHOOK_HTTP_CONNECTIONS)
        if settings.health_port:
            self.health = HealthServer(
                settings.health_host, settings.health_port,
                status=self.status, ready=self.ready, metrics=self.metrics.scrape,
                routes=self.receiver.routes() if self.receiver and shared else (),
                scrub=scrubber(settings.redactor, public=shared),
                max_connections=WEBHOOK_HTTP_CONNECTIONS if shared else OPS_HTTP_CONNECTIONS,
            )

    def _step_down(self, reason: str) -> None:
        self.controller.step_down(reason)

    def _fatal(self, reason: str) -> None:
        """A problem no retry fixes (revoked token): stop with exit 78 so systemd does not loop."""
        self.exit_code = EXIT_CONFIG
        self.shutdown.request(reason)

    def _on_mode(self, mode: Mode, detail: str) -> None:
        words = {Mode.ACTIVE: f"active: {self.settings.bot_mode}", Mode.PASSIVE: "passive: standby",
                 Mode.STOPPING: "stopping"}[mode]
        self.notifier.notify(f"STATUS={words} ({detail})")

    # -- what /health, /ready and /status read -----------------------------------------------

    async def status(self) -> dict[str, Any]:
        """What /health shows. The lookups that need the database run concurrently, each bounded
        (HEALTH_LOOKUP_TIMEOUT): /health answers in well under a second whatever the database does."""
        snap = self.controller.snapshot()
        holder, paused, depth, set_aside = await asyncio.gather(
            self.controller.holder(), self._paused_or_error(), self._inbox_lookup.or_reason(),
            self._set_aside_lookup.or_reason())
        stats = self.stats
        autoposter = "off (no CHANNEL_ID)"
        if self.autoposter is not None:
            autoposter = self.autoposter.state
            if paused is True:
                autoposter = "paused"
            elif isinstance(paused, str):
                autoposter += f" (pause flag unknown: {paused})"
        return {
            "status": "ok",
            **snap,
            "lock": {
                "backend": self.backend.name,
                "holder": holder.as_dict() if holder else None,
                "fenced_holders": self.backend.fenced_holders,
            },
            "polling": {
                "active": stats.polling,
                "seconds_since_ok": stats.seconds_since_ok(),
                "conflicts": stats.conflicts,
                "errors": dict(stats.errors),
            },
            "updates": {
                "fetched": stats.fetched,
                "handled": stats.handled,
                "handler_errors": stats.handler_errors,
                "duplicates_skipped": stats.duplicates,
                "redelivered": stats.redelivered,
                "waiting": stats.inbox_waiting,
                "delivery": "webhook" if self.webhook else "polling",
                "inbox_waiting": depth[0] if isinstance(depth, tuple) else None,
                "inbox_oldest_age_s": depth[1] if isinstance(depth, tuple) else None,
                **({"inbox_error": depth} if isinstance(depth, str) else {}),
                "set_aside": set_aside,  # poison updates held now (python main.py inbox), or why unknown
                "set_aside_total": stats.set_aside,
                **({"webhook": self._webhook_status()} if self.webhook else {}),
            },
            "autoposter": {"state": autoposter},
            "sends": {"waiting": self.sends.waiting, "rate_limited": self.sends.rate_limited},
        }

    def _webhook_status(self) -> dict[str, Any]:
        """The receiver's counters, and on the leader getWebhookInfo as last fetched (cached)."""
        assert self.webhook is not None and self.receiver is not None
        received = self.receiver.stats
        return {
            "accepted": received.accepted,
            "duplicates": received.duplicates,
            "unauthorized": received.unauthorized,
            "malformed": received.malformed,
            "unavailable": received.unavailable,
            "inbox_error": received.inbox_error,
            "info": self.webhook.info,
        }

    async def _paused_or_error(self) -> bool | str | None:
        if self._paused_lookup is None:  # no autoposter
            return None
        return await self._paused_lookup.or_reason()

    def ready(self) -> tuple[bool, str]:
        """200 only while active with a successful getUpdates within POLLING_TIMEOUT + a margin.

        Webhook mode: 200 on every replica that can store deliveries (passive ones too: a
        balancer should send updates to any of them)."""
        if self.receiver is not None:
            return self.receiver.ready()
        if not self.controller.is_active:
            return False, f"{self.controller.mode.value}: {self.controller.snapshot()['passive_reason']}"
        stats = self.stats
        since = stats.seconds_since_ok()
        if not stats.polling:
            return False, "active but not polling"
        if since is None:
            return False, "active, but no getUpdates has succeeded yet"
        if since > self.settings.polling_timeout + READY_MARGIN:
            failing = self.polling.outage.outage
            why = f" ({failing.failures} failed attempts)" if failing else ""
            return False, f"active, but no successful getUpdates for {since:.0f} s{why}"
        return True, "active and polling"

    # -- lifecycle ---------------------------------------------------------------------------

    async def serve(self, early_signal: Callable[[], signal.Signals | None] = lambda: None) -> int:
        sd = self.shutdown
        sd.install_signal_handlers()
        received = early_signal()
        if received is not None:  # arrived between the bootstrap and the loop's handlers
            sd.request(f"received {received.name}")
        # Registered in creation order; they run in reverse (LIFO) at shutdown.
        sd.register("close bot session", self.bot.session.close)
        sd.register("close state store", self.store.close)
        sd.register("close lock backend", self.backend.close)
        if self.health is not None:
            await self.health.start()
            sd.register("stop health endpoint", self.health.stop)
        if self.webhook_server is not None:
            await self.webhook_server.start()
            sd.register("stop webhook endpoint", self.webhook_server.stop)
        if sd.requested:
            await sd.run()
            return EXIT_OK
        await self.dp.emit_startup(bot=self.bot, dispatcher=self.dp, bots=[self.bot])
        sd.register("aiogram shutdown hooks",
                    lambda: self.dp.emit_shutdown(bot=self.bot, dispatcher=self.dp, bots=[self.bot]))
        watcher = asyncio.create_task(self.controller.run(), name="solobot-leadership")
        sd.register("stop polling, drain, release the lock", lambda: self._stop_controller(watcher),
                    timeout=self.settings.drain_timeout + ROLE_STOP_ALLOWANCE + RELEASE_ALLOWANCE)
        sd.register("notify systemd", lambda: self.notifier.notify("STOPPING=1"))
        self.notifier.notify("READY=1")
        self.notifier.start_watchdog()
        sd.register("stop watchdog", self.notifier.stop_watchdog)
        if self.webhook is not None and self.settings.webhook_insecure:
            log.warning("WEBHOOK_URL is plain http: only for a local Bot API server or tests "
                        "(Telegram's cloud server posts to https only)")
        log.info("solobot started: bot %s, instance %s, lock backend %s, state %s",
                 self.settings.masked_token, self.instance_id, self.backend.name,
                 self.settings.database_target)

        stopper = asyncio.create_task(sd.wait())
        await asyncio.wait({watcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if watcher.done() and not stopper.done():
            exc = watcher.exception()
            log.error("leadership watcher ended unexpectedly: %r", exc)
            sd.request("leadership watcher ended")
        stopper.cancel()
        errors = await sd.run()
        if self.exit_code != EXIT_OK:
            return self.exit_code
        return EXIT_OK if not errors else EXIT_FAILURE

    async def _stop_controller(self, watcher: asyncio.Task[None]) -> None:
        self.controller.request_stop()
        await watcher


def run(command: str, settings: DaemonSettings) -> int:
    try:
        app = App(settings)
        # Everything imported and wired lives as long as the process: keep it out of the garbage
        # collector's generations, so a collection only walks what the work itself allocates.
        gc.freeze()
        EARLY_STOP.hand_over()
        return asyncio.run(app.serve(early_signal=lambda: EARLY_STOP.received))
    except (UnsafePathError, BotModuleError) as exc:  # not ours alone; or the bot module is unusable
        log.error("%s", exc)
        return EXIT_CONFIG
    except ListenError as exc:  # HEALTH_PORT or WEBHOOK_PORT
        log.error("%s", exc)
        return EXIT_FAILURE


if __name__ == "__main__":
    assert PREPARED is not None
    sys.exit(run(*PREPARED))
