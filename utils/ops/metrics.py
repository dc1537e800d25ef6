"""Prometheus metrics for ``/metrics``: a collector that reads its sources at scrape time.

Why a collector and not ``Counter``/``Histogram`` objects of our own: the facts already live in
their owners (the leadership controller counts handovers, the pipeline's :class:`UpdateStats`
counts updates and keeps a fixed-bucket histogram, the autoposter counts posts). Copying them into
a second set of objects made two sources per fact and, for handler timings, a list that grew until
a scrape emptied it (forever with ``HEALTH_PORT=0``). Here nothing is stored: every scrape reads
the owners, so memory is flat however long nobody scrapes, and two scrapes in a row agree.

The sources are typed as small Protocols (what is read, nothing more), so this module imports
neither ``main`` nor the pipeline. The registry is private (not prometheus_client's global one),
so two apps in one test process never collide.

Naming follows https://prometheus.io/docs/practices/naming/: a ``solobot_`` prefix, base units
(seconds), counters end in ``_total``, one label per dimension (``mode``, ``kind``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from utils.locking.controller import Mode

PREFIX = "solobot"


class LeadershipSource(Protocol):
    """The leadership controller, as metrics see it."""

    @property
    def mode(self) -> Mode: ...

    @property
    def epoch(self) -> int: ...

    @property
    def handovers(self) -> int: ...  # times this instance took over from an earlier leader


class DurationSource(Protocol):
    """A fixed-bucket histogram (``utils.updates.stats.DurationHistogram``)."""

    @property
    def total(self) -> float: ...

    @property
    def count(self) -> int: ...

    def cumulative(self) -> Sequence[tuple[float, int]]: ...


class PipelineSource(Protocol):
    """The update pipeline's counters (``utils.updates.stats.UpdateStats``)."""

    @property
    def polling(self) -> bool: ...

    @property
    def last_ok(self) -> float | None: ...  # monotonic

    @property
    def conflicts(self) -> int: ...

    @property
    def fetched(self) -> int: ...

    @property
    def handled(self) -> int: ...

    @property
    def handler_errors(self) -> int: ...

    @property
    def duplicates(self) -> int: ...

    @property
    def redelivered(self) -> int: ...

    @property
    def inbox_waiting(self) -> int: ...

    @property
    def set_aside(self) -> int: ...

    @property
    def errors(self) -> Mapping[str, int]: ...

    @property
    def handler_seconds(self) -> DurationSource: ...


class PostsSource(Protocol):
    """The autoposter."""

    @property
    def posts_sent(self) -> int: ...


class FencingSource(Protocol):
    """The lock backend."""

    @property
    def fenced_holders(self) -> int: ...


class DeliverySource(Protocol):
    """Webhook mode: the receiver's counters (``utils.updates.webhook.ReceiverStats``)."""

    @property
    def accepted(self) -> int: ...

    @property
    def duplicates(self) -> int: ...

    @property
    def unauthorized(self) -> int: ...

    @property
    def malformed(self) -> int: ...

    @property
    def unavailable(self) -> int: ...

    @property
    def inbox_error(self) -> str | None: ...


class WebhookInfoSource(Protocol):
    """Webhook mode, on the leader: getWebhookInfo as last fetched (``WebhookRole.info``)."""

    @property
    def info(self) -> Mapping[str, Any] | None: ...


class SendsSource(Protocol):
    """The flood limiter of sends into chats (``utils.sending.limiter.FloodLimiter``)."""

    @property
    def waiting(self) -> int: ...

    @property
    def rate_limited(self) -> int: ...

    @property
    def waited(self) -> DurationSource: ...


def send_metrics(sends: SendsSource) -> Iterator[Metric]:
    yield CounterMetricFamily(
        _name("telegram_rate_limited_total"), "429 Too Many Requests answers to sends into a chat",
        value=sends.rate_limited,
    )
    yield GaugeMetricFamily(
        _name("sends_waiting"), "Sends into a chat waiting for their slot under the flood limits now",
        value=sends.waiting,
    )
    waited = sends.waited
    yield HistogramMetricFamily(
        _name("send_wait_seconds"), "Time a send into a chat waited for its slot (429 waits included)",
        buckets=[(bucket_bound(bound), count) for bound, count in waited.cumulative()],
        sum_value=waited.total,
    )


#: The shared inbox (every replica's rows): waiting rows and the oldest one's age; raises when
#: it cannot tell in time (``utils.base.lookup.BoundedLookup`` over ``InboxRepository.depth``).
InboxDepth = Callable[[], Awaitable[tuple[int, float | None]]]
#: Poison updates set aside in the shared inbox now (bounded like :data:`InboxDepth`).
SetAsideCount = Callable[[], Awaitable[int]]


