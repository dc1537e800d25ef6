"""The whole daemon in the test's event loop (tests/daemon.py): it starts, serves, stops and starts
again in one process, and a start-up that fails at any step exits with its code and leaves nothing open."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.fake_bot_api import FakeBotAPI
from testbed.waiting import free_port, listening
from tests.conftest import BOT_ID
from tests.daemon import InProcessDaemon, StartDaemon, daemon_env, in_process, wait_for  # noqa: F401

EXIT_OK, EXIT_FAILURE = 0, 1


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
