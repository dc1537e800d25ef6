"""The whole daemon in the test's event loop (tests/daemon.py): it starts, serves, stops and starts
again in one process, and a start-up that fails at any step exits with its code and leaves nothing open."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from testbed.fake_bot_api import FakeBotAPI
from testbed.waiting import free_port, listening
from tests.conftest import BOT_ID, DATABASE_URL
from tests.daemon import InProcessDaemon, StartDaemon, daemon_env, in_process, wait_for  # noqa: F401
from utils.base.exit_codes import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK


async def test_starts_active_and_answers_ping(fake: FakeBotAPI, in_process: StartDaemon) -> None:  # noqa: F811
    bot = await in_process("a")
    await bot.wait_mode("active")
    sent = fake.send_user_message(BOT_ID, "/ping")
    replies = await wait_for(lambda: fake.replies_to(sent), message="the reply to /ping")
    assert replies[0].text == "pong"
    status, body = await bot.get("/ready")
    assert status == 200, body
    assert "solobot started" in bot.log() and f"instance {bot.instance_id}" in bot.log()


async def test_a_stop_request_drains_and_exits_0(fake: FakeBotAPI, in_process: StartDaemon) -> None:  # noqa: F811
    """SIGTERM's path without the signal: the handler in flight finishes, its reply goes out."""
    bot = await in_process("a")
    await bot.wait_mode("active")
    fake.send_delay = 0.5  # the reply takes half a second: it is in flight when the stop comes
    sent = fake.send_user_message(BOT_ID, "/ping")
    await wait_for(lambda: fake.sending_now > 0, message="the handler in flight")
    assert await bot.stop() == EXIT_OK
    assert fake.replies_to(sent), "the drain let the handler finish"
    assert "shutdown complete" in bot.log()
    assert not listening(bot.port)


async def test_built_twice_in_one_process(fake: FakeBotAPI, in_process: StartDaemon) -> None:  # noqa: F811
    """The user's module-global router is detached when a server stops, so the next one includes it."""
    import bot as user_bot

    for name in ("first", "second"):
        daemon = await in_process(name)
        await daemon.wait_mode("active")
        assert user_bot.router.parent_router is not None
        sent = fake.send_user_message(BOT_ID, "/ping")
        await wait_for(lambda: fake.replies_to(sent), message=f"{name}'s reply to /ping")  # noqa: B023
        assert await daemon.stop() == EXIT_OK
        assert user_bot.router.parent_router is None, "detached at shutdown"


async def test_an_active_and_its_standby_in_one_process(fake: FakeBotAPI,
                                                      in_process: StartDaemon) -> None:  # noqa: F811
    """Two daemons at once (the second on its own copy of the bot module): the standby waits, and
    takes over when the active one stops on SIGTERM's path."""
    a = await in_process("a")
    await a.wait_mode("active")
    b = await in_process("b", own_bot_module=True)
    await b.wait_mode("passive")
    await wait_for(lambda: "standby: lock held by pid" in b.log(), message="b announces its standby")
    assert "lock held by pid" not in a.log() and b.instance_id not in a.log(), "each log holds its own lines"
    a.signal(signal.SIGTERM)
    assert await a.wait_exit() == EXIT_OK
    assert "shutdown requested: received SIGTERM" in a.log()
    await b.wait_mode("active")
    sent = fake.send_user_message(BOT_ID, "/ping")
    await wait_for(lambda: fake.replies_to(sent), message="the reply from b")
    assert await b.stop() == EXIT_OK


@pytest.fixture
def webhook_fake() -> Iterator[FakeBotAPI]:
    server = FakeBotAPI(deliver_webhooks=True, webhook_retry_base=0.2, webhook_retry_max=2.0).start_in_thread()
    yield server
    server.stop_thread()


