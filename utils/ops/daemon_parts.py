"""``DaemonParts``: the objects of one running daemon, wired together without any I/O.

:class:`utils.ops.server.Server` opens the resources first (the state store, the lock backend, the
bot's session, the dispatcher with the user's router) and hands them to :meth:`DaemonParts.wire`,
which only builds and connects: the update pipeline, polling or the webhook role and receiver,
the autoposter, the user's active roles, the leadership controller that runs them, what /health
and /metrics read, and the HTTP listeners (not yet listening). Nothing here opens a file, a socket
or a connection, so a failure while wiring leaves nothing to undo beyond what the server entered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiogram import Bot, Dispatcher

from utils.autoposter.role import Autoposter
from utils.base.lease import LeaseGate
from utils.locking.backend import LockBackend
from utils.locking.controller import LeadershipController
from utils.ops.bot_module import BotContext
from utils.ops.daemon_config import DaemonConfig
from utils.ops.health import OPS_HTTP_CONNECTIONS, HealthServer, RouteServer, scrubber
from utils.ops.metrics import Metrics
from utils.ops.status_report import StatusReporter
from utils.sending.limiter import FloodControl, FloodLimiter
from utils.state.fsm import DurableStorage
from utils.state.store import StateStore
from utils.updates.passive_notice import PassiveNotice
from utils.updates.pipeline import UpdatePipeline
from utils.updates.polling import PollingManager
from utils.updates.stats import UpdateStats
from utils.updates.webhook import (
    WEBHOOK_HTTP_CONNECTIONS,
    Registration,
    WebhookReceiver,
    WebhookRole,
    webhook_path,
)


@dataclass(frozen=True)
class DaemonParts:
    """What the server starts and stops, and what /health reads."""

    pipeline: UpdatePipeline
    polling: PollingManager
    webhook: WebhookRole | None  # webhook mode: the leader's role instead of polling
    receiver: WebhookReceiver | None  # webhook mode: on every replica
    autoposter: Autoposter | None
    controller: LeadershipController
    status: StatusReporter  # the one typed snapshot /health, /ready, /metrics and /status read
    metrics: Metrics
    health: HealthServer | None  # HEALTH_PORT=0: none
    webhook_server: RouteServer | None  # WEBHOOK_PORT set: the webhook on a port of its own

    @classmethod
    def wire(cls, config: DaemonConfig, *, store: StateStore, backend: LockBackend, bot: Bot, dp: Dispatcher,
             storage: DurableStorage, gate: LeaseGate, sends: FloodLimiter, flood: FloodControl,
             on_fatal: Callable[[str], None]) -> DaemonParts:
        """Build the parts around the opened *store*, *backend*, *bot* and *dp* (the user's router
        included; *storage*: the durable FSM storage it was made with); *on_fatal* stops the
        daemon with exit 78 (a problem no retry fixes)."""
        settings = config.settings

        def step_down(reason: str) -> None:
            controller.step_down(reason)

        # Resolved once: only the update types the handlers use (as start_polling would).
        allowed = dp.resolve_used_update_types()
        stats = UpdateStats()
        pipeline = UpdatePipeline(
            bot, dp, store, stats,
            step_down=step_down,
            concurrency=settings.handler_concurrency,
            drain_timeout=settings.drain_timeout,
            warn_seconds=settings.handler_warn_seconds,
            inbox_max=settings.inbox_max,
            on_drain_deadline=lambda: flood.close("the drain deadline passed"),
            # FSM writes commit with the done marks, unless the bot module replaced the storage.
            state_writes=storage if dp.fsm.storage is storage else None,
            poison_after=settings.poison_after,
            sweep_unclaimed=settings.bot_mode != "webhook",
        )
        sends.on_wait = pipeline.waiting_to_send
        polling = PollingManager(
            bot, store, pipeline, stats,
            step_down=step_down,
            on_fatal=on_fatal,
            polling_timeout=settings.polling_timeout,
            delete_webhook=settings.delete_webhook_on_conflict,
            allowed_updates=allowed,
        )
        webhook: WebhookRole | None = None
        receiver: WebhookReceiver | None = None
        if settings.bot_mode == "webhook" and settings.webhook_url:
            webhook = WebhookRole(
                bot, store, pipeline,
                registration=Registration(settings.webhook_url, settings.webhook_secret, tuple(allowed),
                                          settings.webhook_max_connections),
                target=config.target, instance_id=config.instance_id, step_down=step_down,
            )
            receiver = WebhookReceiver(
                store, path=webhook_path(settings.webhook_url), secret=settings.webhook_secret,
                on_stored=webhook.wake,
                notice=PassiveNotice(settings.passive_notice) if settings.passive_notice else None,
                strategy=dp.fsm.strategy,
            )
        autoposter: Autoposter | None = None
        if settings.autoposter.channel_id:
            autoposter = Autoposter(
                bot, store,
                channel_id=settings.autoposter.channel_id,
                post_cron=settings.autoposter.post_cron,
                post_interval=settings.autoposter.post_interval,
                timezone=settings.autoposter.post_timezone,
                misfire_grace=settings.autoposter.post_misfire_grace,
                admin_ids=settings.admin_ids,
                step_down=step_down,
                sends=sends,
            )
        roles: list[Any] = [webhook or polling] + ([autoposter] if autoposter else [])
        roles += config.bot_module.active_roles(BotContext(bot, dp, dp.fsm.storage, settings))
        controller = LeadershipController(
            backend, roles, instance_id=config.instance_id,
            role_stop_timeout=config.role_stop_timeout, gate=gate,
        )
        # What /health, /ready, /metrics and /status read: one typed snapshot (utils/ops/status_report.py).
        status = StatusReporter(
            controller=controller, backend=backend, stats=stats,
            inbox_depth=store.inbox.depth, set_aside=store.recovery.count_set_aside,
            polling=polling, sends=sends, polling_timeout=settings.polling_timeout,
            autoposter=autoposter, webhook=webhook, receiver=receiver,
        )
        metrics = Metrics(status.snapshot)
        # The handlers' workflow data (bot.py reads them).
        dp["admin_ids"] = settings.admin_ids
        dp["status"] = status.snapshot
        dp["autoposter"] = autoposter
        # The webhook on a port of its own (WEBHOOK_PORT), else on HEALTH_PORT, which is then public.
        webhook_server: RouteServer | None = None
        shared = receiver is not None and not settings.webhook_port
        if receiver is not None and settings.webhook_port:
            webhook_server = RouteServer("WEBHOOK_PORT", settings.webhook_host, settings.webhook_port,
                                         receiver.routes(), max_connections=WEBHOOK_HTTP_CONNECTIONS)
        health: HealthServer | None = None
        if settings.health_port:
            health = HealthServer(
                settings.health_host, settings.health_port,
                status=status.health, ready=status.ready, metrics=metrics.scrape,
                routes=receiver.routes() if receiver and shared else (),
                scrub=scrubber(settings.redactor, public=shared),
                max_connections=WEBHOOK_HTTP_CONNECTIONS if shared else OPS_HTTP_CONNECTIONS,
            )
        return cls(pipeline=pipeline, polling=polling, webhook=webhook, receiver=receiver,
                   autoposter=autoposter, controller=controller, status=status, metrics=metrics,
                   health=health, webhook_server=webhook_server)
