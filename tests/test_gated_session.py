"""The lease gate at the last moment: a process paused after the connector's check, before aiohttp
wrote the request (one event-loop turn later, in a task of its own), sends nothing when resumed
unless the lease is verified again (in-process, against the fake Bot API)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from aiogram import Bot
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import TelegramNetworkError

from testbed.fake_bot_api import FakeBotAPI
from utils.base.lease import Lease, LeaseGate
from utils.locking.gated_session import GatedAiohttpSession

TOKEN = "424242:" + "G" * 35
CHAT = 5001
#: The lease's renew deadline in these tests; the "pause" moves the clock well past it.
DEADLINE = 3.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class PausedAfterConnect(LeaseGate):
    """The gate of a process that is paused (SIGSTOP) right after the connector's check: the
    pause is a callback queued by that check, so it runs before aiohttp's body-writing task."""

    def __init__(self, clock: Clock, verdict_after_pause: bool) -> None:
        super().__init__()
        self.clock = clock
        self.verdict_after_pause = verdict_after_pause
        self.checks = 0
        self.verifications = 0

    async def verify(self) -> bool:
        self.verifications += 1
        return self.verdict_after_pause

    async def check(self) -> None:
        await super().check()
        self.checks += 1
        if self.checks == 2:  # the first is the middleware's, the second the connector's
            asyncio.get_running_loop().call_soon(self.pause)

    def pause(self) -> None:
        self.clock.now += 60.0  # stopped for a minute: the lease went stale meanwhile


@pytest.fixture
def fake() -> Iterator[FakeBotAPI]:
    server = FakeBotAPI().start_in_thread()
    yield server
    server.stop_thread()


async def send_after_pause(fake: FakeBotAPI, verdict_after_pause: bool) -> tuple[PausedAfterConnect, Exception | None]:
    clock = Clock()
    gate = PausedAfterConnect(clock, verdict_after_pause)
    gate.lease = Lease(1, verify=gate.verify, renew_deadline=DEADLINE, clock=clock)
    bot = Bot(TOKEN, session=GatedAiohttpSession(gate, api=TelegramAPIServer.from_base(fake.url("t"))))
    try:
        await bot.send_message(CHAT, "after the pause")
    except TelegramNetworkError as exc:
        return gate, exc
    finally:
        await bot.session.close()
    return gate, None


def sent_texts(fake: FakeBotAPI) -> list[str | None]:
    return [s.text for s in fake.snapshot_sent() if s.chat_id == str(CHAT)]


async def test_a_request_written_after_a_pause_is_refused_when_the_lease_was_lost(fake: FakeBotAPI) -> None:
    gate, error = await send_after_pause(fake, verdict_after_pause=False)
    assert gate.verifications == 1, "the stale lease was verified again before the write"
    assert error is not None, "the call fails (as a dropped connection)"
    assert gate.lease is not None and gate.lease.lost == "fenced: a newer leader holds the lock"
    assert sent_texts(fake) == [], "nothing reached Telegram"


async def test_a_request_written_after_a_pause_goes_out_once_the_lease_is_verified(fake: FakeBotAPI) -> None:
    gate, error = await send_after_pause(fake, verdict_after_pause=True)
    assert error is None
    assert gate.verifications == 1
    assert sent_texts(fake) == ["after the pause"]
