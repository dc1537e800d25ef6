"""The flood limiter in the bot's session, in-process against the fake Bot API with Telegram's limits.

No process boundary is needed here: the bot's session (lease gate + flood control) talks HTTP to
the fake, which enforces the limits as Telegram does (429 with ``retry_after``, not delivered).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from aiogram import Bot
from aiogram.client.telegram import TelegramAPIServer
from aiogram.exceptions import TelegramRetryAfter

from testbed.fake_bot_api import FakeBotAPI, SendLimits
from utils.base.lease import Lease, LeaseGate, LeaseLost
from utils.locking.gated_session import GatedAiohttpSession
from utils.sending import flood
from utils.sending.limiter import FloodControl, FloodLimiter, SendsClosed

TOKEN = "424242:" + "F" * 35
BOT_ID = 424242
WAIT = 30.0


async def always() -> bool:
    return True


@pytest.fixture
def limited_fake() -> Iterator[FakeBotAPI]:
    server = FakeBotAPI(send_limits=SendLimits()).start_in_thread()
    yield server
    server.stop_thread()


class Sender:
    """A bot whose session has the lease gate and the flood control, as main.py builds it."""

    def __init__(self, fake: FakeBotAPI, limits: flood.SendLimits | None = None) -> None:
        self.gate = LeaseGate()
        self.gate.lease = Lease(1, verify=always, renew_deadline=3600.0)
        self.limiter = FloodLimiter(limits or flood.SendLimits())
        self.control = FloodControl(self.limiter, self.gate)
        session = GatedAiohttpSession(self.gate, flood=self.control,
                                      api=TelegramAPIServer.from_base(fake.url("t")))
        self.bot = Bot(TOKEN, session=session)


@pytest.fixture
async def sender(limited_fake: FakeBotAPI) -> AsyncIterator[Sender]:
    s = Sender(limited_fake)
    yield s
    await s.bot.session.close()


def texts_to(fake: FakeBotAPI, chat_id: int) -> list[str | None]:
    return [s.text for s in fake.snapshot_sent() if s.chat_id == str(chat_id)]


async def test_one_chat_429_pauses_it_while_the_others_flow_at_the_overall_limit(
    limited_fake: FakeBotAPI, sender: Sender
) -> None:
    slow_chat = 777
    limited_fake.set_flood("sendMessage", 1, 5, chat_id=str(slow_chat))
    started = time.monotonic()
    mine = [asyncio.ensure_future(sender.bot.send_message(slow_chat, f"m{i}")) for i in range(3)]
    others = [asyncio.ensure_future(sender.bot.send_message(1000 + n, "hi")) for n in range(90)]
    async with asyncio.timeout(WAIT):
        await asyncio.gather(*others)
    others_done = time.monotonic() - started
    assert not any(t.done() for t in mine), "the chat that met the 429 still waits"
    async with asyncio.timeout(WAIT):
        await asyncio.gather(*mine)
    mine_done = time.monotonic() - started
    assert texts_to(limited_fake, slow_chat) == ["m0", "m1", "m2"], "resumed in order"
    assert mine_done >= 5.0, f"the chat resumed after {mine_done:.2f} s, before retry_after 5 s"
    # 90 sends at 30/s with a burst of 30 take 2 s; other chats did not wait for the paused one.
    assert others_done < 4.0, f"the other chats took {others_done:.2f} s"
    # Within Telegram's limits: the bot and the fake share this process (and its GIL), so a
    # request may reach the fake later than in production; at most a stray 429 or two.
    refused = limited_fake.snapshot_refused()
    assert len(refused) <= 2, refused
    assert sender.limiter.rate_limited == 1 + len(refused)
    assert sender.limiter.waiting == 0


async def test_a_send_that_cannot_go_out_within_the_retry_max_raises_once_logged(
    limited_fake: FakeBotAPI, caplog: pytest.LogCaptureFixture
) -> None:
    s = Sender(limited_fake, flood.SendLimits(retry_max=60.0))
    try:
        limited_fake.set_flood("sendMessage", 1, 120, chat_id="555")
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="solobot.sending"), pytest.raises(TelegramRetryAfter) as caught:
            await asyncio.wait_for(s.bot.send_message(555, "late"), WAIT)
        assert time.monotonic() - started < 5.0, "fails at once, not after waiting in vain"
        assert caught.value.retry_after == 120
        [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert "chat 555" in warning.getMessage() and "120 s" in warning.getMessage()
        assert texts_to(limited_fake, 555) == []
    finally:
        await s.bot.session.close()


async def test_a_send_that_waited_meets_the_lease_gate_when_it_goes(
    limited_fake: FakeBotAPI, sender: Sender
) -> None:
    group = -4242
    for i in range(5):  # the group's burst (the margin holds the fifth back a moment)
        await sender.bot.send_message(group, f"burst {i}")
    waiting = asyncio.ensure_future(sender.bot.send_message(group, "queued while leading"))
    async with asyncio.timeout(WAIT):
        while not sender.limiter.waiting:
            await asyncio.sleep(0.01)
    assert sender.gate.lease is not None
    sender.gate.lease.lose("fenced: a newer leader holds the lock")
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(waiting, WAIT)
    assert "queued while leading" not in texts_to(limited_fake, group)


async def test_calls_that_do_not_send_into_a_chat_are_not_slowed(
    limited_fake: FakeBotAPI, sender: Sender
) -> None:
    sends = [asyncio.ensure_future(sender.bot.send_message(2000 + n, "x")) for n in range(60)]
    async with asyncio.timeout(WAIT):
        while sender.limiter.waiting < 20:
            await asyncio.sleep(0.01)
    started = time.monotonic()
    me = await sender.bot.get_me()
    assert me.id == BOT_ID and time.monotonic() - started < 0.5
    await asyncio.gather(*sends)


async def test_close_ends_the_waiting_sends_and_lets_the_one_on_the_wire_finish(
    limited_fake: FakeBotAPI, sender: Sender
) -> None:
    limited_fake.send_delay = 0.5  # the first send is on the wire when close() comes
    chat = 31337
    first = asyncio.ensure_future(sender.bot.send_message(chat, "on the wire"))
    second = asyncio.ensure_future(sender.bot.send_message(chat, "waiting"))
    async with asyncio.timeout(WAIT):
        while limited_fake.sending_now < 1:
            await asyncio.sleep(0.01)
    assert sender.control.close("the drain deadline passed") == 1
    with pytest.raises(SendsClosed):
        await asyncio.wait_for(second, WAIT)
    await asyncio.wait_for(first, WAIT)
    assert texts_to(limited_fake, chat) == ["on the wire"]
    with pytest.raises(SendsClosed):  # still closed for this term
        await sender.bot.send_message(chat, "after the deadline")
    assert sender.gate.lease is not None
    sender.gate.lease = Lease(2, verify=always, renew_deadline=3600.0)
    await sender.bot.send_message(chat, "next term")
    assert texts_to(limited_fake, chat) == ["on the wire", "next term"]


async def test_the_fake_refuses_what_telegram_would(limited_fake: FakeBotAPI) -> None:
    unlimited = flood.Rate(0.0, 1.0)
    s = Sender(limited_fake, flood.SendLimits(overall=unlimited, private=unlimited, group=unlimited,
                                              retry_max=0.0))
    try:
        for i in range(3):  # a private chat's burst
            await s.bot.send_message(99, f"ok {i}")
        with pytest.raises(TelegramRetryAfter) as caught:
            await s.bot.send_message(99, "one too many")
        assert caught.value.retry_after == 1
        results = await asyncio.gather(*(s.bot.send_message(5000 + n, "x") for n in range(40)),
                                       return_exceptions=True)
        refused = [r for r in results if isinstance(r, TelegramRetryAfter)]
        # 30 overall (three taken by chat 99), plus what refilled while the requests arrived.
        assert 5 <= len(refused) <= 40 - 27, len(refused)
        assert [r.limit for r in limited_fake.snapshot_refused()] == ["chat"] + ["overall"] * len(refused)
        assert "one too many" not in texts_to(limited_fake, 99)
    finally:
        await s.bot.session.close()


def test_which_calls_the_middleware_limits_and_how() -> None:
    from aiogram.methods import EditMessageText, GetMe, SendMessage

    gate = LeaseGate()
    control = FloodControl(FloodLimiter(flood.SendLimits(paid_broadcast=True)), gate)
    send = SendMessage(chat_id=7, text="x")
    assert control.target(send) == flood.Target("7", group=False, paid=True)
    assert send.allow_paid_broadcast is True, "SEND_PAID_BROADCAST: every send that can carry it"
    assert control.target(SendMessage(chat_id="@news", text="x")) == flood.Target("@news", group=True, paid=True)
    assert control.target(GetMe()) is None
    assert control.target(EditMessageText(inline_message_id="abc", text="x")) is None, "no chat"
    plain = FloodControl(FloodLimiter(flood.SendLimits()), gate)
    assert plain.target(SendMessage(chat_id=-100123, text="x")) == flood.Target("-100123", group=True)
