"""Poison updates with real processes: a handler that SIGKILLs its own process, instances restarted
0.5 s after each death (systemd's ``Restart=always``), on both backends."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.fake_bot_api import FakeBotAPI
from tests.conftest import BOT_ID, ROOT, TOKEN, BotProcess, wait_until
from tests.test_postgres import pg, pg_env  # noqa: F401 - the pg fixture, for the PostgreSQL runs

Spawn = Callable[..., BotProcess]

#: Every instance runs bot.py plus a /crash handler that SIGKILLs its own process.
CRASH_PREFIX = [sys.executable, "-m", "tests.crash_bot"]
#: systemd's RestartSec / a container's restart policy.
RESTART_DELAY = 0.5
POISON_AFTER = 3
#: Pings from 20 other chats every 50 ms for this long (the issue's scenario, shortened).
PING_SECONDS = 4.0
PING_CHATS = 20
CRASH_CHAT = 500
#: Generous: each restart imports aiogram (seconds of CPU on a loaded 2-core machine).
SCENARIO_WAIT = 180.0


class Supervisor:
    """Named instances, each started again RESTART_DELAY after it dies; counts the deaths."""

    def __init__(self, spawn: Spawn, env: dict[str, str], *, crash: bool = True) -> None:
        self.spawn = spawn
        self.env = env
        self.crash = crash
        self.current: dict[str, BotProcess] = {}
        self.restart_at: dict[str, float] = {}
        self.deaths: list[int] = []  # exit codes
        self.generation = 0

    def start(self, name: str) -> BotProcess:
        self.generation += 1
        proc = self.spawn(f"{name}{self.generation}", prefix=CRASH_PREFIX if self.crash else None, **self.env)
        self.current[name] = proc
        return proc

    def tick(self) -> None:
        """Notice deaths, restart those due (called from the test's waits)."""
        now = time.monotonic()
        for name, proc in list(self.current.items()):
            due = self.restart_at.get(name)
            if due is not None:
                if now >= due:
                    del self.restart_at[name]
                    self.start(name)
            elif (code := proc.proc.poll()) is not None:
                self.deaths.append(code)
                self.restart_at[name] = now + RESTART_DELAY

    def logs(self) -> str:
        return "".join(p.log() for p in self.current.values())

    def active(self) -> BotProcess | None:
        for proc in self.current.values():
            if proc.proc.poll() is None and proc.mode() == "active":
                return proc
        return None

    def stop_all(self) -> None:
        for proc in self.current.values():
            proc.stop()
        self.current.clear()


def main_command(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "BOT_TOKEN": TOKEN, "ENV_FILE": os.devnull, **env}
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], env=full, cwd=cwd,
                          capture_output=True, text=True, timeout=30)


