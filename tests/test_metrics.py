"""/metrics: parsed with prometheus_client's own parser; counters are counters; memory stays flat.

The series are rendered from the status snapshot (utils/ops/status_report.py), here taken from
stand-ins of the daemon's parts (tests/status_fakes.py)."""

from __future__ import annotations

import asyncio
import tracemalloc
import urllib.request
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import free_port
from tests.status_fakes import (
    LOOKUP_TIMEOUT,
    FakeAutoposter,
    FakeBackend,
    FakeController,
    FakeInbox,
    FakeReceiver,
    FakeWebhookRole,
    busy_stats,
    make_reporter,
)
from utils.locking.controller import Mode
from utils.ops.health import HealthServer
from utils.ops.metrics import Metrics
from utils.ops.status_report import StatusReporter
from utils.updates.stats import HANDLER_BUCKETS, UpdateStats
from utils.updates.webhook import ReceiverStats

Families = dict[str, tuple[str, list[Sample]]]


async def parse(reporter: StatusReporter) -> Families:
    body, content_type = await Metrics(reporter.snapshot).scrape()
    assert content_type.startswith("text/plain; version=")
    return {f.name: (f.type, f.samples) for f in text_string_to_metric_families(body.decode())}


def value(families: Families, sample_name: str, **labels: str) -> float:
    family = sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    for sample in families[family][1]:
        if sample.name == sample_name and sample.labels == labels:
            return sample.value
    raise KeyError(f"{sample_name}{labels}")


async def test_types_names_and_values() -> None:
    controller = FakeController(Mode.ACTIVE, epoch=7, handovers=2)
    reporter = make_reporter(controller=controller, stats=busy_stats(), autoposter=FakeAutoposter(4),
                             backend=FakeBackend(fenced_holders=1), inbox=FakeInbox((5, 2.5), 1))
    families = await parse(reporter)
    types = {name: kind for name, (kind, _) in families.items()}
    assert types == {
        "solobot_mode": "gauge",
        "solobot_epoch": "gauge",
        "solobot_handovers": "counter",
        "solobot_polling": "gauge",
        "solobot_getupdates_conflicts": "counter",
        "solobot_updates_fetched": "counter",
        "solobot_updates_handled": "counter",
        "solobot_handler_errors": "counter",
        "solobot_updates_duplicate": "counter",
        "solobot_updates_redelivered": "counter",
        "solobot_updates_set_aside": "counter",
        "solobot_inbox_waiting_updates": "gauge",
        "solobot_getupdates_errors": "counter",
        "solobot_handler_duration_seconds": "histogram",
        "solobot_inbox_pending_updates": "gauge",
        "solobot_inbox_oldest_pending_age_seconds": "gauge",
        "solobot_inbox_set_aside_updates": "gauge",
        "solobot_fenced_holders": "counter",
        "solobot_telegram_rate_limited": "counter",
        "solobot_sends_waiting": "gauge",
        "solobot_send_wait_seconds": "histogram",
        "solobot_posts_sent": "counter",
    }
    for name, (kind, samples) in families.items():
        assert name.startswith("solobot_")
        if kind == "counter":
            assert samples and all(s.name == f"{name}_total" for s in samples), name
    assert [value(families, "solobot_mode", mode=m.value) for m in Mode] == [0, 1, 0]
    assert value(families, "solobot_epoch") == 7
    assert value(families, "solobot_handovers_total") == 2
    assert value(families, "solobot_getupdates_conflicts_total") == 2
    assert value(families, "solobot_updates_handled_total") == 9
    assert value(families, "solobot_getupdates_errors_total", kind="network") == 2
    assert value(families, "solobot_getupdates_errors_total", kind="conflict") == 1
    assert value(families, "solobot_fenced_holders_total") == 1
    assert value(families, "solobot_posts_sent_total") == 4
    assert value(families, "solobot_inbox_pending_updates") == 5
    assert value(families, "solobot_inbox_set_aside_updates") == 1
    histogram = families["solobot_handler_duration_seconds"][1]
    buckets = {s.labels["le"]: s.value for s in histogram if s.name.endswith("_bucket")}
    assert len(buckets) == len(HANDLER_BUCKETS) + 1
    assert buckets["0.01"] == 1 and buckets["0.25"] == 3 and buckets["5.0"] == 4 and buckets["+Inf"] == 5
    assert value(families, "solobot_handler_duration_seconds_count") == 5
    assert abs(value(families, "solobot_handler_duration_seconds_sum") - 103.405) < 1e-9


async def test_optional_series_absent_and_nothing_consumed_by_a_scrape() -> None:
    reporter = make_reporter()
    families = await parse(reporter)
    assert "solobot_posts_sent" not in families, "no autoposter: no series rather than a fake 0"
    assert "solobot_webhook_deliveries" not in families, "polling mode"
    assert "solobot_getupdates_last_success_timestamp_seconds" not in families, "never succeeded"
    assert value(families, "solobot_mode", mode="passive") == 1
    assert families["solobot_getupdates_errors"][1] == []
    assert await parse(reporter) == families, "a scrape changes nothing"


async def test_reads_sources_at_scrape_time() -> None:
    controller = FakeController()
    stats = UpdateStats()
    reporter = make_reporter(controller=controller, stats=stats)
    controller.mode, controller.handovers = Mode.ACTIVE, 1
    stats.handled += 1
    stats.handler_seconds.observe(0.3)
    families = await parse(reporter)
    assert value(families, "solobot_mode", mode="active") == 1
    assert value(families, "solobot_handovers_total") == 1
    assert value(families, "solobot_updates_handled_total") == 1
    assert value(families, "solobot_handler_duration_seconds_count") == 1


