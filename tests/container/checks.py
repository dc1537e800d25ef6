"""The container test (issue 12): the image built and run for real under rootful podman.

    bash tests/container/run.sh          installs podman, builds the stand-in base images, runs this
    python -m tests.container.checks     this alone (podman and the base images already there)
    python -m tests.container.checks early pair    some groups only: config early pair compose
    python -m tests.container.checks image         only build the image (.ci/run, beside the tests)

What it checks, each against testbed/fake_bot_api.py:

* a bad configuration exits 78, the process living under 0.5 s;
* ``podman stop`` 0.1 s, 0.5 s and more after start (during the heavy imports) exits 0 within 2 s;
* Python is PID 1 and not root; the HEALTHCHECK passes, following HEALTH_HOST/HEALTH_PORT, and
  with HEALTH_PORT=0 (endpoint off) passes as a liveness check;
* two containers sharing the lock and state volumes: one active; ``podman kill -s KILL`` of it
  mid-handlers and the other is active within 1 s with a higher epoch; no /ping lost, none
  answered before the kill answered again;
* a stop of the active container exits 0 within the grace period and releases the lock (the
  standby takes over with a higher epoch);
* docker-compose.yml under podman-compose with the stand-in PostgreSQL: one leader of two
  replicas, which survives ``kill -9`` of the leader; a stop exits 0.

The single containers run with ``--network host`` and reach the fake on 127.0.0.1; the compose
project keeps its own network (service names resolve as for a user), with the fake as a service
on it (tests/container/fake_server.py), driven through ``podman exec``.

Everything it starts carries the label solobot.test=container (compose: project solobotct) and
is removed at the end, on failure or on a signal too; leftovers of an interrupted run are removed
first. Waits are on positive markers (a mode, an exit, a log line), with generous bounds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from testbed.fake_bot_api import FakeBotAPI
from testbed.waiting import free_port, get_health
from testbed.waiting import wait_until as shared_wait_until
from utils.base.exit_codes import EXIT_CONFIG

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/solobot:test"
POSTGRES_IMAGE = "localhost/solobot-standin/postgres:15"
LABEL_KEY, LABEL_VALUE = "solobot.test", "container"
LABEL = f"{LABEL_KEY}={LABEL_VALUE}"
PREFIX = "solobot-ct-"
LOCK_VOLUME, STATE_VOLUME = f"{PREFIX}lock", f"{PREFIX}state"
COMPOSE_PROJECT = "solobotct"
BOT_ID = 123456
TOKEN = f"{BOT_ID}:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0"
ADMIN_ID = 777

# The bounds.
#: When ``podman stop`` comes after ``podman run -d`` returned: the heavy imports run from about
#: 0.3 s to 2-6 s (load), so the later ones land in the middle of them.
EARLY_STOP_DELAYS = (0.1, 0.5, 1.0, 1.5, 2.0, 2.5)
EARLY_STOP_LIMIT = 2.0
CONFIG_EXIT_LIMIT = 0.5
TAKEOVER_LIMIT = 1.0
#: ``podman stop``'s default -t (as docker's): the grace before SIGKILL.
STOP_GRACE = 10

# Generous bounds for a loaded 2-core machine; every wait ends early on its positive marker.
START_TIMEOUT = 60.0
COMPOSE_TIMEOUT = 120.0
REPLY_TIMEOUT = 30.0
PODMAN_TIMEOUT = 300.0
#: The compose check, run beside the others: its own waits are bounded; this bounds the whole.
BESIDE_TIMEOUT = 2 * PODMAN_TIMEOUT + COMPOSE_TIMEOUT
#: In-flight pings at the kill: each reply takes this long at the fake.
HANDLER_DELAY = 0.2
PINGS_BEFORE, PINGS_IN_FLIGHT, PINGS_AFTER = 3, 6, 3
FAKE_PORT_IN_COMPOSE = 8081
#: A compose takeover slower than this prints the new leader's log (0.5 s delay + a round trip).
SLOW_TAKEOVER = 5.0


class CheckFailed(AssertionError):
    pass


#: The shared wait, raising CheckFailed (one check fails, the others still run).
wait_until = functools.partial(shared_wait_until, error=CheckFailed)


def podman(*args: str, timeout: float = PODMAN_TIMEOUT, check: bool = True,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and done.returncode != 0:
        raise CheckFailed(f"podman {' '.join(args[:3])}... exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return done


def go_time(text: str) -> datetime:
    """Podman's RFC 3339 times with nanoseconds, to microseconds (what datetime holds)."""
    text = text.strip().strip('"')
    match = re.fullmatch(r"(.*T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", text)
    if not match:
        raise CheckFailed(f"unexpected time format from podman: {text!r}")
    fraction = (match.group(2) or ".0")[:7]
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    return datetime.fromisoformat(match.group(1) + fraction + zone)