def _name(suffix: str) -> str:
    return f"{PREFIX}_{suffix}"


def bucket_bound(seconds: float) -> str:
    """A histogram's ``le`` label: ``0.25``, ``5.0``, ``+Inf`` (the text format's spelling)."""
    return "+Inf" if math.isinf(seconds) else repr(float(seconds))


def wall_time_of(monotonic_seconds: float) -> float:
    """A ``time.monotonic()`` reading as Unix time: Prometheus wants timestamps, not ages."""
    return time.time() - (time.monotonic() - monotonic_seconds)


def leadership_metrics(controller: LeadershipSource) -> Iterator[Metric]:
    mode = GaugeMetricFamily(
        _name("mode"), "1 for the mode this instance is in, 0 for the others", labels=["mode"]
    )
    for candidate in Mode:
        mode.add_metric([candidate.value], 1 if controller.mode is candidate else 0)
    yield mode
    yield GaugeMetricFamily(
        _name("epoch"), "Fencing epoch held while active (0 when not active)", value=controller.epoch
    )
    yield CounterMetricFamily(
        _name("handovers_total"), "Times this instance took over from an earlier leader", value=controller.handovers
    )


def pipeline_metrics(stats: PipelineSource) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        _name("polling"), "1 while a getUpdates loop runs in this instance", value=int(stats.polling)
    )
    if stats.last_ok is not None:
        yield GaugeMetricFamily(
            _name("getupdates_last_success_timestamp_seconds"),
            "Unix time of the last successful getUpdates",
            value=wall_time_of(stats.last_ok),
        )
    counters = (
        ("getupdates_conflicts_total", "409 Conflict answers to getUpdates", stats.conflicts),
        ("updates_fetched_total", "Updates received from Telegram", stats.fetched),
        ("updates_handled_total", "Updates whose handler finished (returned or raised)", stats.handled),
        ("handler_errors_total", "Handlers that raised", stats.handler_errors),
        ("updates_duplicate_total", "Updates skipped because the inbox already had them",
         stats.duplicates),
        ("updates_redelivered_total", "Updates handled again after an earlier attempt",
         stats.redelivered),
        ("updates_set_aside_total", "Poison updates this instance set aside (handler running at "
         "POISON_AFTER deaths)", stats.set_aside),
    )
    for suffix, documentation, value in counters:
        yield CounterMetricFamily(_name(suffix), documentation, value=value)
    yield GaugeMetricFamily(
        _name("inbox_waiting_updates"), "Updates this leader holds that are not yet done",
        value=stats.inbox_waiting,
    )
    errors = CounterMetricFamily(
        _name("getupdates_errors_total"), "Failed getUpdates calls by kind", labels=["kind"]
    )
    for kind, count in sorted(stats.errors.items()):
        errors.add_metric([kind], count)
    yield errors
    durations = stats.handler_seconds
    yield HistogramMetricFamily(
        _name("handler_duration_seconds"), "Time a handler took, from start to finish",
        buckets=[(bucket_bound(bound), count) for bound, count in durations.cumulative()],
        sum_value=durations.total,
    )


def inbox_metrics(depth: tuple[int, float | None]) -> Iterator[Metric]:
    waiting, oldest_age = depth
    yield GaugeMetricFamily(
        _name("inbox_pending_updates"),
        "Rows in the shared inbox not yet done (stored by any replica), read at scrape time",
        value=waiting,
    )
    yield GaugeMetricFamily(
        _name("inbox_oldest_pending_age_seconds"),
        "Age of the oldest row in the shared inbox not yet done (0 when none waits)",
        value=oldest_age or 0.0,
    )


def delivery_metrics(deliveries: DeliverySource) -> Iterator[Metric]:
    outcomes = CounterMetricFamily(
        _name("webhook_deliveries_total"),
        "Webhook deliveries this replica answered, by outcome (accepted: stored, 200; duplicate: "
        "already stored, 200; unauthorized: 401; malformed: 400; unavailable: inbox not writable, 503)",
        labels=["outcome"],
    )
    for outcome, count in (("accepted", deliveries.accepted), ("duplicate", deliveries.duplicates),
                           ("unauthorized", deliveries.unauthorized), ("malformed", deliveries.malformed),
                           ("unavailable", deliveries.unavailable)):
        outcomes.add_metric([outcome], count)
    yield outcomes
    yield GaugeMetricFamily(
        _name("webhook_inbox_writable"), "1 while this replica can store deliveries, 0 while it answers 503",
        value=0 if deliveries.inbox_error else 1,
    )


