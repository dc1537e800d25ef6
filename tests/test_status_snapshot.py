"""The typed status snapshot, in-process: /health's keys (the operators' contract, docs/operations.md),
what fits the mode (polling facts or webhook facts), lookups that fail or hang, /ready's answers,
counters declared once, and the /status command reading the same snapshot."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiogram.types import Message

import bot
from tests.status_fakes import (
    HOLDER,
    LOOKUP_TIMEOUT,
    FakeAutoposter,
    FakeController,
    FakeInbox,
    FakePolling,
    FakeReceiver,
    FakeWebhookRole,
    busy_stats,
    make_reporter,
)
from utils.locking.controller import Mode
from utils.ops.metrics import render
from utils.ops.status_snapshot import (
    AUTOPOSTER_OFF,
    READY_MARGIN,
    InboxDepth,
    PollingFacts,
    Unknown,
    WebhookFacts,
    health_json,
    holder_json,
)
from utils.updates.stats import COUNTS, Count, UpdateStats
from utils.updates.webhook import ReceiverStats

#: /health's keys as operators read them (docs/operations.md); polling mode.
TOP_KEYS = {"status", "mode", "instance_id", "pid", "host", "uptime_s", "mode_since", "epoch", "handovers",
            "passive_reason", "lock", "polling", "updates", "autoposter", "sends"}
LOCK_KEYS = {"backend", "holder", "fenced_holders"}
HOLDER_KEYS = {"instance_id", "host", "pid", "epoch", "since", "heartbeat_age_s"}
POLLING_KEYS = {"active", "seconds_since_ok", "conflicts", "errors"}
UPDATES_KEYS = {"fetched", "handled", "handler_errors", "duplicates_skipped", "redelivered", "waiting", "delivery",
                "inbox_waiting", "inbox_oldest_age_s", "set_aside", "set_aside_total"}
WEBHOOK_KEYS = {"accepted", "duplicates", "unauthorized", "malformed", "unavailable", "inbox_error", "info"}


def webhook_reporter(**kwargs: Any) -> Any:
    receiver = FakeReceiver(ReceiverStats(accepted=40, duplicates=2, unauthorized=3, malformed=1, unavailable=5))
    role = FakeWebhookRole({"url": "https://example.com/***", "pending_update_count": 7,
                            "last_error_message": "Connection timed out", "last_error_date": 1_700_000_000.0,
                            "max_connections": 40})
    return make_reporter(receiver=receiver, webhook=role, **kwargs)


async def test_polling_mode_health_keys_unchanged() -> None:
    reporter = make_reporter(controller=FakeController(Mode.ACTIVE, epoch=7, holder_info=HOLDER), stats=busy_stats(),
                             inbox=FakeInbox((5, 2.5), 1))
    body = await reporter.health()
    json.dumps(body)  # serialisable as it is
    assert set(body) == TOP_KEYS
    assert set(body["lock"]) == LOCK_KEYS and set(body["lock"]["holder"]) == HOLDER_KEYS
    assert set(body["polling"]) == POLLING_KEYS
    assert set(body["updates"]) == UPDATES_KEYS
    assert body["mode"] == "active" and body["epoch"] == 7 and body["passive_reason"] is None
    assert body["polling"] == {"active": True, "seconds_since_ok": None, "conflicts": 2,
                               "errors": {"conflict": 1, "network": 2}}
    assert body["updates"] | {"delivery": "polling"} == {
        "fetched": 10, "handled": 9, "handler_errors": 1, "duplicates_skipped": 3, "redelivered": 1, "waiting": 1,
        "delivery": "polling", "inbox_waiting": 5, "inbox_oldest_age_s": 2.5, "set_aside": 1, "set_aside_total": 0}
    assert body["autoposter"] == {"state": AUTOPOSTER_OFF}
    assert body["sends"] == {"waiting": 0, "rate_limited": 0}


async def test_webhook_mode_shows_webhook_facts_not_pollings() -> None:
    snapshot = await webhook_reporter().snapshot()
    assert isinstance(snapshot.delivery, WebhookFacts)
    body = health_json(snapshot)
    assert set(body) == TOP_KEYS - {"polling"}, "no getUpdates loop in webhook mode: no polling section"
    assert set(body["updates"]) == UPDATES_KEYS | {"webhook"}
    assert body["updates"]["delivery"] == "webhook"
    webhook = body["updates"]["webhook"]
    assert set(webhook) == WEBHOOK_KEYS
    assert (webhook["accepted"], webhook["unauthorized"], webhook["inbox_error"]) == (40, 3, None)
    assert webhook["info"]["pending_update_count"] == 7


async def test_snapshot_is_a_copy_not_a_view() -> None:
    reporter = webhook_reporter()
    snapshot = await reporter.snapshot()
    assert reporter.receiver is not None
    reporter.receiver.stats.accepted += 1
    assert isinstance(snapshot.delivery, WebhookFacts) and snapshot.delivery.received.accepted == 40


async def test_lookups_that_fail_or_hang_say_why_within_the_bound() -> None:
    reporter = make_reporter(inbox=FakeInbox(OSError("refused"), None), autoposter=FakeAutoposter(paused=None))
    started = time.monotonic()
    snapshot = await reporter.snapshot()
    took = time.monotonic() - started
    assert took < LOOKUP_TIMEOUT + 2.0, took
    assert snapshot.inbox.depth == Unknown("OSError")
    assert snapshot.inbox.set_aside == Unknown("TimeoutError")
    body = health_json(snapshot)
    assert body["updates"]["inbox_error"] == "OSError"
    assert body["updates"]["inbox_waiting"] is None and body["updates"]["inbox_oldest_age_s"] is None
    assert body["updates"]["set_aside"] == "TimeoutError"
    assert body["autoposter"]["state"] == "running (pause flag unknown: TimeoutError)"
    families = render(snapshot)[0].decode()
    assert "solobot_inbox_pending_updates" not in families and "solobot_mode{" in families


async def test_autoposter_paused_and_answering() -> None:
    assert (await make_reporter(autoposter=FakeAutoposter(paused=True)).health())["autoposter"] == {"state": "paused"}
    snapshot = await make_reporter(autoposter=FakeAutoposter(3, "standby")).snapshot()
    assert snapshot.autoposter is not None and snapshot.autoposter.describe() == "standby"
    assert snapshot.inbox.depth == InboxDepth(0, None)


def test_ready_in_polling_mode() -> None:
    stats = UpdateStats()
    controller = FakeController(passive_reason="lock held by pid 1")
    polling = FakePolling()
    reporter = make_reporter(controller=controller, stats=stats, polling=polling, polling_timeout=2)
    assert reporter.ready() == (False, "passive: lock held by pid 1")
    controller.mode = Mode.ACTIVE
    assert reporter.ready() == (False, "active but not polling")
    stats.polling = True
    assert reporter.ready() == (False, "active, but no getUpdates has succeeded yet")
    stats.last_ok = time.monotonic()
    assert reporter.ready() == (True, "active and polling")
    stats.last_ok = time.monotonic() - (2 + READY_MARGIN + 3)
    polling.outage.failure(time.monotonic(), "ConnectError")
    polling.outage.failure(time.monotonic(), "ConnectError")
    ok, why = reporter.ready()
    assert not ok and why.startswith("active, but no successful getUpdates for 10 s") and "(2 failed attempts)" in why


def test_ready_in_webhook_mode_is_the_receivers_answer_even_passive() -> None:
    reporter = webhook_reporter()
    assert reporter.ready() == (True, "accepting webhook deliveries")
    assert reporter.receiver is not None
    reporter.receiver.stats.inbox_error = "OperationalError"
    assert reporter.ready() == (False, "webhook: the inbox cannot be written (OperationalError)")


async def test_every_declared_count_reaches_health_and_metrics() -> None:
    """Adding a counter is one line in UpdateStats: /health and /metrics follow from COUNTS."""
    assert len({c.name for c in COUNTS}) == len(COUNTS) == 8
    stats = UpdateStats()
    for i, count in enumerate(COUNTS):
        setattr(stats, count.name, 100 + i)
    snapshot = await make_reporter(stats=stats).snapshot()
    body = health_json(snapshot)
    text = render(snapshot)[0].decode()
    for i, count in enumerate(COUNTS):
        assert body[count.section][count.health] == 100 + i, count
        assert snapshot.updates[count] == 100 + i
        name = f"solobot_{count.metric}"
        assert f"# TYPE {name} {count.kind}" in text, name
        assert f"{name} {100 + i}.0" in text, name


def test_a_count_is_an_int_on_the_instance_and_its_declaration_on_the_class() -> None:
    stats = UpdateStats(fetched=3)
    stats.fetched += 1
    assert stats.fetched == 4 and UpdateStats().fetched == 0, "per instance, from 0"
    assert isinstance(UpdateStats.fetched, Count) and UpdateStats.fetched.metric == "updates_fetched_total"
    with pytest.raises(TypeError, match="no count 'fetchd'"):
        UpdateStats(fetchd=1)


async def test_main_py_status_prints_the_holder_as_health_does() -> None:
    snapshot = await make_reporter(controller=FakeController(holder_info=HOLDER)).snapshot()
    assert health_json(snapshot)["lock"]["holder"] == holder_json(HOLDER)
    assert holder_json(None) is None


# -- the /status command ---------------------------------------------------------------------


class Chat:
    def __init__(self) -> None:
        self.answers: list[str] = []

    async def answer(self, text: str) -> None:
        self.answers.append(text)


async def ask_status(reporter: Any) -> str:
    chat = Chat()
    message = SimpleNamespace(from_user=SimpleNamespace(id=1), answer=chat.answer)
    await bot.cmd_status(cast(Message, message), frozenset({1}), reporter.snapshot)
    [answer] = chat.answers
    return answer


async def test_status_command_in_webhook_mode_shows_webhook_facts() -> None:
    answer = await ask_status(webhook_reporter(controller=FakeController(Mode.ACTIVE, 3, holder_info=HOLDER)))
    assert "polling" not in answer and "None" not in answer, answer
    assert "webhook: 40 accepted, 2 duplicates, 3 unauthorized, 1 malformed, 5 unavailable" in answer
    assert "Telegram: 7 pending, last error: Connection timed out" in answer
    assert "mode: active (epoch 3)" in answer
    assert "held by instance abc123 (pid 4242 on box)" in answer


async def test_status_command_in_polling_mode_shows_polling_facts() -> None:
    stats = busy_stats()
    stats.last_ok = time.monotonic() - 12
    answer = await ask_status(make_reporter(stats=stats))
    assert "webhook" not in answer
    assert "polling: last ok 12 s ago, conflicts 2" in answer
    assert "lock: file, no holder known" in answer
    assert f"autoposter: {AUTOPOSTER_OFF}" in answer


async def test_status_command_refuses_non_admins_without_a_snapshot() -> None:
    chat = Chat()
    message = SimpleNamespace(from_user=SimpleNamespace(id=2), answer=chat.answer)

    async def never() -> Any:
        raise AssertionError("no snapshot for a non-admin")

    await bot.cmd_status(cast(Message, message), frozenset({1}), never)
    assert chat.answers == ["Sorry, /status is for admins only."]


def test_polling_facts_count_the_failed_attempts_of_the_outage_going_on() -> None:
    polling = FakePolling()
    reporter = make_reporter(stats=busy_stats(), polling=polling)
    delivery = reporter.delivery()
    assert isinstance(delivery, PollingFacts) and delivery.failed_attempts is None
    polling.outage.failure(time.monotonic(), "ConnectError")
    delivery = reporter.delivery()
    assert isinstance(delivery, PollingFacts) and delivery.failed_attempts == 1
    assert delivery.errors == (("conflict", 1), ("network", 2))