def run_healthcheck(name: str) -> str:
    """Run the image's HEALTHCHECK now (no systemd here to run it on a timer); its output."""
    done = podman("healthcheck", "run", name, check=False)
    status = podman("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
    log = json.loads(podman("inspect", "--format", "{{json .State.Health.Log}}", name).stdout or "[]")
    output = str(log[-1]["Output"]).strip() if log else ""
    if done.returncode != 0 or status != "healthy":
        raise CheckFailed(f"{name}: healthcheck exit {done.returncode}, status {status}: {output}")
    return output


class Report:
    """Checks passed and failed, and the figures the issue asks for."""

    def __init__(self) -> None:
        self.passed: list[str] = []
        self.failed: list[str] = []
        self.figures: list[tuple[str, str]] = []
        self._output = threading.Lock()  # one line at a time: the compose check runs in a thread

    def say(self, line: str) -> None:
        with self._output:
            print(line, flush=True)

    @contextlib.contextmanager
    def check(self, name: str) -> Iterator[None]:
        self.say(f"-- {name}")
        try:
            yield
        except BaseException as exc:
            self.failed.append(name)
            self.say(f"FAIL {name}: {type(exc).__name__}: {exc}")
            raise
        self.passed.append(name)
        self.say(f"ok   {name}")

    def figure(self, name: str, value: str) -> None:
        self.figures.append((name, value))
        self.say(f"     {name}: {value}")

    def summary(self) -> None:
        print("\n== container test figures")
        for name, value in self.figures:
            print(f"   {name}: {value}")
        print(f"container: {len(self.passed)} passed, {len(self.failed)} failed", flush=True)


class Container:
    """One bot container on the host network (its /health on 127.0.0.1:health_port)."""

    def __init__(self, name: str, health_port: int) -> None:
        self.name = PREFIX + name
        self.health_port = health_port

    def health(self) -> dict[str, Any] | None:
        return get_health(self.health_port)

    def mode(self) -> str | None:
        health = self.health()
        return None if health is None else str(health["mode"])

    def wait_mode(self, mode: str, timeout: float = START_TIMEOUT, interval: float = 0.02) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            health = self.health()
            return health if health is not None and health["mode"] == mode else None

        try:
            return wait_until(reached, timeout, f"{self.name} to be {mode}", interval=interval)
        except CheckFailed as exc:
            raise CheckFailed(f"{exc}\n--- {self.name} log:\n{self.logs()[-3000:]}") from None

    def inspect(self, template: str) -> str:
        return podman("inspect", "--format", template, self.name).stdout.strip()

    def exit_code(self) -> int:
        return int(self.inspect("{{.State.ExitCode}}"))

    def lifetime(self) -> float:
        started = go_time(self.inspect("{{json .State.StartedAt}}"))
        finished = go_time(self.inspect("{{json .State.FinishedAt}}"))
        return (finished - started).total_seconds()

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def own_shutdown(self) -> str:
        """The bot's own account of its stop ("0.26 s"), without the engine's overhead."""
        match = re.search(r"shutdown complete in ([\d.]+ s)", self.logs())
        return match.group(1) if match else "not logged"

    def wait_log(self, marker: str, timeout: float = START_TIMEOUT) -> None:
        wait_until(lambda: marker in self.logs(), timeout, f"{marker!r} in {self.name}'s log", interval=0.2)

    def stop(self, grace: int = STOP_GRACE) -> float:
        t0 = time.monotonic()
        podman("stop", "-t", str(grace), self.name)
        return time.monotonic() - t0

    def healthcheck(self) -> str:
        return run_healthcheck(self.name)


class ContainerTest:
    def __init__(self, report: Report) -> None:
        self.report = report
        self.fake = FakeBotAPI()
        self.compose_dir: Path | None = None

    # -- plumbing ------------------------------------------------------------------------------

    def bot_env(self, tag: str, health_port: int, **overrides: str) -> dict[str, str]:
        env = {
            "BOT_TOKEN": TOKEN,
            "TELEGRAM_API_URL": self.fake.url(tag),
            # Host network: the endpoint on loopback only, not on the machine's interfaces.
            "HEALTH_HOST": "127.0.0.1",
            "HEALTH_PORT": str(health_port),
            "ADMIN_IDS": str(ADMIN_ID),
            "POLLING_TIMEOUT": "10",
            "LOG_LEVEL": "INFO",
        }
        env.update(overrides)
        return env

    def run_bot(self, tag: str, *, health_port: int | None = None, detach: bool = True,
                **overrides: str) -> tuple[Container, subprocess.CompletedProcess[str]]:
        port = free_port() if health_port is None else health_port
        container = Container(tag, port)
        args = ["run", "--name", container.name, "--label", LABEL, "--network", "host",
                "-v", f"{LOCK_VOLUME}:/run/solobot", "-v", f"{STATE_VOLUME}:/app/data"]
        if detach:
            args.append("-d")
        for key, value in self.bot_env(tag, port, **overrides).items():
            args += ["-e", f"{key}={value}"]
        done = podman(*args, IMAGE, check=detach)
        return container, done

    @staticmethod
    def remove(*containers: Container) -> None:
        podman("rm", "-f", "-v", "-t", "0", *(c.name for c in containers), check=False)

    def cleanup(self) -> None:
        """Remove everything this test may have started, this run's or an interrupted one's."""
        if self.compose_dir is not None and self.compose_dir.exists():
            self.compose("down", "-v", "-t", "0", check=False)
            shutil.rmtree(self.compose_dir, ignore_errors=True)
        for kind, label in (("ps", LABEL), ("ps", f"io.podman.compose.project={COMPOSE_PROJECT}")):
            ids = podman(kind, "-aq", "--filter", f"label={label}", check=False).stdout.split()
            if ids:
                podman("rm", "-f", "-v", "-t", "0", *ids, check=False)
        for label in (LABEL, f"io.podman.compose.project={COMPOSE_PROJECT}"):
            names = podman("volume", "ls", "-q", "--filter", f"label={label}", check=False).stdout.split()
            if names:
                podman("volume", "rm", "-f", *names, check=False)
        podman("network", "rm", "-f", f"{COMPOSE_PROJECT}_default", check=False)

    # -- the checks ----------------------------------------------------------------------------

    def build_image(self) -> None:
        with self.report.check("image builds (podman build --format docker)"):
            t0 = time.monotonic()
            done = subprocess.run(
                ["podman", "build", "--format", "docker", "--pull=never", "--label", LABEL,
                 "-t", IMAGE, str(ROOT)],
                capture_output=True, text=True, timeout=PODMAN_TIMEOUT * 2)
            if done.returncode != 0:
                raise CheckFailed(f"podman build failed:\n{(done.stdout + done.stderr)[-3000:]}")
            self.report.figure("app image build", f"{time.monotonic() - t0:.1f} s")
            health = podman("image", "inspect", "--format", "{{json .HealthCheck}}", IMAGE).stdout
            if "utils.ops.healthcheck" not in health:
                raise CheckFailed(f"HEALTHCHECK not kept in the image: {health.strip()}")
            volumes = podman("image", "inspect", "--format", "{{json .Config.Volumes}}", IMAGE).stdout
            if "/run/solobot" not in volumes or "/app/data" not in volumes:
                raise CheckFailed(f"the image declares volumes {volumes.strip()}")

    def bad_config_exits_78(self) -> None:
        with self.report.check("bad configuration exits 78 in under 0.5 s"):
            t0 = time.monotonic()
            bad, done = self.run_bot("badconfig", detach=False, BOT_TOKEN="not-a-token")
            wall = time.monotonic() - t0
            lifetime = bad.lifetime()
            self.remove(bad)
            if done.returncode != EXIT_CONFIG or "BOT_TOKEN" not in done.stderr:
                raise CheckFailed(f"exit {done.returncode}, stderr {done.stderr.strip()[-500:]!r}")
            self.report.figure("exit 78: process lifetime", f"{lifetime:.3f} s (podman run {wall:.2f} s)")
            if lifetime >= CONFIG_EXIT_LIMIT:
                raise CheckFailed(f"lived {lifetime:.3f} s")

    def early_stops(self) -> None:
        with self.report.check(f"podman stop {EARLY_STOP_DELAYS} s after start exits 0 within "
                               f"{EARLY_STOP_LIMIT:g} s"):
            # The shortest delay alone: a stop that lands within the interpreter's own start-up
            # (before main.py's first line can install a handler) is dropped by the kernel, as PID 1
            # has no default actions, and several starts at once stretch that window past 0.1 s.
            # The later delays all at once, each container in a thread of its own (a run, the
            # delay, a stop): by then every handler is in place, loaded or not.
            first, *later = EARLY_STOP_DELAYS
            outcomes = [self.early_stop(0, first)]
            with ThreadPoolExecutor(len(later)) as pool:
                outcomes += pool.map(self.early_stop, range(1, len(EARLY_STOP_DELAYS)), later)
            self.report.figure("early stops", "; ".join(summary for summary, _ in outcomes))
            failures = [failure for _, failure in outcomes if failure]
            if failures:
                raise CheckFailed("\n".join(failures))

    def early_stop(self, index: int, delay: float) -> tuple[str, str | None]:
        """One early stop: its summary, and what failed (None if nothing did)."""
        early, _ = self.run_bot(f"early{index}")
        started = time.monotonic()  # `podman run -d` returns once the process runs
        time.sleep(max(0.0, started + delay - time.monotonic()))  # the stimulus, not a wait
        took = early.stop()
        code, log = early.exit_code(), early.logs()
        self.remove(early)
        phase = "during start-up" if "before startup finished" in log else "after start-up"
        summary = f"{delay:g} s: {took:.2f} s exit {code} ({phase})"
        if code != 0 or took >= EARLY_STOP_LIMIT:
            return summary, f"stop {delay:g} s after start: exit {code} after {took:.2f} s\n--- log:\n{log[-3000:]}"
        return summary, None

    def pair_and_handover(self) -> None:
        report = self.report
        with report.check("Python is PID 1, not root; HEALTHCHECK passes"):
            a, _ = self.run_bot("a")
            t0 = time.monotonic()
            health_a = a.wait_mode("active")
            report.figure("start to active", f"{time.monotonic() - t0:.2f} s after podman run -d")
            status = podman("exec", a.name, "cat", "/proc/1/status").stdout
            cmdline = podman("exec", a.name, "cat", "/proc/1/cmdline").stdout.split("\0")
            uid = re.search(r"^Uid:\s+(\d+)", status, re.M)
            if health_a["pid"] != 1 or cmdline[:2] != ["python", "main.py"]:
                raise CheckFailed(f"PID 1 is {cmdline!r}, /health pid {health_a['pid']}")
            if uid is None or uid.group(1) == "0":
                raise CheckFailed(f"PID 1 runs as uid {uid.group(1) if uid else '?'}")
            report.figure("healthcheck (active)", a.healthcheck())

        with report.check("HEALTH_PORT=0: the HEALTHCHECK checks liveness; a standby stops with exit 0"):
            c, _ = self.run_bot("c", health_port=0)
            # The next check's standby, started now: its start-up beside c's (c stops before the kill).
            b, _ = self.run_bot("b")
            c.wait_log("standby: lock")
            output = c.healthcheck()
            if "liveness" not in output:
                raise CheckFailed(f"healthcheck said {output!r}")
            report.figure("healthcheck (HEALTH_PORT=0)", output)
            took = c.stop()
            code, own = c.exit_code(), c.own_shutdown()
            self.remove(c)
            report.figure("stop of a standby", f"podman stop {took:.2f} s (the bot's own shutdown {own}), "
                          f"exit {code}")
            if code != 0:
                raise CheckFailed(f"standby exited {code}")

        with report.check("two containers sharing the volumes: kill -9 of the active, the other "
                          f"active within {TAKEOVER_LIMIT:g} s with a higher epoch"):
            b.wait_mode("passive")
            b.wait_log("standby: lock")
            report.figure("healthcheck (standby)", b.healthcheck())
            before = [self.fake.send_user_message(BOT_ID, "/ping") for _ in range(PINGS_BEFORE)]
            wait_until(lambda: all(self.fake.replies_to(m) for m in before), REPLY_TIMEOUT, "a's replies")
            epoch_a = int(health_a["epoch"])

            self.fake.send_delay = HANDLER_DELAY
            in_flight = [self.fake.send_user_message(BOT_ID, "/ping") for _ in range(PINGS_IN_FLIGHT)]
            wait_until(lambda: self.fake.sending_now > 0, REPLY_TIMEOUT, "handlers in flight")
            killed_at = time.time()
            t0 = time.monotonic()
            podman("kill", "-s", "KILL", a.name)
            health_b = b.wait_mode("active", timeout=10, interval=0.005)
            takeover = time.monotonic() - t0
            first_poll = wait_until(lambda: self.first_poll_after("b", killed_at), 10, "b's first getUpdates")
            report.figure("takeover after kill -9 (containers)",
                          f"{takeover * 1000:.0f} ms to /health active, first getUpdates "
                          f"{(first_poll - killed_at) * 1000:.0f} ms after the kill; "
                          f"epoch {epoch_a} -> {health_b['epoch']}")
            if takeover >= TAKEOVER_LIMIT:
                raise CheckFailed(f"takeover took {takeover:.3f} s")
            if int(health_b["epoch"]) <= epoch_a:
                raise CheckFailed(f"epoch did not rise: {epoch_a} -> {health_b['epoch']}")
            # a again, as the next check's standby: its start-up beside the pings below.
            podman("start", a.name)

            self.fake.send_delay = 0.0
            after = [self.fake.send_user_message(BOT_ID, "/ping") for _ in range(PINGS_AFTER)]
            everything = before + in_flight + after
            wait_until(lambda: all(self.fake.replies_to(m) for m in everything), REPLY_TIMEOUT,
                       "a reply to every /ping (none lost)")
            wait_until(lambda: (b.health() or {}).get("updates", {}).get("waiting") == 0, REPLY_TIMEOUT,
                       "b's pipeline idle")
            twice = {m: len(self.fake.replies_to(m)) for m in before + after if len(self.fake.replies_to(m)) != 1}
            again = sum(len(self.fake.replies_to(m)) - 1 for m in in_flight)
            report.figure("pings", f"{len(everything)} answered; in flight at the kill answered again: {again}")
            if twice:
                raise CheckFailed(f"answered more than once (message id: replies): {twice}")
            if self.fake.conflicts():
                raise CheckFailed(f"{self.fake.conflicts()} getUpdates conflicts")

        with report.check(f"stop of the active exits 0 within {STOP_GRACE} s and releases the lock"):
            a.wait_mode("passive")
            a.wait_log("standby: lock")
            epoch_b = int(health_b["epoch"])
            took = b.stop()
            code, own = b.exit_code(), b.own_shutdown()
            health_a = a.wait_mode("active", timeout=10)
            report.figure("stop of the active", f"podman stop {took:.2f} s (the bot's own shutdown {own}), "
                          f"exit {code}; the standby active with epoch {health_a['epoch']}")
            log = b.logs()
            if code != 0 or took >= STOP_GRACE or "shutdown complete" not in log:
                raise CheckFailed(f"exit {code} after {took:.2f} s\n--- log:\n{log[-3000:]}")
            if int(health_a["epoch"]) <= epoch_b:
                raise CheckFailed(f"epoch did not rise: {epoch_b} -> {health_a['epoch']}")
            took = a.stop()
            if a.exit_code() != 0:
                raise CheckFailed(f"the last active exited {a.exit_code()}")
            self.remove(a, b)

    def first_poll_after(self, tag: str, t0: float) -> float | None:
        for poll in self.fake.snapshot_polls():
            if poll.tag == tag and poll.started >= t0 and poll.outcome in ("ok", "pending"):
                return poll.started
        return None

    # -- compose -------------------------------------------------------------------------------

    def compose(self, *args: str, check: bool = True, timeout: float = PODMAN_TIMEOUT) -> str:
        assert self.compose_dir is not None
        env = dict(os.environ, POSTGRES_IMAGE=POSTGRES_IMAGE)
        done = subprocess.run(
            ["podman-compose", "-p", COMPOSE_PROJECT, "-f", "docker-compose.yml", "-f", "test-override.yml",
             *args],
            cwd=self.compose_dir, env=env, capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
        (self.compose_dir / "compose.log").open("a").write(f"$ podman-compose {' '.join(args)}\n{output}\n")
        if check and done.returncode != 0:
            raise CheckFailed(f"podman-compose {' '.join(args)} exited {done.returncode}:\n{output[-3000:]}")
        return output

    def compose_project(self) -> Path:
        """docker-compose.yml as it is, in a directory of its own with the test's .env and override."""
        workdir = Path(tempfile.mkdtemp(prefix="solobot-compose-"))
        shutil.copy(ROOT / "docker-compose.yml", workdir / "docker-compose.yml")
        (workdir / ".env").write_text(
            f"BOT_TOKEN={TOKEN}\nTELEGRAM_API_URL=http://fake:{FAKE_PORT_IN_COMPOSE}/compose\n"
            f"ADMIN_IDS={ADMIN_ID}\nPOLLING_TIMEOUT=10\nLOG_LEVEL=INFO\n"
            f"POSTGRES_PASSWORD={secrets.token_hex(12)}\n")
        # The image built above instead of a second build; the fake Bot API as a service.
        (workdir / "test-override.yml").write_text(f"""\
services:
  postgres:
    environment:
      POSTGRES_INITDB_ARGS: --no-sync  # a throwaway database: no fsync while it is created
  bot:
    image: {IMAGE}
    depends_on:
      fake:
        condition: service_started
  fake:
    image: {IMAGE}
    entrypoint: ["python", "-m", "tests.container.fake_server", "--port", "{FAKE_PORT_IN_COMPOSE}"]
    volumes:
      - {ROOT / "tests"}:/app/tests:ro
      - {ROOT / "testbed"}:/app/testbed:ro
    # The image's volumes as tmpfs: no anonymous volume left behind by the fake.
    tmpfs:
      - /run/solobot
      - /app/data
    init: true
    healthcheck:
      test: ["NONE"]
""")
        return workdir

    def in_compose_fake(self, path: str, body: dict[str, Any] | None = None) -> Any:
        """Call the compose fake's control API from inside its container."""
        script = (
            "import json, sys, urllib.request as u\n"
            f"url = 'http://127.0.0.1:{FAKE_PORT_IN_COMPOSE}/_fake/' + sys.argv[1]\n"
            "data = sys.argv[2].encode() if len(sys.argv) > 2 else None\n"
            "req = u.Request(url, data, {'Content-Type': 'application/json'})\n"
            "print(u.urlopen(req, timeout=5).read().decode())\n"
        )
        args = ["exec", f"{COMPOSE_PROJECT}_fake_1", "python", "-c", script, path]
        if body is not None:
            args.append(json.dumps(body))
        return json.loads(podman(*args).stdout)

    def compose_ping(self, count: int) -> list[int]:
        return [int(self.in_compose_fake("message", {"bot_id": BOT_ID, "text": "/ping"})["message_id"])
                for _ in range(count)]

    def compose_replies(self) -> dict[int, int]:
        replies: dict[int, int] = {}
        for sent in self.in_compose_fake("sent"):
            if sent.get("reply_to") is not None:
                replies[int(sent["reply_to"])] = replies.get(int(sent["reply_to"]), 0) + 1
        return replies

    @staticmethod
    def compose_bot_state(name: str) -> tuple[str, int] | None:
        """(mode, epoch) of a compose bot, from its healthcheck's own output."""
        done = podman("exec", name, "python", "-m", "utils.ops.healthcheck", check=False)
        match = re.search(r"mode=(\w+) epoch=(\w+)", done.stdout)
        if not match:
            return None
        return match.group(1), int(match.group(2)) if match.group(2).isdigit() else 0

    def compose_first_poll_after(self, t0: float) -> float | None:
        starts = [float(p["started"]) for p in self.in_compose_fake("polls")
                  if float(p["started"]) >= t0 and p["outcome"] in ("ok", "pending")]
        return min(starts) if starts else None

    def compose_active(self, name: str) -> tuple[str, int] | None:
        state = self.compose_bot_state(name)
        return state if state is not None and state[0] == "active" else None

    def compose_leaders(self, bots: list[str]) -> dict[str, tuple[str, int]] | None:
        states = {name: self.compose_bot_state(name) for name in bots}
        if any(state is None for state in states.values()):
            return None
        modes = sorted(state[0] for state in states.values() if state)
        return {n: s for n, s in states.items() if s} if modes == ["active", "passive"] else None

    def compose_check(self) -> None:
        bots = [f"{COMPOSE_PROJECT}_bot_1", f"{COMPOSE_PROJECT}_bot_2"]
        try:
            self.compose_run(bots)
        except CheckFailed as exc:
            raise CheckFailed(f"{exc}\n{self.compose_diagnostics(bots)}") from None

    def compose_diagnostics(self, bots: list[str]) -> str:
        """What the bots logged and what the fake saw, for a failure's message."""
        parts = []
        health = ("import urllib.request as u; "
                  "print(u.urlopen('http://127.0.0.1:8080/health', timeout=2).read().decode())")
        for name in bots:
            logs = podman("logs", "--tail", "25", name, check=False)
            parts.append(f"--- {name} log (tail):\n{logs.stdout}{logs.stderr}")
            parts.append(f"--- {name} /health: {podman('exec', name, 'python', '-c', health, check=False).stdout}")
        with contextlib.suppress(CheckFailed, ValueError, subprocess.TimeoutExpired):
            polls = self.in_compose_fake("polls")[-12:]
            parts.append("--- the fake's last getUpdates: " + "; ".join(
                f"{p['started']:.3f} {p['outcome']} offset={p['offset']}" for p in polls))
        return "\n".join(parts)

    def compose_run(self, bots: list[str]) -> None:
        report = self.report
        with report.check("compose (podman-compose, stand-in PostgreSQL): one leader of two replicas, "
                          "survives kill -9 of it"):
            self.compose_dir = self.compose_project()
            t0 = time.monotonic()
            # As docker compose's `condition: service_healthy` (podman-compose 1.0 only orders):
            # PostgreSQL first, until its compose healthcheck passes, then the rest.
            self.compose("up", "-d", "postgres")
            wait_until(lambda: podman("healthcheck", "run", f"{COMPOSE_PROJECT}_postgres_1",
                                      check=False).returncode == 0,
                       COMPOSE_TIMEOUT, "PostgreSQL's compose healthcheck", interval=0.5)
            report.figure("compose: PostgreSQL healthy", f"{time.monotonic() - t0:.1f} s")
            self.compose("up", "-d")
            states = wait_until(lambda: self.compose_leaders(bots), COMPOSE_TIMEOUT,
                                "one active and one passive bot", interval=0.5)
            report.figure("compose up to one leader", f"{time.monotonic() - t0:.1f} s")
            leader = next(n for n, s in states.items() if s[0] == "active")
            follower = next(n for n in bots if n != leader)
            epoch = states[leader][1]
            report.figure("compose healthcheck (HEALTH_HOST=0.0.0.0)", run_healthcheck(leader))

            before = self.compose_ping(PINGS_BEFORE)
            wait_until(lambda: all(m in self.compose_replies() for m in before), REPLY_TIMEOUT,
                       "replies in compose", interval=0.3)
            killed_at = time.time()
            podman("kill", "-s", "KILL", leader)
            new = wait_until(lambda: self.compose_active(follower), COMPOSE_TIMEOUT,
                             f"{follower} to take over", interval=0.1)
            # Every bot polls with the same tag; after the kill only the new leader can.
            first_poll = wait_until(lambda: self.compose_first_poll_after(killed_at), COMPOSE_TIMEOUT,
                                    "the new leader's first getUpdates", interval=0.3)
            if first_poll - killed_at > SLOW_TAKEOVER:
                logs = podman("logs", "--since", f"{first_poll - killed_at + 5:.0f}s", follower, check=False)
                report.say(f"     slow takeover; {follower} logged:\n{logs.stdout}{logs.stderr}")
            report.figure("compose takeover after kill -9 (PostgreSQL lock)",
                          f"first getUpdates {(first_poll - killed_at) * 1000:.0f} ms after the kill, "
                          f"epoch {epoch} -> {new[1]}")
            if new[1] <= epoch:
                raise CheckFailed(f"epoch did not rise: {epoch} -> {new[1]}")
            after = self.compose_ping(PINGS_AFTER)
            wait_until(lambda: all(m in self.compose_replies() for m in after), REPLY_TIMEOUT,
                       "replies after the takeover", interval=0.3)
            wait_until(lambda: self.compose_pipeline_idle(follower), REPLY_TIMEOUT, "the new leader idle",
                       interval=0.3)
            replies = self.compose_replies()
            twice = {m: replies.get(m, 0) for m in before + after if replies.get(m, 0) != 1}
            if twice:
                raise CheckFailed(f"answered other than once (message id: replies): {twice}")

            t0 = time.monotonic()
            self.compose("stop", "-t", "15", "bot")
            took = time.monotonic() - t0
            code = int(podman("inspect", "--format", "{{.State.ExitCode}}", follower).stdout.strip())
            report.figure("compose stop of the leader", f"{took:.2f} s (both replicas), exit {code}")
            if code != 0:
                raise CheckFailed(f"{follower} exited {code}")
            self.compose("down", "-v", "-t", "15")
            shutil.rmtree(self.compose_dir, ignore_errors=True)
            self.compose_dir = None

    @staticmethod
    def compose_pipeline_idle(name: str) -> bool:
        script = ("import json, urllib.request as u; "
                  "h = json.load(u.urlopen('http://127.0.0.1:8080/health', timeout=2)); "
                  "print(h.get('updates', {}).get('waiting'))")
        done = podman("exec", name, "python", "-c", script, check=False)
        return done.stdout.strip() == "0"

    # -- the run -------------------------------------------------------------------------------

    def run(self, groups: list[str]) -> None:
        self.cleanup()
        for volume in (LOCK_VOLUME, STATE_VOLUME):
            podman("volume", "create", "--label", LABEL, volume)
        self.fake.start_in_thread()
        # "image": the build alone (.ci/run builds it beside the tests; the checks then find every
        # layer in podman's cache and the build step takes a second or two).
        checks = {"image": lambda: None, "config": self.bad_config_exits_78, "early": self.early_stops,
                  "pair": self.pair_and_handover, "compose": self.compose_check}
        unknown = set(groups) - set(checks)
        if unknown:
            raise CheckFailed(f"unknown check group(s) {sorted(unknown)}; known: {sorted(checks)}")
        try:
            self.build_image()
            selected = [name for name in checks if not groups or name in groups]
            # First, alone (no other container starting): the bounds about a process's first
            # moments, exit 78 within 0.5 s and a stop 0.1 s after start.
            for name in ("config", "early"):
                if name in selected:
                    checks[name]()
            # Then the compose project beside the single containers: it has its own network, fake,
            # PostgreSQL and names, and its bounds are generous (the pair's kill -9 takeover, 1 s,
            # is under 0.2 s beside it); the two take the time of the longer, not of both.
            beside = Beside(self.compose_check) if "compose" in selected else None
            try:
                for name in selected:
                    if name not in ("config", "early", "compose"):
                        checks[name]()
            finally:
                if beside is not None:
                    beside.result()
        finally:
            self.fake.stop_thread()
            self.cleanup()


class Beside:
    """A check run in a thread of its own beside the others; :meth:`result` waits for it and
    raises what it raised (its own report lines are printed as it goes)."""

    def __init__(self, check: Callable[[], None]) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(check,), name=check.__name__, daemon=True)
        self.thread.start()

    def _run(self, check: Callable[[], None]) -> None:
        try:
            check()
        except BaseException as exc:  # noqa: BLE001 - handed to result(), raised in the main thread
            self.error = exc

    def result(self) -> None:
        self.thread.join(BESIDE_TIMEOUT)
        if self.thread.is_alive():
            raise CheckFailed(f"{self.thread.name} still running after {BESIDE_TIMEOUT:g} s")
        if self.error is not None:
            raise self.error


def on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the cleanup


def main() -> int:
    if shutil.which("podman") is None or shutil.which("podman-compose") is None:
        print("container test: podman/podman-compose missing; run tests/container/run.sh", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, on_signal)
    report = Report()
    for name, variable in (("setup (podman)", "SOLOBOT_CT_SETUP_S"), ("base images", "SOLOBOT_CT_BASE_S")):
        if os.environ.get(variable):
            report.figure(name, f"{os.environ[variable]} s")
    try:
        ContainerTest(report).run(sys.argv[1:])
    except (CheckFailed, subprocess.TimeoutExpired) as exc:
        print(f"container test failed: {exc}", file=sys.stderr)
        if not report.failed:
            report.failed.append(str(exc).splitlines()[0])
    finally:
        report.summary()
    return 0 if not report.failed else 1


if __name__ == "__main__":
    sys.exit(main())
