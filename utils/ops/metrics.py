"""Prometheus metrics for ``/metrics``, rendered from one status snapshot at scrape time.

Why no ``Counter``/``Histogram`` objects of our own: the facts already live in their owners (the
leadership controller counts handovers, the pipeline's :class:`UpdateStats` counts updates and
keeps a fixed-bucket histogram, the autoposter counts posts). Copying them into a second set of
objects made two sources per fact and, for handler timings, a list that grew until a scrape
emptied it (forever with ``HEALTH_PORT=0``). Here nothing is stored: every scrape takes a
:class:`~utils.ops.status_snapshot.StatusSnapshot` (the one /health shows) and renders it, so
memory is flat however long nobody scrapes, and /metrics and /health cannot disagree.

The update counters are not listed here: their names, help texts and kinds are declared once in
:mod:`utils.updates.stats` (:data:`~utils.updates.stats.COUNTS`). Rendering builds the text
directly from the snapshot (no registry: nothing is registered, so two apps in one test process
never collide).

Naming follows https://prometheus.io/docs/practices/naming/: a ``solobot_`` prefix, base units
(seconds), counters end in ``_total``, one label per dimension (``mode``, ``kind``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from utils.locking.controller import Mode
from utils.ops.status_snapshot import (
    Histogram,
    InboxDepth,
    PollingFacts,
    SendFacts,
    StatusSnapshot,
    Term,
    UpdateCounts,
    WebhookFacts,
)

PREFIX = "solobot"
#: The webhook receiver's counters (``ReceiverStats`` fields) as ``outcome`` labels, where they differ.
OUTCOME_LABELS = {"duplicates": "duplicate"}


def _name(suffix: str) -> str:
    return f"{PREFIX}_{suffix}"


def bucket_bound(seconds: float) -> str:
    """A histogram's ``le`` label: ``0.25``, ``5.0``, ``+Inf`` (the text format's spelling)."""
    return "+Inf" if math.isinf(seconds) else repr(float(seconds))


def histogram(suffix: str, documentation: str, read: Histogram) -> Metric:
    return HistogramMetricFamily(
        _name(suffix), documentation,
        buckets=[(bucket_bound(bound), count) for bound, count in read.buckets], sum_value=read.total,
    )


def leadership_metrics(term: Term) -> Iterator[Metric]:
    mode = GaugeMetricFamily(
        _name("mode"), "1 for the mode this instance is in, 0 for the others", labels=["mode"]
    )
    for candidate in Mode:
        mode.add_metric([candidate.value], 1 if term.mode is candidate else 0)
    yield mode
    yield GaugeMetricFamily(
        _name("epoch"), "Fencing epoch held while active (0 when not active)", value=term.epoch
    )
    yield CounterMetricFamily(
        _name("handovers_total"), "Times this instance took over from an earlier leader", value=term.handovers
    )


def update_metrics(updates: UpdateCounts) -> Iterator[Metric]:
    """The declared counts (:data:`utils.updates.stats.COUNTS`) and the handler histogram."""
    for count, value in updates.counts:
        family = CounterMetricFamily if count.kind == "counter" else GaugeMetricFamily
        yield family(_name(count.metric), count.help, value=value)
    yield histogram("handler_duration_seconds", "Time a handler took, from start to finish",
                    updates.handler_seconds)


def polling_metrics(polling: PollingFacts | None) -> Iterator[Metric]:
    """getUpdates' series; in webhook mode (*polling* None) the loop does not run and nothing failed."""
    yield GaugeMetricFamily(
        _name("polling"), "1 while a getUpdates loop runs in this instance",
        value=int(polling is not None and polling.active),
    )
    if polling is not None and polling.last_ok_at is not None:
        yield GaugeMetricFamily(
            _name("getupdates_last_success_timestamp_seconds"), "Unix time of the last successful getUpdates",
            value=polling.last_ok_at,
        )
    errors = CounterMetricFamily(
        _name("getupdates_errors_total"), "Failed getUpdates calls by kind", labels=["kind"]
    )
    for kind, count in sorted(polling.errors if polling is not None else ()):
        errors.add_metric([kind], count)
    yield errors


