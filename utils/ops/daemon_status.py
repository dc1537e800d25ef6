"""What ``/health``, ``/ready`` and the ``/status`` command read: the running daemon's snapshot.

Moved as it was out of main.py's ``App`` (the typed snapshot replaces it: issue 22). The database
lookups it makes (holder, pause flag, inbox depth, set-aside count) run concurrently, each bounded
by :data:`HEALTH_LOOKUP_TIMEOUT`, so ``/health`` answers in well under a second whatever the
database does.
"""

from __future__ import annotations

import asyncio
from typing import Any

from utils.autoposter.role import Autoposter
from utils.base.lookup import BoundedLookup
from utils.config import Settings
from utils.locking.backend import LockBackend
from utils.locking.controller import LeadershipController
from utils.sending.limiter import FloodLimiter
from utils.state.store import StateStore
from utils.updates.polling import PollingManager
from utils.updates.stats import UpdateStats
from utils.updates.webhook import WebhookReceiver, WebhookRole

#: /ready: a successful getUpdates within POLLING_TIMEOUT plus this, or not ready.
READY_MARGIN = 5.0
#: /health's database lookups (holder, pause flag) give up after this; they run concurrently.
HEALTH_LOOKUP_TIMEOUT = 0.25


class DaemonStatus:
    """The /health snapshot and the /ready verdict of one running daemon (reads only)."""

    def __init__(self, settings: Settings, *, controller: LeadershipController, stats: UpdateStats,
                 store: StateStore, backend: LockBackend, polling: PollingManager, sends: FloodLimiter,
                 autoposter: Autoposter | None, webhook: WebhookRole | None,
                 receiver: WebhookReceiver | None) -> None:
        self.settings = settings
        self.controller = controller
        self.stats = stats
        self.backend = backend
        self.polling = polling
        self.sends = sends
        self.autoposter = autoposter
        self.webhook = webhook
        self.receiver = receiver
        # Each answers within HEALTH_LOOKUP_TIMEOUT or says it could not, and a stuck one is never
        # started twice (utils/base/lookup.py). One inbox lookup serves /health and /metrics.
        self.inbox_lookup = BoundedLookup(store.inbox.depth, HEALTH_LOOKUP_TIMEOUT, name="inbox depth")
        self.set_aside_lookup = BoundedLookup(store.recovery.count_set_aside, HEALTH_LOOKUP_TIMEOUT,
                                              name="set-aside count")
        self._paused_lookup = (BoundedLookup(autoposter.is_paused, HEALTH_LOOKUP_TIMEOUT, name="pause flag")
                               if autoposter else None)

    async def status(self) -> dict[str, Any]:
        """What /health shows. The lookups that need the database run concurrently, each bounded
        (HEALTH_LOOKUP_TIMEOUT): /health answers in well under a second whatever the database does."""
        snap = self.controller.snapshot()
        holder, paused, depth, set_aside = await asyncio.gather(
            self.controller.holder(), self._paused_or_error(), self.inbox_lookup.or_reason(),
            self.set_aside_lookup.or_reason())
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
