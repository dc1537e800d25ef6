"""The one object that takes the daemon's status: :class:`StatusReporter`.

Built once from the parts the daemon wires (controller, lock backend, counters, the store's
lookups, the roles of the mode); ``/health``, ``/metrics``, the ``/status`` command read
:meth:`StatusReporter.snapshot`, ``/ready`` :meth:`StatusReporter.ready`. What the facts mean and
how they are shown lives in :mod:`utils.ops.status_snapshot` (pure); this module only reads them.

The database lookups (inbox depth, set-aside count, pause flag; the holder through the
controller, which bounds and caches it) run concurrently, each bounded by
:data:`~utils.base.lookup.HEALTH_LOOKUP_TIMEOUT` (:class:`~utils.base.lookup.BoundedLookup`): the
snapshot is ready in well under a second whatever the database does, with :class:`Unknown` for
what did not answer. A stuck lookup is never started twice; one lookup serves /health, /metrics
and /status alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from utils.base.histogram import DurationHistogram
from utils.base.lookup import HEALTH_LOOKUP_TIMEOUT, BoundedLookup
from utils.locking.backend import HolderInfo
from utils.ops.status_snapshot import (
    AutoposterFacts,
    Delivery,
    Histogram,
    InboxDepth,
    InboxFacts,
    LockFacts,
    PollingFacts,
    SendFacts,
    StatusSnapshot,
    Term,
    Unknown,
    UpdateCounts,
    WebhookFacts,
    health_json,
    readiness,
)
from utils.updates.outage import OutageLog
from utils.updates.stats import UpdateStats
from utils.updates.webhook import ReceiverStats

T = TypeVar("T")


class ControllerSource(Protocol):
    """The leadership controller, as the status reads it."""

    def snapshot(self) -> dict[str, Any]: ...

    async def holder(self) -> HolderInfo | None: ...  # bounded and cached by the controller


class BackendSource(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def fenced_holders(self) -> int: ...


class PollingSource(Protocol):
    """The polling manager: its outage log (how many attempts failed in a row)."""

    @property
    def outage(self) -> OutageLog: ...


class AutoposterSource(Protocol):
    @property
    def state(self) -> str: ...

    @property
    def posts_sent(self) -> int: ...

    async def is_paused(self) -> bool: ...


class WebhookSource(Protocol):
    """The leader's half of webhook mode: getWebhookInfo as last fetched."""

    @property
    def info(self) -> Mapping[str, Any] | None: ...


class ReceiverSource(Protocol):
    """Webhook mode, every replica: the receiver's counters and whether it can store."""

    @property
    def stats(self) -> ReceiverStats: ...

    def ready(self) -> tuple[bool, str]: ...


class SendsSource(Protocol):
    """The flood limiter of sends into chats."""

    @property
    def waiting(self) -> int: ...

    @property
    def rate_limited(self) -> int: ...

    @property
    def waited(self) -> DurationHistogram: ...


def wall_time_of(monotonic_seconds: float) -> float:
    """A ``time.monotonic()`` reading as Unix time: Prometheus wants timestamps, not ages."""
    return time.time() - (time.monotonic() - monotonic_seconds)


async def _known(lookup: BoundedLookup[T]) -> T | Unknown:
    answer = await lookup.or_reason()
    # or_reason answers a str only for a failure: none of these lookups answers a str.
    return Unknown(answer) if isinstance(answer, str) else answer


class StatusReporter:
    """Takes :class:`StatusSnapshot` s of the daemon, and answers /ready."""

    def __init__(
        self,
        *,
        controller: ControllerSource,
        backend: BackendSource,
        stats: UpdateStats,
        inbox_depth: Callable[[], Awaitable[tuple[int, float | None]]],
        set_aside: Callable[[], Awaitable[int]],
        polling: PollingSource,
        sends: SendsSource,
        polling_timeout: float,
        autoposter: AutoposterSource | None = None,
        webhook: WebhookSource | None = None,
        receiver: ReceiverSource | None = None,
        lookup_timeout: float = HEALTH_LOOKUP_TIMEOUT,
    ) -> None:
        if (webhook is None) != (receiver is None):
            raise ValueError("webhook mode needs both the webhook role and the receiver")
        self.controller = controller
        self.backend = backend
        self.stats = stats
        self.polling = polling
        self.sends = sends
        self.polling_timeout = polling_timeout
        self.autoposter = autoposter
        self.webhook = webhook
        self.receiver = receiver
        self._inbox_depth = BoundedLookup(inbox_depth, lookup_timeout, name="inbox depth")
        self._set_aside = BoundedLookup(set_aside, lookup_timeout, name="set-aside count")
        self._paused = BoundedLookup(autoposter.is_paused, lookup_timeout, name="pause flag") if autoposter else None

    # -- what needs no database: /ready reads only this ------------------------------------

    def term(self) -> Term:
        return Term.from_controller(self.controller.snapshot())

    def delivery(self) -> Delivery:
        if self.webhook is not None and self.receiver is not None:
            info = self.webhook.info
            return WebhookFacts(received=dataclasses.replace(self.receiver.stats),
                                info=dict(info) if info is not None else None, ready=self.receiver.ready())
        stats = self.stats
        outage = self.polling.outage.outage
        return PollingFacts(
            active=stats.polling,
            seconds_since_ok=stats.seconds_since_ok(),
            last_ok_at=wall_time_of(stats.last_ok) if stats.last_ok is not None else None,
            errors=tuple(stats.errors.items()),
            failed_attempts=outage.failures if outage is not None else None,
        )

    def ready(self) -> tuple[bool, str]:
        """/ready: see :func:`utils.ops.status_snapshot.readiness`."""
        return readiness(self.term(), self.delivery(), self.polling_timeout)

    # -- the whole snapshot ----------------------------------------------------------------

    async def snapshot(self) -> StatusSnapshot:
        """Everything; the database lookups concurrent, each bounded (``HEALTH_LOOKUP_TIMEOUT``)."""
        term = self.term()
        depth_lookup, set_aside_lookup = _known(self._inbox_depth), _known(self._set_aside)
        holder, depth, set_aside, paused = await asyncio.gather(
            self.controller.holder(), depth_lookup, set_aside_lookup, self._pause_flag())
        autoposter = None
        if self.autoposter is not None and paused is not None:
            autoposter = AutoposterFacts(state=self.autoposter.state, paused=paused,
                                         posts_sent=self.autoposter.posts_sent)
        sends = self.sends
        return StatusSnapshot(
            term=term,
            lock=LockFacts(backend=self.backend.name, holder=holder, fenced_holders=self.backend.fenced_holders),
            delivery=self.delivery(),
            updates=UpdateCounts(self.stats.counts(), Histogram.of(self.stats.handler_seconds)),
            inbox=InboxFacts(depth=InboxDepth(*depth) if isinstance(depth, tuple) else depth, set_aside=set_aside),
            autoposter=autoposter,
            sends=SendFacts(waiting=sends.waiting, rate_limited=sends.rate_limited, waited=Histogram.of(sends.waited)),
        )

    async def health(self) -> dict[str, Any]:
        """The /health body: :func:`utils.ops.status_snapshot.health_json` of a fresh snapshot."""
        return health_json(await self.snapshot())

    async def _pause_flag(self) -> bool | Unknown | None:
        if self._paused is None:
            return None
        flag = _known(self._paused)
        return await flag
