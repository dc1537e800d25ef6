"""The alert rules in a real Prometheus (Debian's) scraping real replicas.

The "no leader" alert stays quiet while one replica leads (a passive replica is no alarm: leaders
are counted across the job), goes pending and fires once the last instance is killed, and
resolves when a new replica leads. The shipped rule waits 30 s (``for: 30s``); here Prometheus
scrapes and evaluates every second and the rule's ``for`` is cut to :data:`TEST_FOR` seconds, the
expression kept exactly as shipped (checked against what Prometheus loaded). The bound is then
``for`` + one scrape (to see the death) + one evaluation, as the shipped rule's is 30 s + those.
The same run checks that every metric the rules and the dashboard name was exported by a running
instance (a polling leader, a standby, a webhook leader).
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.fake_bot_api import FakeBotAPI
from tests.conftest import START_WAIT, BotProcess, free_port, wait_until
from tests.prometheus import (
    DASHBOARD,
    RULES,
    Prometheus,
    as_promql,
    dashboard_targets,
    metric_names,
    rule_metric_names,
)

Spawn = Callable[..., BotProcess]
ALERT = "SolobotNoLeader"
#: Scrape and evaluation interval of the test's Prometheus, in seconds.
INTERVAL = 0.5
#: The rule's ``for`` in this test, in seconds (30 shipped; tests/test_alert_rules.py checks that).
TEST_FOR = 3
#: Prometheus' loops and our polling of its API on a loaded 2-core machine: a scrape or an
#: evaluation may run this late.
LATE = 3.0
#: How long a Prometheus API state may take to appear when nothing bounds it more tightly.
API_WAIT = 30.0
#: How far in the past a query looks to see only scrapes that finished (a scrape's samples carry
#: its start time and land up to its timeout, one interval, later).
SETTLED = 2 * INTERVAL


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[int]], Prometheus]]:
    started: list[Prometheus] = []

    def start(ports: list[int]) -> Prometheus:
        server = Prometheus(tmp_path, [f"127.0.0.1:{p}" for p in ports], rules_for_the_test(), interval=INTERVAL)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def rules_for_the_test() -> dict[str, Any]:
    """The shipped rules, the "no leader" one waiting :data:`TEST_FOR` seconds instead of 30."""
    rules: dict[str, Any] = yaml.safe_load(RULES.read_text())
    (rule,) = [r for group in rules["groups"] for r in group["rules"] if r.get("alert") == ALERT]
    rule["for"] = f"{TEST_FOR}s"
    return rules


def shipped_expression() -> str:
    (rule,) = [r for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"]
               if r.get("alert") == ALERT]
    return str(rule["expr"])


def squeezed(expr: str) -> str:
    return re.sub(r"\s+", "", expr)


def unix_time(rfc3339: str) -> float:
    """Prometheus' timestamps (nanoseconds, ``Z``) as Unix time."""
    trimmed = re.sub(r"(\.\d{6})\d+", r"\1", rfc3339).replace("Z", "+00:00")
    return datetime.fromisoformat(trimmed).timestamp()


def states(prom: Prometheus) -> list[str]:
    return [a["state"] for a in prom.alerts(ALERT)]


def quiet_while(prom: Prometheus, scraped: str, what: str) -> None:
    """At an instant where *scraped* holds (every target's scrape as expected), the shipped
    expression selects nothing: no alert, not even pending. Asked at one instant a little in the
    past (settled: a scrape's samples carry its start time), so that a scrape that fails now and
    then on a loaded machine (the rule counts it as "not active": ``for`` is what absorbs it)
    cannot make the two answers disagree."""
    def settled_instant() -> float | None:
        at = time.time() - SETTLED
        return at if prom.query(scraped, at=at) else None

    at = wait_until(settled_instant, API_WAIT, what, 0.05)
    assert prom.query(shipped_expression(), at=at) == [], f"{ALERT}'s expression selects something: {what}"
    assert "firing" not in states(prom)


def exported_names(prom: Prometheus, since: float) -> set[str]:
    """Every solobot sample name Prometheus scraped from the replicas since *since*."""
    names = prom.api("label/__name__/values", **{"match[]": '{__name__=~"solobot_.+"}', "start": f"{since:.3f}"})
    return set(names)


