"""Shared test harness: the fake Bot API, real ``python main.py`` processes, and waiting helpers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_bot_api import FakeBotAPI

ROOT = Path(__file__).resolve().parent.parent
BOT_ID = 123456
TOKEN = f"{BOT_ID}:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0"
ADMIN_ID = 777
DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01,
               message: str = "condition") -> Any:
    """Poll *predicate* until it returns something truthy; fail with *message* after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def first_poll_after(fake: FakeBotAPI, tag: str, t0: float) -> float | None:
    """When the server got *tag*'s first (non-failing) getUpdates at or after *t0*."""
    for poll in fake.snapshot_polls():
        if poll.tag == tag and poll.started >= t0 and poll.outcome in ("ok", "pending"):
            return poll.started
    return None


def sigkill_mid_handlers(fake: FakeBotAPI, victim: BotProcess, standby_tag: str,
                         pings: int = 8) -> tuple[float, list[int]]:
    """SIGKILL *victim* while 0.2 s handlers run; return (gap to the standby's first poll, ping ids)."""
    fake.send_delay = 0.2  # every handler's reply takes 0.2 s
    sent = [fake.send_user_message(BOT_ID, "/ping") for _ in range(pings)]
    wait_until(lambda: fake.sending_now > 0, message="handlers in flight")
    t_kill = time.time()
    victim.signal(signal.SIGKILL)
    first = wait_until(lambda: first_poll_after(fake, standby_tag, t_kill), 5, message="the standby polls")
    wait_until(lambda: all(fake.replies_to(m) for m in sent), 20, message="no /ping lost")
    return first - t_kill, sent


def start_pair(spawn: Callable[..., BotProcess], **env: str) -> tuple[BotProcess, BotProcess]:
    """Instance "a" active, then "b" waiting as its standby."""
    a = spawn("a", **env)
    a.wait_mode("active")
    b = spawn("b", **env)
    b.wait_mode("passive")
    wait_until(lambda: "standby: lock held by pid" in b.log(), message="b announces its standby")
    return a, b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BotProcess:
    """A real ``python main.py`` with its own health port and log file."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, *,
                 prefix: list[str] | None = None) -> None:
        self.name = name
        self.port = int(env.get("HEALTH_PORT", "0"))
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, str(ROOT / "main.py")],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def health(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return dict(json.loads(r.read()))
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            return None

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def mode(self) -> str | None:
        h = self.health()
        return None if h is None else str(h["mode"])

    def wait_mode(self, mode: str, timeout: float = 20.0) -> None:
        wait_until(lambda: self.mode() == mode, timeout, 0.02, f"{self.name} to be {mode}\n{self.log()}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def fake() -> Iterator[FakeBotAPI]:
    server = FakeBotAPI().start_in_thread()
    yield server
    server.stop_thread()


@pytest.fixture
def shared_dirs(tmp_path: Path) -> dict[str, Path]:
    lock_dir = tmp_path / "lock"
    state_dir = tmp_path / "state"
    return {"lock": lock_dir, "state": state_dir, "logs": tmp_path}


@pytest.fixture
def spawn(fake: FakeBotAPI, shared_dirs: dict[str, Path]) -> Iterator[Callable[..., BotProcess]]:
    """Start ``python main.py`` instances against the fake; all killed at the end of the test."""
    procs: list[BotProcess] = []

    def start(name: str, *, prefix: list[str] | None = None, **overrides: str) -> BotProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        env.update({
            "BOT_TOKEN": TOKEN,
            "TELEGRAM_API_URL": fake.url(name),
            "LOCK_DIR": str(shared_dirs["lock"]),
            "STATE_DIR": str(shared_dirs["state"]),
            "HEALTH_PORT": str(free_port()),
            "ADMIN_IDS": str(ADMIN_ID),
            "POLLING_TIMEOUT": "10",
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(overrides)
        proc = BotProcess(name, env, shared_dirs["logs"], prefix=prefix)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


def have_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-pf", "--mount-proc", "true"], capture_output=True).returncode == 0