def inbox_command(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return main_command(env, cwd, "inbox", *args)


def answered_in(fake: FakeBotAPI, chat: int) -> bool:
    """The bot sent something to *chat* (without the crash handler, /crash is an unknown command)."""
    return any(s.chat_id == str(chat) for s in fake.snapshot_sent())


def set_aside_ids(listing: str) -> list[int]:
    return [int(line.split()[0]) for line in listing.splitlines()[1:] if line.strip()]


def backend_env(backend: str, request: pytest.FixtureRequest, shared_dirs: dict[str, Path]) -> dict[str, str]:
    """The bots' environment for *backend*; the inbox command's needs the state directory too."""
    base = {"POISON_AFTER": str(POISON_AFTER), "STATE_DIR": str(shared_dirs["state"]),
            "LOCK_DIR": str(shared_dirs["lock"])}
    if backend == "postgres":
        return {**base, **pg_env(request.getfixturevalue("pg"))}
    return {**base, "DATABASE_URL": ""}


def start_three(sup: Supervisor) -> None:
    sup.start("a").wait_mode("active")
    for name in ("b", "c"):
        sup.start(name)
    for proc in list(sup.current.values())[1:]:
        proc.wait_mode("passive")


@pytest.mark.parametrize("backend", ["file", "postgres"])
def test_crash_loop_ends_with_the_poison_set_aside_and_every_ping_answered(
    fake: FakeBotAPI, spawn: Spawn, shared_dirs: dict[str, Path], request: pytest.FixtureRequest, backend: str,
) -> None:
    env = backend_env(backend, request, shared_dirs)
    sup = Supervisor(spawn, env)
    start_three(sup)
    crash = fake.send_user_message(BOT_ID, "/crash", user_id=CRASH_CHAT, chat_id=CRASH_CHAT)
    pings: list[int] = []
    until = time.monotonic() + PING_SECONDS
    while time.monotonic() < until:
        chat = 1 + len(pings) % PING_CHATS
        pings.append(fake.send_user_message(BOT_ID, "/ping", user_id=chat, chat_id=chat))
        sup.tick()
        time.sleep(0.05)  # the pace of the ping stream, not synchronisation

    def set_aside_said() -> bool:
        sup.tick()
        return "set aside: its handler was running at 3 deaths" in sup.logs()

    wait_until(set_aside_said, SCENARIO_WAIT, message=f"the poison update set aside (deaths {sup.deaths})")
    deaths_at_set_aside = len(sup.deaths)

    def all_answered() -> bool:
        sup.tick()
        return all(fake.replies_to(m) for m in pings)

    wait_until(all_answered, SCENARIO_WAIT, message="every ping answered")
    def leading() -> BotProcess | None:
        sup.tick()
        return sup.active()

    leader = wait_until(leading, 60, message="an active instance")
    print(f"\n{backend}: {len(sup.deaths)} deaths, {len(pings)} pings from {PING_CHATS} chats over "
          f"{PING_SECONDS:g} s, {sum(1 for m in pings if fake.replies_to(m))} answered")
    assert len(sup.deaths) == deaths_at_set_aside, "no death after the poison was set aside"
    assert deaths_at_set_aside <= POISON_AFTER + 1, sup.deaths
    assert set(sup.deaths) == {-9}, sup.deaths
    assert not fake.replies_to(crash)
    logs = sup.logs()
    assert len(re.findall(r" ERROR .*set aside", logs)) == 1, logs
    listing = inbox_command(env, shared_dirs["logs"])
    assert listing.returncode == 0, listing.stderr
    assert f"c:{CRASH_CHAT}" in listing.stdout and "message" in listing.stdout, listing.stdout
    [crash_update] = set_aside_ids(listing.stdout)
    assert f"{crash_update} " in listing.stdout and " 3 " in listing.stdout.splitlines()[1]
    code, body = leader.get("/metrics")
    assert code == 200
    assert "solobot_inbox_set_aside_updates 1.0" in body.decode()
    health = leader.health()
    assert health is not None and health["updates"]["set_aside"] == 1
    status = main_command(env, shared_dirs["logs"], "status")
    assert status.returncode == 0 and json.loads(status.stdout)["set_aside"] == 1, status.stdout + status.stderr
    assert TOKEN.split(":")[1] not in listing.stdout + listing.stderr + status.stdout + status.stderr
    if backend == "postgres":  # drop: the count goes back to 0; a second drop has nothing to act on
        dropped = inbox_command(env, shared_dirs["logs"], "drop", str(crash_update))
        assert dropped.returncode == 0, dropped.stderr
        wait_until(lambda: b"solobot_inbox_set_aside_updates 0.0" in leader.get("/metrics")[1],
                   message="the gauge back to 0")
        assert inbox_command(env, shared_dirs["logs"], "drop", str(crash_update)).returncode == 3
        assert inbox_command(env, shared_dirs["logs"]).stdout.strip() == "no update is set aside"
    sup.stop_all()


def test_poison_dying_with_others_in_flight_blames_none_of_them_and_retry_runs_it(
    fake: FakeBotAPI, spawn: Spawn, shared_dirs: dict[str, Path], request: pytest.FixtureRequest,
) -> None:
    env = backend_env("file", request, shared_dirs)
    sup = Supervisor(spawn, env)
    start_three(sup)
    fake.send_delay = 0.2  # every reply takes 0.2 s: the other handlers are mid-flight at each death
    pings = [fake.send_user_message(BOT_ID, "/ping", user_id=chat, chat_id=chat)
             for _ in range(3) for chat in range(1, 7)]
    wait_until(lambda: fake.sending_now > 0, message="handlers in flight")
    crash = fake.send_user_message(BOT_ID, "/crash", user_id=CRASH_CHAT, chat_id=CRASH_CHAT)
    # More in flight while the poison is taken over again and again.
    pings += [fake.send_user_message(BOT_ID, "/ping", user_id=chat, chat_id=chat)
              for _ in range(2) for chat in range(1, 7)]

    def settled() -> bool:
        sup.tick()
        return "set aside: its handler" in sup.logs() and all(fake.replies_to(m) for m in pings)

    wait_until(settled, SCENARIO_WAIT, message=f"poison set aside and every ping answered (deaths {sup.deaths})")
    listing = inbox_command(env, shared_dirs["logs"])
    assert listing.returncode == 0, listing.stderr
    rows = listing.stdout.splitlines()[1:]
    assert len(rows) == 1 and f"c:{CRASH_CHAT}" in rows[0], listing.stdout
    [crash_update] = set_aside_ids(listing.stdout)
    assert not fake.replies_to(crash) and not answered_in(fake, CRASH_CHAT)
    assert inbox_command(env, shared_dirs["logs"], "retry", "1").returncode == 3
    assert inbox_command(env, shared_dirs["logs"], "retry", "x").returncode == 2
    # The fix deployed: instances without the killing handler; then the operator retries it.
    sup.stop_all()
    fixed = Supervisor(spawn, env, crash=False)
    fixed.start("fixed").wait_mode("active")
    retried = inbox_command(env, shared_dirs["logs"], "retry", str(crash_update))
    assert retried.returncode == 0, retried.stderr
    wait_until(lambda: answered_in(fake, CRASH_CHAT), 30, message="the retried update runs on the active instance")
    assert inbox_command(env, shared_dirs["logs"]).stdout.strip() == "no update is set aside"
