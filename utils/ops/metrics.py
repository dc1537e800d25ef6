"""Prometheus metrics for ``/metrics``, read from the controller and polling stats at scrape time.

A private registry (not the global one) so two apps in one test process never collide.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from utils.locking.controller import Mode

if TYPE_CHECKING:
    from main import App


class Metrics:
    def __init__(self, app: App) -> None:
        self.app = app
        self.registry = CollectorRegistry()
        r = self.registry
        self.mode = Gauge("solobot_mode", "1 for the current mode", ["mode"], registry=r)
        self.epoch = Gauge("solobot_epoch", "Fencing epoch held (0 when passive)", registry=r)
        self.handovers = Counter("solobot_handovers", "Times this instance became active",
                                 registry=r)
        self.conflicts = Gauge("solobot_conflicts", "409 conflicts seen by getUpdates", registry=r)
        self.updates = Gauge("solobot_updates_processed", "Updates handled", registry=r)
        self.errors = Gauge("solobot_getupdates_errors", "getUpdates errors by kind", ["kind"],
                            registry=r)
        self.latency = Histogram("solobot_handler_seconds", "Handler latency", registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.posts = Gauge("solobot_posts_sent", "Channel posts published by this process",
                           registry=r)
        self.on_mode(Mode.PASSIVE)

    def on_mode(self, mode: Mode) -> None:
        for m in Mode:
            self.mode.labels(m.value).set(1 if m is mode else 0)
        if mode is Mode.ACTIVE:
            self.handovers.inc()

    def render(self) -> tuple[bytes, str]:
        app = self.app
        stats = app.polling.stats
        self.epoch.set(app.controller.epoch)
        self.conflicts.set(stats.conflicts)
        self.updates.set(stats.updates_processed)
        for kind, count in stats.errors.items():
            self.errors.labels(kind).set(count)
        samples, stats.handler_seconds = stats.handler_seconds, []
        for seconds in samples:
            self.latency.observe(seconds)
        if app.autoposter is not None:
            self.posts.set(app.autoposter.posts_sent)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