async def test_webhook_mode_starts_and_answers(webhook_fake: FakeBotAPI, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/tg/hook"
    env = daemon_env(webhook_fake, tmp_path / "lock", tmp_path / "state", "hook",
                     BOT_MODE="webhook", WEBHOOK_URL=url, HEALTH_PORT=str(port))
    daemon = await InProcessDaemon("hook", env).start()
    try:
        await daemon.wait_mode("active")
        await wait_for(lambda: webhook_fake.webhook(BOT_ID) == url, message="the webhook registered")
        sent = webhook_fake.send_user_message(BOT_ID, "/ping")
        await wait_for(lambda: webhook_fake.replies_to(sent), message="the reply through the webhook")
        health = await daemon.health()
        assert health is not None and health["updates"]["delivery"] == "webhook"
    finally:
        assert await daemon.stop() == EXIT_OK


# -- a start-up that fails at each step: its exit code, and nothing left open ---------------------

def open_files() -> dict[int, str]:
    """This process's open file descriptors and what they are (``/proc/self/fd``)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the directory listing's own descriptor, closed meanwhile
            continue
        if not target.startswith("/proc/"):
            found[int(name)] = target
    return found


def other_tasks() -> set[asyncio.Task[object]]:
    return {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}


def database_sessions(instance_id: str) -> int:
    """PostgreSQL sessions of one daemon instance (every one carries its id in application_name)."""
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s",
                           (f"solobot-%-{instance_id}-%",)).fetchone()
    return int(row[0]) if row else 0


async def assert_nothing_left_open(daemon: InProcessDaemon, files_before: dict[int, str],
                                   held_elsewhere: int | None = None) -> None:
    """No listener on its health port (unless another holds it: *held_elsewhere*), no task of its
    own, no file beyond *files_before*, no database session."""
    import bot as user_bot

    assert not daemon.running
    if daemon.port != held_elsewhere:
        assert not listening(daemon.port), "the health port is closed"
    assert not other_tasks(), f"tasks left behind: {other_tasks()}"
    # The fake Bot API (another thread of this process) closes its end of a connection when it
    # sees ours close: wait for that, then compare.
    # Only what appeared since the start counts: a file of an earlier test in this worker closed
    # meanwhile (its objects collected) is not the daemon's business.
    def opened_since() -> dict[int, str]:
        return {fd: what for fd, what in open_files().items() if files_before.get(fd) != what}

    try:
        await wait_for(lambda: not opened_since(), message="no file opened since the start", timeout=10)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: still open: {opened_since()}") from None
    assert user_bot.router.parent_router is None, "the user's router is detached"
    if daemon.settings.database:
        assert database_sessions(daemon.instance_id) == 0


@pytest.fixture
def port_in_use() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


async def start_and_fail(fake: FakeBotAPI, tmp_path: Path, expected: int, held_elsewhere: int | None = None,
                         **env: str) -> InProcessDaemon:
    """Start a daemon that fails to start: it exits with *expected* and leaves nothing open."""
    before = open_files()
    daemon = await InProcessDaemon("failing", daemon_env(fake, tmp_path / "lock", tmp_path / "state",
                                                          "failing", **env)).start()
    assert await daemon.wait_exit() == expected, daemon.log()
    await assert_nothing_left_open(daemon, before, held_elsewhere)
    return daemon


async def test_state_store_step_fails_with_exit_78(fake: FakeBotAPI, tmp_path: Path) -> None:
    """STATE_DIR not ours alone (a symlink): a configuration error, before anything else is open."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "state-link").symlink_to(tmp_path / "elsewhere")
    daemon = await start_and_fail(fake, tmp_path, EXIT_CONFIG, STATE_DIR=str(tmp_path / "state-link"))
    assert "STATE_DIR" in daemon.log()


async def test_lock_backend_step_fails_with_exit_78(fake: FakeBotAPI, tmp_path: Path) -> None:
    """LOCK_DIR not ours alone: exit 78, and the state store opened before it is closed again."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "lock-link").symlink_to(tmp_path / "elsewhere")
    daemon = await start_and_fail(fake, tmp_path, EXIT_CONFIG, LOCK_DIR=str(tmp_path / "lock-link"))
    assert "LOCK_DIR" in daemon.log()
    assert "close state store" not in daemon.log(), "its teardown ran without an error"


async def test_health_port_step_fails_with_exit_1(fake: FakeBotAPI, tmp_path: Path, port_in_use: int) -> None:
    daemon = await start_and_fail(fake, tmp_path, EXIT_FAILURE, port_in_use, HEALTH_PORT=str(port_in_use))
    assert f"HEALTH_PORT {port_in_use}" in daemon.log() and "cannot listen" in daemon.log()


async def test_health_port_step_fails_on_postgresql_too(fake: FakeBotAPI, tmp_path: Path,
                                                        port_in_use: int) -> None:
    await start_and_fail(fake, tmp_path, EXIT_FAILURE, port_in_use, HEALTH_PORT=str(port_in_use),
                         DATABASE_URL=DATABASE_URL, LOCK_BACKEND="postgres")


async def test_webhook_port_step_fails_with_exit_1(fake: FakeBotAPI, tmp_path: Path, port_in_use: int) -> None:
    """The webhook's own port in use: exit 1, and the health endpoint started before it is stopped."""
    daemon = await start_and_fail(fake, tmp_path, EXIT_FAILURE, BOT_MODE="webhook",
                                  WEBHOOK_URL="http://127.0.0.1:8443/tg/hook", WEBHOOK_PORT=str(port_in_use))
    assert f"WEBHOOK_PORT {port_in_use}" in daemon.log()


async def test_aiogram_startup_hook_fails_with_exit_1(fake: FakeBotAPI, tmp_path: Path) -> None:
    from tests.startup_failure_bot import FAILURE, router

    daemon = await start_and_fail(fake, tmp_path, EXIT_FAILURE, BOT_MODULE="tests.startup_failure_bot")
    assert FAILURE in daemon.log()
    assert router.parent_router is None


async def test_webhook_registration_failing_keeps_the_daemon_up(webhook_fake: FakeBotAPI, tmp_path: Path) -> None:
    """setWebhook refused for good (the URL does not answer): not a start-up failure. The daemon
    stays up (it receives on every replica; the leader retries the registration with backoff), and
    stops with exit 0 leaving nothing open."""
    before = open_files()
    unreachable = free_port()
    env = daemon_env(webhook_fake, tmp_path / "lock", tmp_path / "state", "hook", BOT_MODE="webhook",
                     WEBHOOK_URL=f"http://127.0.0.1:{unreachable}/tg/hook")
    daemon = await InProcessDaemon("hook", env).start()
    await daemon.wait_mode("active")
    await wait_for(lambda: "webhook: registration failed" in daemon.log(), message="the refused setWebhook")
    assert webhook_fake.webhook(BOT_ID) == ""
    assert await daemon.stop() == EXIT_OK
    await assert_nothing_left_open(daemon, before)


async def test_a_stop_closes_every_database_session(fake: FakeBotAPI, tmp_path: Path) -> None:
    before = open_files()
    env = daemon_env(fake, tmp_path / "lock", tmp_path / "state", "pg", DATABASE_URL=DATABASE_URL,
                     LOCK_BACKEND="postgres")
    daemon = await InProcessDaemon("pg", env).start()
    await daemon.wait_mode("active")
    assert database_sessions(daemon.instance_id) > 0
    assert await daemon.stop() == EXIT_OK
    await assert_nothing_left_open(daemon, before)


def test_importing_main_installs_no_signal_handler() -> None:
    """Only ``python main.py`` takes SIGTERM/SIGINT over; an import (a test, a tool) leaves them be."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    import main

    assert main.EARLY_STOP is None and main.PREPARED is None
    assert {sig: signal.getsignal(sig) for sig in before} == before