def structure_size(reporter: StatusReporter, stats: UpdateStats) -> tuple[Any, ...]:
    return len(stats.handler_seconds.counts), len(stats.errors), len(vars(stats)), len(vars(reporter))


async def test_memory_flat_after_10000_updates_without_a_scrape() -> None:
    stats = UpdateStats()
    reporter = make_reporter(stats=stats, autoposter=FakeAutoposter())

    def one_update(i: int) -> None:  # what the pipeline does per update
        stats.fetched += 1
        stats.handled += 1
        stats.handler_seconds.observe((i % 400) / 100)
        if i % 10 == 0:
            stats.count_error("network")

    one_update(0)
    before = structure_size(reporter, stats)
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        for i in range(1, 10_000):
            one_update(i)
        grown = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert structure_size(reporter, stats) == before
    assert grown < 4096, f"{grown} bytes retained by 10000 updates"
    families = await parse(reporter)
    assert value(families, "solobot_handler_duration_seconds_count") == 10_000
    assert value(families, "solobot_updates_handled_total") == 10_000


async def test_health_server_serves_parseable_metrics() -> None:
    reporter = make_reporter(controller=FakeController(Mode.ACTIVE, 3, 1), stats=busy_stats())
    port = free_port()
    server = HealthServer("127.0.0.1", port, status=reporter.health, ready=reporter.ready,
                          metrics=Metrics(reporter.snapshot).scrape)
    await server.start()
    try:
        def scrape() -> tuple[str, str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.headers["Content-Type"], r.read().decode()

        content_type, text = await asyncio.to_thread(scrape)
    finally:
        await server.stop()
    assert content_type.startswith("text/plain")
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"solobot_mode", "solobot_handovers", "solobot_handler_duration_seconds"} <= names
    assert "solobot_handovers_total 1.0" in text


async def test_webhook_deliveries_inbox_depth_and_telegrams_view() -> None:
    receiver = FakeReceiver(ReceiverStats(accepted=40, duplicates=2, unauthorized=3, malformed=1, unavailable=5))
    role = FakeWebhookRole()
    reporter = make_reporter(controller=FakeController(Mode.ACTIVE, 2, 1), receiver=receiver, webhook=role,
                             inbox=FakeInbox((12, 3.5), 2))
    families = await parse(reporter)
    assert value(families, "solobot_inbox_set_aside_updates") == 2
    for outcome, count in (("accepted", 40), ("duplicate", 2), ("unauthorized", 3), ("malformed", 1),
                           ("unavailable", 5)):
        assert value(families, "solobot_webhook_deliveries_total", outcome=outcome) == count
    assert families["solobot_webhook_deliveries"][0] == "counter"
    assert value(families, "solobot_webhook_inbox_writable") == 1
    assert value(families, "solobot_inbox_pending_updates") == 12
    assert value(families, "solobot_inbox_oldest_pending_age_seconds") == 3.5
    assert value(families, "solobot_polling") == 0, "webhook mode: no getUpdates loop"
    assert "solobot_telegram_webhook_pending_updates" not in families, "no getWebhookInfo yet"

    receiver.stats.inbox_error = "OperationalError: connection refused"
    role.info = {"pending_update_count": 7, "last_error_message": "Connection timed out",
                 "last_error_date": 1_700_000_000.0}
    families = await parse(reporter)
    assert value(families, "solobot_webhook_inbox_writable") == 0
    assert value(families, "solobot_telegram_webhook_pending_updates") == 7
    assert value(families, "solobot_telegram_webhook_last_error_timestamp_seconds") == 1_700_000_000.0
    assert value(families, "solobot_telegram_webhook_last_error_info", message="Connection timed out") == 1


async def test_a_silent_database_costs_a_scrape_only_the_inbox_series() -> None:
    reporter = make_reporter(inbox=FakeInbox(None, None))
    loop = asyncio.get_running_loop()
    started = loop.time()
    families = await parse(reporter)
    took = loop.time() - started
    assert "solobot_inbox_pending_updates" not in families and "solobot_inbox_set_aside_updates" not in families
    assert value(families, "solobot_mode", mode="passive") == 1
    assert LOOKUP_TIMEOUT <= took < LOOKUP_TIMEOUT + 2.0, took


async def test_send_limit_metrics_are_a_counter_a_gauge_and_a_histogram() -> None:
    from utils.sending.flood import SendLimits, Target
    from utils.sending.limiter import FloodLimiter

    sends = FloodLimiter(SendLimits())
    ticket = sends.plan.submit(Target("1", group=False), 0.0)
    sends.plan.grant(0.0)
    sends.plan.retry_after(ticket, 2, 0.1)  # a 429: the send waits again
    sends.plan.submit(Target("2", group=False), 0.2)
    sends.waited.observe(0.3)
    families = await parse(make_reporter(sends=sends))
    assert families["solobot_telegram_rate_limited"][0] == "counter"
    assert value(families, "solobot_telegram_rate_limited_total") == 1
    assert families["solobot_sends_waiting"][0] == "gauge"
    assert value(families, "solobot_sends_waiting") == 2
    assert families["solobot_send_wait_seconds"][0] == "histogram"
    assert value(families, "solobot_send_wait_seconds_count") == 1
    buckets = {x.labels["le"]: x.value for x in families["solobot_send_wait_seconds"][1]
               if x.name.endswith("_bucket")}
    assert (buckets["0.25"], buckets["0.5"], buckets["+Inf"]) == (0, 1, 1)
