"""A real Prometheus for the alert tests: Debian's ``prometheus``, started on a free port.

Like testbed/balancer.py's nginx: it runs in its own session with its config, rule file and TSDB in
a directory of the caller's, and :meth:`Prometheus.stop` kills its process group. The test talks
to it only through its HTTP API (``/api/v1/...``), as an operator's tooling would.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from testbed.waiting import free_port

#: How long Prometheus may take to answer /-/ready.
READY_TIMEOUT = 30.0
#: One HTTP API request gives up after this.
API_TIMEOUT = 5.0


class Prometheus:
    """Prometheus scraping *targets* (``host:port``) as job *job*, every *interval* seconds, with
    *rules* (a rule file's content, as YAML data) evaluated at the same interval."""

    def __init__(self, work: Path, targets: list[str], rules: dict[str, Any], *, job: str = "solobot",
                 interval: float = 1.0) -> None:
        binary = shutil.which("prometheus") or "/usr/bin/prometheus"
        self.port = free_port()
        self.dir = work / f"prometheus-{self.port}"
        self.dir.mkdir(parents=True)
        (self.dir / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        every = f"{int(interval * 1000)}ms"
        config = {
            "global": {"scrape_interval": every, "scrape_timeout": every, "evaluation_interval": every},
            "rule_files": [str(self.dir / "rules.yml")],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        command = [binary, f"--config.file={self.dir / 'prometheus.yml'}",
                   f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                   "--log.level=warn"]
        self._log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._ready():
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"prometheus not ready within {READY_TIMEOUT} s: {self.log()}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:  # a bad config or rule file, a port taken
            raise RuntimeError(f"prometheus exited {self.proc.returncode}: {self.log()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=API_TIMEOUT) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def log(self) -> str:
        self._log.flush()
        return (self.dir / "prometheus.log").read_text(errors="replace")

    def api(self, path: str, **params: str) -> Any:
        """``data`` of a ``/api/v1/<path>`` answer (raises unless its status is success)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}{query}", timeout=API_TIMEOUT) as r:
            answer = json.loads(r.read())
        if answer.get("status") != "success":
            raise RuntimeError(f"prometheus /api/v1/{path}: {answer}")
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result vector (now, or at Unix time *at*)."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        return list(self.api("query", **params)["result"])

    def alerts(self, name: str) -> list[dict[str, Any]]:
        """The pending and firing alerts called *name* (``labels``, ``state``, ``activeAt``...)."""
        return [a for a in self.api("alerts")["alerts"] if a["labels"].get("alertname") == name]

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule, as the rules API describes it (``name``, ``query``, ``duration``...)."""
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def stop(self) -> None:
        """Kill Prometheus' process group and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()


# -- what the shipped files name ------------------------------------------------------------------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
#: The rules an operator loads.
RULES = DEPLOY / "prometheus" / "solobot.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "solobot.json"
METRIC_NAME = re.compile(r"\bsolobot_[a-z0-9_]+\b")


def alert_rules(path: Path) -> list[dict[str, Any]]:
    """Every alerting rule of a rule file, as written."""
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]
            if "alert" in rule]


def metric_names(text: str) -> set[str]:
    """The solobot sample names a PromQL expression (or a dashboard's JSON) names."""
    return set(METRIC_NAME.findall(text))


def rule_metric_names(path: Path) -> set[str]:
    return set().union(*(metric_names(rule["expr"]) for rule in alert_rules(path)))


def dashboard_targets(path: Path = DASHBOARD) -> list[dict[str, Any]]:
    """Every query of the Grafana dashboard's panels (``expr``, ``legendFormat``, ...)."""
    panels = json.loads(path.read_text())["panels"]
    return [target for panel in panels for target in panel.get("targets", [])]


def as_promql(grafana_expr: str, job: str, rate_interval: str = "1m") -> str:
    """A dashboard expression as Grafana sends it, for job *job*."""
    return grafana_expr.replace("$job", job).replace("$__rate_interval", rate_interval)
