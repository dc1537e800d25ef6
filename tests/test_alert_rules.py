"""The alert rules (deploy/prometheus/): promtool's own checks and unit tests, one firing and one
quiet case per alert, and every alert explained in docs/operations.md. No bot started here: the
real Prometheus against real replicas is tests/test_alerts_live.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.prometheus import DASHBOARD, RULES, alert_rules, dashboard_targets

OPERATIONS = ROOT / "docs" / "operations.md"
#: promtool answers in well under a second; this only keeps a wedged one from hanging the run.
PROMTOOL_TIMEOUT = 60.0
#: The shipped "no leader" delay: longer than any handover (milliseconds; 0.5 s after a kill -9 on
#: PostgreSQL), short enough to page while the inbox is young.
NO_LEADER_FOR = "30s"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool") or "/usr/bin/promtool"  # Debian's prometheus package (.ci/run)
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT)


def unit_tests(rules: Path) -> Path:
    return rules.with_name(rules.name.replace(".rules.yml", ".rules.test.yml"))


@pytest.mark.parametrize("rules", [RULES], ids=lambda p: p.name)
def test_promtool_checks_the_rules_and_runs_their_unit_tests(rules: Path) -> None:
    checked = promtool("check", "rules", rules.name, cwd=rules.parent)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", unit_tests(rules).name, cwd=rules.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


@pytest.mark.parametrize("rules", [RULES], ids=lambda p: p.name)
def test_every_alert_has_a_case_that_fires_and_one_that_does_not(rules: Path) -> None:
    cases = [case for test in yaml.safe_load(unit_tests(rules).read_text())["tests"]
             for case in test["alert_rule_test"]]
    for rule in alert_rules(rules):
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']}: no case where it fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']}: no case where it must not"


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading (lower case, punctuation dropped, - for spaces)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("rules", [RULES], ids=lambda p: p.name)
def test_every_alert_says_what_to_look_at_in_the_operations_runbook(rules: Path) -> None:
    anchors = {github_anchor(line.lstrip("#")) for line in OPERATIONS.read_text().splitlines()
               if line.startswith("#")}
    for rule in alert_rules(rules):
        name, annotations = rule["alert"], rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        linked = re.findall(r"docs/operations\.md#([\w-]+)", annotations["description"])
        assert linked == [name.lower()], f"{name}: its description must point at its own section"
        assert linked[0] in anchors, f"{name}: docs/operations.md has no section #{linked[0]}"


def test_the_shipped_no_leader_rule_waits_30_s_and_counts_across_replicas() -> None:
    """What tests/test_alerts_live.py shortens (``for``) and what it keeps (the expression)."""
    rule = next(r for r in alert_rules(RULES) if r["alert"] == "SolobotNoLeader")
    assert rule["for"] == NO_LEADER_FOR
    assert "sum by (job)" in rule["expr"] and "up{" in rule["expr"], "per job, and with every replica down"


def test_the_dashboard_selects_one_bot_through_its_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["job"]["type"] == "query"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    targets = dashboard_targets()
    assert len(targets) >= 10
    for target in targets:
        assert target["datasource"]["uid"] == "${datasource}", target
        assert 'job=~"$job"' in target["expr"], f"not filtered to the chosen bot: {target['expr']}"