def inbox_metrics(depth: InboxDepth) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        _name("inbox_pending_updates"),
        "Rows in the shared inbox not yet done (stored by any replica), read at scrape time",
        value=depth.waiting,
    )
    yield GaugeMetricFamily(
        _name("inbox_oldest_pending_age_seconds"),
        "Age of the oldest row in the shared inbox not yet done (0 when none waits)",
        value=depth.oldest_age_s or 0.0,
    )


def delivery_metrics(webhook: WebhookFacts) -> Iterator[Metric]:
    outcomes = CounterMetricFamily(
        _name("webhook_deliveries_total"),
        "Webhook deliveries this replica answered, by outcome (accepted: stored, 200; duplicate: "
        "already stored, 200; unauthorized: 401; malformed: 400; unavailable: inbox not writable, 503)",
        labels=["outcome"],
    )
    for field, count in dataclasses.asdict(webhook.received).items():
        if isinstance(count, int):  # the counters; inbox_error is the writable gauge below
            outcomes.add_metric([OUTCOME_LABELS.get(field, field)], count)
    yield outcomes
    yield GaugeMetricFamily(
        _name("webhook_inbox_writable"), "1 while this replica can store deliveries, 0 while it answers 503",
        value=0 if webhook.received.inbox_error else 1,
    )
    if webhook.info is not None:
        yield from telegram_webhook_metrics(webhook.info)


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


def send_metrics(sends: SendFacts) -> Iterator[Metric]:
    yield CounterMetricFamily(
        _name("telegram_rate_limited_total"), "429 Too Many Requests answers to sends into a chat",
        value=sends.rate_limited,
    )
    yield GaugeMetricFamily(
        _name("sends_waiting"), "Sends into a chat waiting for their slot under the flood limits now",
        value=sends.waiting,
    )
    yield histogram("send_wait_seconds", "Time a send into a chat waited for its slot (429 waits included)",
                    sends.waited)


def families(snapshot: StatusSnapshot) -> Iterator[Metric]:
    """Every series of *snapshot*. The shared inbox's are left out when its lookup did not answer
    (the rest of the scrape stands on its own); the autoposter's without one (off without
    CHANNEL_ID: no series rather than a fake 0)."""
    yield from leadership_metrics(snapshot.term)
    delivery = snapshot.delivery
    yield from polling_metrics(delivery if isinstance(delivery, PollingFacts) else None)
    yield from update_metrics(snapshot.updates)
    if isinstance(snapshot.inbox.depth, InboxDepth):
        yield from inbox_metrics(snapshot.inbox.depth)
    if isinstance(snapshot.inbox.set_aside, int):
        yield GaugeMetricFamily(_name("inbox_set_aside_updates"),
                                "Poison updates set aside in the shared inbox now (python main.py inbox)",
                                value=snapshot.inbox.set_aside)
    if isinstance(delivery, WebhookFacts):
        yield from delivery_metrics(delivery)
    yield CounterMetricFamily(
        _name("fenced_holders_total"), "Hung holders this instance fenced off", value=snapshot.lock.fenced_holders,
    )
    yield from send_metrics(snapshot.sends)
    if snapshot.autoposter is not None:
        yield CounterMetricFamily(
            _name("posts_sent_total"), "Channel posts this instance published", value=snapshot.autoposter.posts_sent,
        )


class _Families:
    """What ``generate_latest`` reads (a prometheus_client ``Collector``): the series of one snapshot."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def render(snapshot: StatusSnapshot) -> tuple[bytes, str]:
    """``(body, content type)`` for the HTTP response, in Prometheus' text format."""
    return generate_latest(_Families(list(families(snapshot)))), CONTENT_TYPE_LATEST


class Metrics:
    """The ``/metrics`` payload: a fresh snapshot, rendered (its lookups bounded: a database that
    does not answer costs a scrape at most their limit, and only the inbox series are missing)."""

    def __init__(self, snapshot: Callable[[], Awaitable[StatusSnapshot]]) -> None:
        self._snapshot = snapshot

    async def scrape(self) -> tuple[bytes, str]:
        return render(await self._snapshot())
