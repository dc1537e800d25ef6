"""End to end on one host against the fake Bot API: real ``python main.py`` processes where a signal,
kill -9, a second instance or a PID namespace is the point; the whole daemon in-process
(tests/daemon.py) for the rest."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from testbed.fake_bot_api import FakeBotAPI
from tests.conftest import (
    BOT_ID,
    HANDOVER_BOUND,
    ROOT,
    START_WAIT,
    TOKEN,
    BotProcess,
    first_poll_after,
    have_unshare,
    run_main_in_process,
    sigkill_mid_handlers,
    start_pair,
    wait_until,
)
from tests.daemon import InProcessDaemon, StartDaemon, daemon_env, in_process, wait_for  # noqa: F401

Spawn = Callable[..., BotProcess]


def assert_each_answered_once(fake: FakeBotAPI, message_ids: list[int], *bots: BotProcess) -> None:
    wait_until(lambda: all(fake.replies_to(m) for m in message_ids), 20,
               message="every /ping to be answered")
    # The positive marker: every running instance holds no unfinished update, so no (wrong)
    # second answer can still be on its way.
    wait_until(lambda: all(b.proc.poll() is not None or (b.health() or {}).get("updates", {}).get("waiting") == 0
                           for b in bots), message="the instances idle")
    counts = Counter(s.reply_to for s in fake.snapshot_sent() if s.text == "pong")
    doubled = {m: counts[m] for m in message_ids if counts[m] != 1}
    assert not doubled, f"answered other than once: {doubled}"


def test_two_instances_one_poller(fake: FakeBotAPI, spawn: Spawn) -> None:
    a, b = start_pair(spawn)
    pings = [fake.send_user_message(BOT_ID, "/ping") for _ in range(20)]
    assert_each_answered_once(fake, pings, a, b)
    assert {s.tag for s in fake.snapshot_sent()} == {"a"}
    assert {p.tag for p in fake.snapshot_polls()} == {"a"}, "the standby must never poll"
    assert fake.conflicts() == 0
    health = b.health()
    assert health is not None and health["mode"] == "passive"
    assert health["lock"]["holder"]["pid"] == a.pid
    a.signal(signal.SIGTERM)
    b.signal(signal.SIGTERM)
    assert a.wait_exit() == 0
    assert b.wait_exit() == 0
    passive_log = b.log()
    assert "WARNING" not in passive_log and "ERROR" not in passive_log, passive_log
    assert passive_log.count("standby: lock held by pid") == 1


def test_sigterm_handover_loses_and_doubles_nothing(fake: FakeBotAPI, spawn: Spawn) -> None:
    a, b = start_pair(spawn)
    sent: list[int] = []
    stop = threading.Event()

    def user() -> None:
        while not stop.is_set():
            sent.append(fake.send_user_message(BOT_ID, "/ping"))
            time.sleep(0.02)

    writer = threading.Thread(target=user)
    writer.start()
    wait_until(lambda: len(sent) > 20, message="pings before the handover")
    t_term = time.time()
    a.signal(signal.SIGTERM)
    first = wait_until(lambda: first_poll_after(fake, "b", t_term), 5, message="standby polls")
    wait_until(lambda: len(sent) > 60, message="pings after the handover")
    stop.set()
    writer.join()
    assert a.wait_exit() == 0
    gap = first - t_term
    print(f"\nSIGTERM handover: standby's first getUpdates {gap * 1000:.1f} ms after SIGTERM")
    assert gap < HANDOVER_BOUND
    assert_each_answered_once(fake, sent, a, b)
    assert fake.conflicts() == 0
    tags = {s.tag for s in fake.snapshot_sent()}
    assert tags == {"a", "b"}, tags
    b.signal(signal.SIGTERM)
    assert b.wait_exit() == 0


def test_sigkill_with_handlers_in_flight_loses_nothing(fake: FakeBotAPI, spawn: Spawn) -> None:
    a, _b = start_pair(spawn)
    gap, _ = sigkill_mid_handlers(fake, a, "b")
    print(f"\nSIGKILL handover: standby's first getUpdates {gap * 1000:.1f} ms after SIGKILL")
    assert gap < HANDOVER_BOUND
    assert fake.conflicts() == 0


def test_stale_pid_file_is_reported_and_replaced(fake: FakeBotAPI, spawn: Spawn,
                                                 shared_dirs: dict[str, Path]) -> None:
    a = spawn("a")
    a.wait_mode("active")
    a.signal(signal.SIGKILL)
    a.wait_exit()
    pid_file = shared_dirs["lock"] / f"solobot-{BOT_ID}.pid"
    assert pid_file.exists(), "SIGKILL leaves the record behind"
    b = spawn("b")
    b.wait_mode("active")
    assert "stale PID file" in b.log() and "dead" in b.log()
    pid_file.write_text("{not json")
    b.signal(signal.SIGKILL)
    b.wait_exit()
    pid_file.write_text("{corrupt")
    c = spawn("c")
    c.wait_mode("active")
    assert "corrupt" in c.log()


async def test_webhook_is_deleted_once_and_polling_starts(fake: FakeBotAPI, in_process: StartDaemon) -> None:  # noqa: F811
    fake.set_webhook(BOT_ID, "https://example.invalid/hook")
    a = await in_process("a")
    await a.wait_mode("active")
    ping = fake.send_user_message(BOT_ID, "/ping")
    await wait_for(lambda: fake.replies_to(ping), message="reply after deleteWebhook")
    assert fake.webhook(BOT_ID) == ""
    assert sum(1 for tag, m, _ in fake.calls if m == "deleteWebhook") == 1


async def test_webhook_kept_when_opted_out(fake: FakeBotAPI, in_process: StartDaemon) -> None:  # noqa: F811
    fake.set_webhook(BOT_ID, "https://example.invalid/hook")
    a = await in_process("a", DELETE_WEBHOOK_ON_CONFLICT="false")
    await wait_for(lambda: "DELETE_WEBHOOK_ON_CONFLICT=false" in a.log(), START_WAIT, message="error line")
    assert fake.webhook(BOT_ID) == "https://example.invalid/hook"
    assert not any(m == "deleteWebhook" for _, m, _ in fake.calls)


async def test_429_retry_after_is_honoured(fake: FakeBotAPI, in_process: StartDaemon) -> None:  # noqa: F811
    a = await in_process("a")
    await a.wait_mode("active")
    fake.set_flood("getUpdates", 1, 2)
    ping = fake.send_user_message(BOT_ID, "/ping")  # ends the pending poll; the next one floods
    await wait_for(lambda: any(p.outcome == "flood" for p in fake.snapshot_polls()), message="a 429")
    flood_at = next(p.started for p in fake.snapshot_polls() if p.outcome == "flood")
    retry = await wait_for(lambda: next((p.started for p in fake.snapshot_polls() if p.started > flood_at),
                                        None), 15, message="the retry after the 429")
    assert retry - flood_at >= 1.9, f"retried {retry - flood_at:.2f} s after a 429 with retry_after=2"
    await wait_for(lambda: fake.replies_to(ping), 15, message="reply")


BAD_CONFIGS = [
    ({"BOT_TOKEN": ""}, "BOT_TOKEN"),
    ({"BOT_TOKEN": "123456:SHORTSECRETxyz"}, "BOT_TOKEN"),
    ({"BOT_TOKEN": "notanumber:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0"}, "BOT_TOKEN"),
    ({"HEALTH_PORT": "eighty"}, "HEALTH_PORT"),
    ({"LOCK_BACKEND": "redis"}, "LOCK_BACKEND"),
    ({"ADMIN_IDS": "12,abc"}, "ADMIN_IDS"),
    ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    ({"LOCK_STALE_SECONDS": "soon"}, "LOCK_STALE_SECONDS"),
]


@pytest.mark.parametrize(("overrides", "variable"), BAD_CONFIGS, ids=[v for _, v in BAD_CONFIGS])
def test_bad_configuration_exits_78(overrides: dict[str, str], variable: str, tmp_path: Path) -> None:
    """What main.py says and exits with, in-process (tests/conftest.py's run_main_in_process)."""
    env = {"PATH": "/usr/bin:/bin", "BOT_TOKEN": TOKEN, "LOCK_DIR": str(tmp_path / "l"),
           "STATE_DIR": str(tmp_path / "s"), "HEALTH_PORT": "0", **overrides}
    done = run_main_in_process(env=env, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 78, output
    assert variable in output
    assert "Traceback" not in output
    for secret in ("SHORTSECRETxyz", "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0"):
        assert secret not in output


def test_bad_configuration_exits_78_before_the_heavy_imports(tmp_path: Path) -> None:
    """A real ``python main.py``: the exit 78 comes before aiogram's seconds of imports."""
    overrides = {"BOT_TOKEN": "123456:SHORTSECRETxyz", "HEALTH_PORT": "eighty"}
    env = {"PATH": "/usr/bin:/bin", "BOT_TOKEN": TOKEN, "LOCK_DIR": str(tmp_path / "l"),
           "STATE_DIR": str(tmp_path / "s"), "HEALTH_PORT": "0", **overrides}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(ROOT / "main.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=10)
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 78, output
    assert elapsed < 5
    assert "BOT_TOKEN" in output and "HEALTH_PORT" in output
    assert "Traceback" not in output
    for secret in ("SHORTSECRETxyz", "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0"):
        assert secret not in output


async def test_unsafe_lock_dir_exits_78(tmp_path: Path, fake: FakeBotAPI) -> None:
    lock_dir = tmp_path / "open"
    lock_dir.mkdir()
    lock_dir.chmod(0o777)
    env = daemon_env(fake, lock_dir, tmp_path / "s", "a", HEALTH_PORT="0")
    daemon = await InProcessDaemon("a", env).start()
    assert await daemon.wait_exit() == 78
    assert "writable by other users" in daemon.log() and "Traceback" not in daemon.log()


async def test_health_port_in_use_is_a_clear_error(fake: FakeBotAPI, in_process: StartDaemon) -> None:  # noqa: F811
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        a = await in_process("a", HEALTH_PORT=str(port))
        assert await a.wait_exit() == 1
    assert f"HEALTH_PORT {port}" in a.log() and "Traceback" not in a.log()
    assert not fake.snapshot_polls(), "nothing polls when startup fails"


def test_token_never_logged(fake: FakeBotAPI, spawn: Spawn) -> None:
    a = spawn("a", LOG_LEVEL="DEBUG")
    a.wait_mode("active")
    ping = fake.send_user_message(BOT_ID, "/ping")
    wait_until(lambda: fake.replies_to(ping))
    a.signal(signal.SIGTERM)
    assert a.wait_exit() == 0
    secret = TOKEN.partition(":")[2]
    assert secret not in a.log()
    assert f"{BOT_ID}:***" in a.log()


@pytest.mark.skipif(not have_unshare(), reason="needs unshare with PID namespaces (root)")
def test_two_pid_namespaces_share_lock_dir(fake: FakeBotAPI, spawn: Spawn) -> None:
    """Both processes are PID 1 in their own namespace, as in two containers."""
    ns = ["unshare", "-pf", "--mount-proc"]
    a = spawn("a", prefix=ns)
    a.wait_mode("active")
    b = spawn("b", prefix=ns)
    b.wait_mode("passive")
    ha, hb = a.health(), b.health()
    assert ha is not None and hb is not None
    assert ha["pid"] == 1 and hb["pid"] == 1
    assert hb["lock"]["holder"]["instance_id"] == ha["instance_id"]
    ping = fake.send_user_message(BOT_ID, "/ping")
    wait_until(lambda: fake.replies_to(ping))
    # SIGTERM the PID-1 python inside a's namespace (unshare does not forward signals).
    inner = psutil.Process(a.pid).children()[0]
    t_term = time.time()
    inner.send_signal(signal.SIGTERM)
    wait_until(lambda: first_poll_after(fake, "b", t_term), 5, message="b takes over")
    assert a.wait_exit() == 0, a.log()
    assert fake.conflicts() == 0
    ping2 = fake.send_user_message(BOT_ID, "/ping")
    wait_until(lambda: fake.replies_to(ping2))
    assert [s.tag for s in fake.snapshot_sent()] == ["a", "b"]


def test_status_command_file_backend(fake: FakeBotAPI, spawn: Spawn, shared_dirs: dict[str, Path]) -> None:
    env = {"PATH": "/usr/bin:/bin", "BOT_TOKEN": TOKEN, "LOCK_DIR": str(shared_dirs["lock"]),
           "STATE_DIR": str(shared_dirs["state"])}

    def status() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(ROOT / "main.py"), "status"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=START_WAIT)

    assert status().returncode == 3
    a = spawn("a")
    a.wait_mode("active")
    held = status()
    assert held.returncode == 0 and f'"pid": {a.pid}' in held.stdout
    a.signal(signal.SIGKILL)
    a.wait_exit()
    assert status().returncode == 3, "a PID file left by a dead process is not an active holder"


async def test_revoked_token_stops_with_exit_78(fake: FakeBotAPI, in_process: StartDaemon) -> None:  # noqa: F811
    fake.revoked.add(TOKEN)
    a = await in_process("a")
    assert await a.wait_exit(START_WAIT) == 78
    assert "401" in a.log() and "Traceback" not in a.log()
    assert len([p for p in fake.calls if p[1] == "getUpdates"]) == 1, "no retry loop on a rejected token"
    assert TOKEN.partition(":")[2] not in a.log()
