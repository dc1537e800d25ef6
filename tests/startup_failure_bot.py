"""A bot module (``BOT_MODULE=tests.startup_failure_bot``) whose aiogram startup hook fails: the
last start-up step of the daemon, for tests/test_daemon_in_process.py."""

from __future__ import annotations

from aiogram import Dispatcher, Router

router = Router(name="startup-failure")

#: What the hook raises (the test finds it in the log).
FAILURE = "the bot's on_startup hook failed on purpose"


async def fail_on_startup() -> None:
    raise RuntimeError(FAILURE)


def setup_dispatcher(dp: Dispatcher) -> None:
    dp.startup.register(fail_on_startup)