def test_no_leader_alert_fires_when_the_last_instance_dies_and_resolves(
        fake: FakeBotAPI, spawn: Spawn, prometheus: Callable[[list[int]], Prometheus]) -> None:
    t0 = time.time()
    ports = [free_port(), free_port()]
    # One 429 on the first getUpdates: the errors-by-kind counter the dashboard's 429s panel reads
    # has a sample only once an error happened.
    fake.set_flood("getUpdates", 1, 1)
    replicas = [spawn(name, HEALTH_PORT=str(port)) for name, port in zip("ab", ports, strict=True)]
    prom = prometheus(ports)
    (loaded,) = [r for r in prom.rules() if r["name"] == ALERT]
    assert squeezed(loaded["query"]) == squeezed(shipped_expression()), "the shipped expression is tested"
    assert loaded["duration"] == TEST_FOR and loaded["health"] != "err", loaded

    def roles() -> tuple[BotProcess, BotProcess] | None:
        """(leader, standby) once one replica leads and the other waits as its standby."""
        modes = [r.mode() for r in replicas]
        if sorted(str(m) for m in modes) != ["active", "passive"]:
            return None
        return (replicas[0], replicas[1]) if modes[0] == "active" else (replicas[1], replicas[0])

    leader, standby = wait_until(roles, START_WAIT, "one replica active, the other its standby")

    # One leader, one standby, both scraped: no alert (a passive replica alone would be one).
    quiet_while(prom, 'sum(up{job="solobot"}) == 2 and sum(solobot_mode{mode="active"}) == 1',
                "both replicas scraped, one active")

    # The standby dies: the leader is still there, still no alert.
    standby.signal(signal.SIGKILL)
    standby.wait_exit()
    quiet_while(prom, f'up{{instance="127.0.0.1:{standby.port}"}} == 0 and on() '
                      f'up{{instance="127.0.0.1:{leader.port}"}} == 1', "the standby down, the leader scraped")

    # The leader dies with no standby left: pending within a scrape and an evaluation, firing
    # after `for` more.
    t_kill = time.time()
    leader.signal(signal.SIGKILL)
    leader.wait_exit()
    alert = wait_until(lambda: next(iter(prom.alerts(ALERT)), None), API_WAIT, f"{ALERT} pending", 0.05)
    t_firing = wait_until(lambda: "firing" in states(prom) and time.time(), TEST_FOR + API_WAIT,
                          f"{ALERT} firing", 0.05)
    active_at = unix_time(alert["activeAt"])
    assert alert["state"] == "pending", "pending before firing"
    assert active_at - t_kill <= 2 * INTERVAL + LATE, f"pending {active_at - t_kill:.1f} s after the kill"
    assert t_firing - t_kill <= TEST_FOR + 2 * INTERVAL + LATE, f"firing {t_firing - t_kill:.1f} s after the kill"
    assert t_firing - active_at >= TEST_FOR - INTERVAL, "fired before `for` had passed"
    assert alert["labels"] == {"alertname": ALERT, "job": "solobot", "severity": "critical"}
    assert "docs/operations.md#solobotnoleader" in alert["annotations"]["description"]

    # A new replica (webhook mode this time: a deploy that switches modes) leads: resolved.
    port = leader.port
    c = spawn("c", HEALTH_PORT=str(port), BOT_MODE="webhook", WEBHOOK_URL=f"http://127.0.0.1:{port}/tg/hook")
    c.wait_mode("active")
    t_active = time.time()
    t_resolved = wait_until(lambda: not states(prom) and time.time(), API_WAIT, f"{ALERT} resolved", 0.05)
    assert t_resolved - t_active <= 2 * INTERVAL + LATE, f"resolved {t_resolved - t_active:.1f} s after c leads"
    others = prom.query(f'ALERTS{{alertstate="firing", alertname!="{ALERT}"}}[{int(time.time() - t0) + 60}s]')
    assert others == [], f"other alerts fired: {others}"

    # Every metric the rules and the dashboard name, scraped from a running instance.
    named = rule_metric_names(RULES) | metric_names(DASHBOARD.read_text())

    def missing() -> set[str]:
        return named - exported_names(prom, t0)

    wait_until(lambda: not missing(), API_WAIT, "the metrics the rules and dashboard name", 0.2,
               error=lambda why: AssertionError(f"{why}; never exported: {sorted(missing())}"))
    for target in dashboard_targets():  # each a query Prometheus accepts (a 400 raises)
        prom.query(as_promql(target["expr"], job="solobot"))