def telegram_webhook_metrics(info: Mapping[str, Any]) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        _name("telegram_webhook_pending_updates"),
        "getWebhookInfo pending_update_count: updates Telegram holds for us (the leader's last fetch)",
        value=int(info.get("pending_update_count") or 0),
    )
    if info.get("last_error_date"):
        yield GaugeMetricFamily(
            _name("telegram_webhook_last_error_timestamp_seconds"),
            "getWebhookInfo last_error_date: when Telegram last failed to deliver to us",
            value=float(info["last_error_date"]),
        )
        yield InfoMetricFamily(
            _name("telegram_webhook_last_error"), "getWebhookInfo last_error_message",
            value={"message": str(info.get("last_error_message") or "")},
        )


class SolobotCollector:
    """A prometheus_client ``Collector``: reads every source at each scrape, keeps nothing.

    ``inbox_depth`` is the one exception to reading synchronously: it needs the database, so
    :meth:`Metrics.scrape` looks it up (bounded) and sets it for the duration of one render.
    """

    def __init__(
        self,
        *,
        controller: LeadershipSource,
        stats: PipelineSource,
        autoposter: PostsSource | None = None,
        backend: FencingSource | None = None,
        deliveries: DeliverySource | None = None,
        webhook: WebhookInfoSource | None = None,
        sends: SendsSource | None = None,
    ) -> None:
        self.sends = sends
        self.controller = controller
        self.stats = stats
        self.autoposter = autoposter
        self.backend = backend
        self.deliveries = deliveries
        self.webhook = webhook
        self.inbox_depth: tuple[int, float | None] | None = None
        self.set_aside_held: int | None = None

    def collect(self) -> Iterator[Metric]:
        yield from leadership_metrics(self.controller)
        yield from pipeline_metrics(self.stats)
        if self.inbox_depth is not None:
            yield from inbox_metrics(self.inbox_depth)
        if self.set_aside_held is not None:
            yield GaugeMetricFamily(_name("inbox_set_aside_updates"),
                                    "Poison updates set aside in the shared inbox now (python main.py inbox)",
                                    value=self.set_aside_held)
        if self.deliveries is not None:
            yield from delivery_metrics(self.deliveries)
        if self.webhook is not None and self.webhook.info is not None:
            yield from telegram_webhook_metrics(self.webhook.info)
        if self.backend is not None:
            yield CounterMetricFamily(
                _name("fenced_holders_total"), "Hung holders this instance fenced off",
                value=self.backend.fenced_holders,
            )
        if self.sends is not None:
            yield from send_metrics(self.sends)
        if self.autoposter is not None:  # off without CHANNEL_ID: no series rather than a fake 0
            yield CounterMetricFamily(
                _name("posts_sent_total"), "Channel posts this instance published",
                value=self.autoposter.posts_sent,
            )


T = TypeVar("T")


async def _quietly(lookup: Callable[[], Awaitable[T]] | None) -> T | None:
    """*lookup*'s answer, None without one or when it fails: the rest of the scrape stands on its own."""
    if lookup is None:
        return None
    try:
        return await lookup()
    except Exception:  # noqa: BLE001 - a database that does not answer costs only its series
        return None


class Metrics:
    """The ``/metrics`` payload: one private registry holding one :class:`SolobotCollector`."""

    def __init__(
        self,
        *,
        controller: LeadershipSource,
        stats: PipelineSource,
        autoposter: PostsSource | None = None,
        backend: FencingSource | None = None,
        deliveries: DeliverySource | None = None,
        webhook: WebhookInfoSource | None = None,
        inbox_depth: InboxDepth | None = None,
        sends: SendsSource | None = None,
        set_aside: SetAsideCount | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = SolobotCollector(
            controller=controller, stats=stats, autoposter=autoposter, backend=backend,
            deliveries=deliveries, webhook=webhook, sends=sends,
        )
        self.registry.register(self.collector)
        self.inbox_depth = inbox_depth
        self.set_aside = set_aside
        self._scraping = asyncio.Lock()

    def render(self) -> tuple[bytes, str]:
        """``(body, content type)`` for the HTTP response, in Prometheus' text format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def scrape(self) -> tuple[bytes, str]:
        """:meth:`render`, with the shared inbox's depth looked up first (*inbox_depth* is
        bounded: a database that does not answer costs a scrape at most its limit, and only the
        inbox series are missing)."""
        async with self._scraping:
            depth, set_aside = await asyncio.gather(_quietly(self.inbox_depth), _quietly(self.set_aside))
            self.collector.inbox_depth, self.collector.set_aside_held = depth, set_aside
            try:
                return self.render()
            finally:
                self.collector.inbox_depth = None
                self.collector.set_aside_held = None
