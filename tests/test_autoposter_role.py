"""The autoposter's role and the non-admin refusal, in-process: a fake bot, a fake store, no sockets.

The end-to-end runs (tests/test_autoposter.py) show the paths through real processes; these show
every way a send can end, in milliseconds: each Telegram error leaves the post in a definite state
(never ``sending``), and the schedule chain fires what utils/autoposter/schedule.py computes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiogram import Bot
from aiogram.exceptions import (
    ClientDecodeError,
    TelegramAPIError,
    TelegramBadRequest,
    TelegramConflictError,
    TelegramEntityTooLarge,
    TelegramForbiddenError,
    TelegramMigrateToChat,
    TelegramNetworkError,
    TelegramNotFound,
    TelegramRetryAfter,
    TelegramServerError,
    TelegramUnauthorizedError,
)
from aiogram.methods import SendMessage
from aiogram.types import Message

import bot
from utils.autoposter.role import Autoposter
from utils.state.store import Post

TOKEN = "123456:" + "S" * 35
CHANNEL = "@solochan"
ADMIN = 111
METHOD = SendMessage(chat_id=CHANNEL, text="x")
EPOCH = 7
#: Generous bounds for a loaded 2-core machine; the waits end on a positive marker well before.
WAIT = 10.0


class FakeStore:
    """The StateStore calls the role makes, in memory."""

    def __init__(self) -> None:
        self.flags: dict[str, str] = {}
        self.served_slots: list[dt.datetime] = []  # every last_slot written, in order
        self.posts: dict[int, Post] = {}
        self.finished: list[tuple[int, str, int | None, str | None]] = []
        self.changed = asyncio.Event()

    def add(self, text: str) -> Post:
        post = Post(id=len(self.posts) + 1, status="queued", text=text, photo=None,
                    created_at=dt.datetime.now(dt.UTC), sent_at=None, message_id=None, error=None)
        self.posts[post.id] = post
        return post

    async def get_flag(self, name: str) -> str | None:
        return self.flags.get(name)

    async def set_flag(self, name: str, value: str, epoch: int | None = None) -> None:
        self.flags[name] = value
        if name == "last_slot":
            self.served_slots.append(dt.datetime.fromisoformat(value))
        self.changed.set()

    async def mark_interrupted_uncertain(self, epoch: int) -> list[Post]:
        return []

    async def claim_post(self, epoch: int, post_id: int | None = None) -> Post | None:
        queued = [p for p in self.posts.values() if p.status == "queued" and post_id in (None, p.id)]
        if not queued:
            return None
        post = dataclasses.replace(queued[0], status="sending")
        self.posts[post.id] = post
        return post

    async def finish_post(self, post_id: int, epoch: int, *, status: str, message_id: int | None = None,
                          error: str | None = None) -> None:
        assert self.posts[post_id].status == "sending"
        self.posts[post_id] = dataclasses.replace(self.posts[post_id], status=status,
                                                  message_id=message_id, error=error)
        self.finished.append((post_id, status, message_id, error))
        self.changed.set()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


Behaviour = Exception | Callable[[], Any] | None


class FakeBot:
    """Channel sends follow a script (an exception to raise, or None to succeed); admin sends are kept."""

    token = TOKEN

    def __init__(self, *script: Behaviour) -> None:
        self.script = list(script)
        self.channel_calls = 0
        self.to_admins: list[str] = []
        self.called = asyncio.Event()
        self.hold: asyncio.Event | None = None  # set: channel sends wait on it

    async def send_message(self, chat_id: int | str, text: str) -> Any:
        if chat_id != CHANNEL:
            self.to_admins.append(text)
            return SimpleNamespace(message_id=0)
        self.channel_calls += 1
        self.called.set()
        if self.hold is not None:
            await self.hold.wait()
        behaviour = self.script.pop(0) if self.script else None
        if isinstance(behaviour, Exception):
            raise behaviour
        return SimpleNamespace(message_id=1000 + self.channel_calls)

    async def send_photo(self, chat_id: int | str, *, photo: str, caption: str | None) -> Any:
        return await self.send_message(chat_id, caption or "")


def make_poster(fake: FakeBot, store: FakeStore, **schedule: Any) -> Autoposter:
    poster = Autoposter(
        cast(Bot, fake), cast(Any, store), channel_id=CHANNEL,
        post_cron=schedule.get("cron"), post_interval=schedule.get("interval", 3600.0),
        timezone="Europe/Berlin", misfire_grace=schedule.get("grace", 3600.0),
        admin_ids=frozenset({ADMIN}), step_down=lambda reason: None,
    )
    poster.epoch = EPOCH
    return poster


async def publish_one(*script: Behaviour) -> tuple[FakeStore, FakeBot]:
    fake, store = FakeBot(*script), FakeStore()
    store.add("hello")
    await make_poster(fake, store)._publish(None)
    return store, fake


# -- every send ends in a definite state ------------------------------------------------------------


@pytest.mark.parametrize("exc", [
    TelegramBadRequest(METHOD, "Bad Request: chat not found"),
    TelegramForbiddenError(METHOD, "Forbidden: bot is not a member of the channel chat"),
    TelegramNotFound(METHOD, "Not Found"),
    TelegramUnauthorizedError(METHOD, "Unauthorized"),
    TelegramConflictError(METHOD, "Conflict"),
    TelegramEntityTooLarge(METHOD, "Request Entity Too Large"),  # a TelegramNetworkError subclass
    TelegramMigrateToChat(METHOD, "group upgraded", migrate_to_chat_id=-100123),
], ids=lambda e: type(e).__name__)
async def test_refusals_fail_the_post_and_tell_admins(exc: Exception) -> None:
    store, fake = await publish_one(exc)
    [(post_id, status, message_id, error)] = store.finished
    assert (post_id, status, message_id) == (1, "failed", None)
    assert error == cast(TelegramAPIError, exc).message
    [notice] = fake.to_admins
    assert notice.startswith("Post #1 failed: ") and "/retry" not in notice


@pytest.mark.parametrize("exc,shown", [
    (TelegramNetworkError(METHOD, "ClientConnectorError: connection reset"), "connection reset"),
    (TimeoutError(), "TimeoutError"),
    (TelegramServerError(METHOD, "Bad Gateway"), "Bad Gateway"),
    (TelegramAPIError(METHOD, "ok false with status 200"), "ok false with status 200"),
    (ClientDecodeError("Failed to decode object", ValueError("x"), "<html>"), "Failed to decode"),
    (RuntimeError("boom"), "RuntimeError: boom"),
], ids=lambda e: type(e).__name__ if isinstance(e, Exception) else "")
async def test_midway_and_unexpected_errors_make_it_uncertain(exc: Exception, shown: str) -> None:
    store, fake = await publish_one(exc)
    [(_, status, _, error)] = store.finished
    assert status == "uncertain" and error is not None and shown in error
    [notice] = fake.to_admins
    assert notice.startswith("Post #1 uncertain: ") and notice.endswith("/retry 1 sends it again.")


async def test_the_token_never_reaches_the_error_text() -> None:
    url = f"https://api.telegram.org/bot{TOKEN}/sendMessage"
    store, fake = await publish_one(TelegramNetworkError(METHOD, f"InvalidURL: {url}"))
    [(_, status, _, error)] = store.finished
    assert status == "uncertain" and error is not None
    assert TOKEN not in error and TOKEN.partition(":")[2] not in error and "123456:***" in error
    assert all(TOKEN.partition(":")[2] not in text for text in fake.to_admins)


async def test_a_rate_limit_the_session_gave_up_on_fails_the_post_after_one_call() -> None:
    """The session waits 429s out (utils/sending); one that reaches the role outlasted
    SEND_RETRY_MAX_SECONDS: the post was not sent, and the role has no retry loop of its own."""
    store, fake = await publish_one(TelegramRetryAfter(METHOD, "Too Many Requests", retry_after=3600),
                                    None)
    [(_, status, _, error)] = store.finished
    assert status == "failed" and error is not None and "3600 s" in error
    assert fake.channel_calls == 1


class WaitingSlots:
    """The flood limiter as the role sees it: every send is still waiting for its slot."""

    def holds(self, task: asyncio.Task[Any]) -> bool:
        return True


async def test_stop_while_the_post_waits_for_its_send_slot_gives_it_back_to_the_queue() -> None:
    fake, store = FakeBot(), FakeStore()
    fake.hold = asyncio.Event()  # never set: the send waits (in the session's limiter)
    store.add("hello")
    poster = make_poster(fake, store)
    poster.sends = WaitingSlots()
    poster._track(poster._publish(None))
    async with asyncio.timeout(WAIT):
        await fake.called.wait()
    async with asyncio.timeout(WAIT):
        await poster.stop(voluntary=True)
    assert store.finished == [(1, "queued", None, "this instance stopped while the post waited for its send slot")]
    assert fake.to_admins == []


async def test_a_send_cancelled_midway_is_marked_uncertain() -> None:
    fake, store = FakeBot(), FakeStore()
    fake.hold = asyncio.Event()  # never set: the send hangs
    store.add("hello")
    task = asyncio.ensure_future(make_poster(fake, store)._publish(None))
    async with asyncio.timeout(WAIT):
        await fake.called.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.finished == [(1, "uncertain", None, "the send was cancelled midway")]


# -- the schedule chain ---------------------------------------------------------------------------


async def test_handover_catch_up_then_the_chain_keeps_the_interval_grid() -> None:
    """A missed slot within the grace: one post at once, then slots on the grid, each recorded."""
    fake, store = FakeBot(), FakeStore()
    for i in range(3):
        store.add(f"post {i}")
    interval = 0.5
    poster = make_poster(fake, store, interval=interval)
    started = dt.datetime.now(dt.UTC)
    store.flags["last_slot"] = (started - dt.timedelta(seconds=2)).isoformat()
    await poster.start(SimpleNamespace(epoch=EPOCH))
    try:
        await store.wait_for(lambda: len(store.finished) == 3 and len(store.served_slots) >= 3)
    finally:
        await poster.stop(voluntary=True)
    assert [status for _, status, _, _ in store.finished] == ["sent"] * 3
    assert poster.state == "standby" and poster.armed_slot is None
    catch_up, *regular = store.served_slots
    assert catch_up >= started, "the catch-up is served at activation, not at the missed slot"
    # After it, the slots stored are on its grid: whole intervals apart, whatever the firing lag
    # (a slot that fired late by more than an interval is skipped, never doubled up).
    steps = [(b - a).total_seconds() / interval for a, b in zip(store.served_slots, regular, strict=False)]
    assert all(step >= 1 and step == pytest.approx(round(step)) for step in steps), steps


async def test_cron_start_arms_the_next_wall_clock_slot() -> None:
    fake, store = FakeBot(), FakeStore()
    poster = make_poster(fake, store, cron="30 2 * * *", interval=None)
    await poster.start(SimpleNamespace(epoch=EPOCH))
    try:
        armed = poster.armed_slot
        assert armed is not None and armed.strftime("%H:%M") == "02:30" and armed > dt.datetime.now(dt.UTC)
        assert [s.strftime("%H:%M") for s in poster.upcoming(3)] == ["02:30"] * 3
        assert "cron '30 2 * * *' in Europe/Berlin" in await poster.describe_schedule()
    finally:
        await poster.stop(voluntary=True)


# -- non-admins: one refusal a day for plain text ---------------------------------------------------


class FakeMessage:
    def __init__(self, user_id: int, text: str | None = "hello") -> None:
        self.from_user = SimpleNamespace(id=user_id)
        self.chat = SimpleNamespace(id=user_id)
        self.text = text
        self.caption = None
        self.photo = None if text else [SimpleNamespace(file_id="F")]
        self.answers: list[str] = []

    async def answer(self, text: str) -> None:
        self.answers.append(text)


@pytest.fixture
def today(monkeypatch: pytest.MonkeyPatch) -> list[dt.date]:
    """The date the refusal memory sees; tests move it on."""
    day = [dt.date(2024, 6, 1)]
    monkeypatch.setattr(bot, "refused_today", bot.OncePerDay(today=lambda: day[0]))
    return day


ADMINS = frozenset({ADMIN})


async def refusals(user_id: int, *, photo: bool = False, command: bool = False) -> int:
    message = FakeMessage(user_id, text=None if photo else "hello")
    handler = bot.cmd_queue if command else bot.any_photo if photo else bot.any_text
    await handler(cast(Message, message), ADMINS, None)
    return message.answers.count(bot.REFUSAL)


async def test_plain_text_and_photos_are_refused_once_a_day_per_user(today: list[dt.date]) -> None:
    assert [await refusals(42), await refusals(42), await refusals(42, photo=True)] == [1, 0, 0]
    assert await refusals(43) == 1, "another user is told too"
    today[0] += dt.timedelta(days=1)
    assert [await refusals(42), await refusals(42)] == [1, 0]


async def test_explicit_commands_are_always_answered(today: list[dt.date]) -> None:
    assert [await refusals(42, command=True) for _ in range(3)] == [1, 1, 1]
    assert await refusals(42) == 1, "a command does not use up the plain-text notice"


async def test_admins_are_not_refused(today: list[dt.date]) -> None:
    message = FakeMessage(ADMIN)
    await bot.any_text(cast(Message, message), ADMINS, None)
    assert message.answers == ["The autoposter is off: set CHANNEL_ID and POST_CRON or POST_INTERVAL."]


def test_refusal_memory_is_bounded() -> None:
    memory = bot.OncePerDay(capacity=2, today=lambda: dt.date(2024, 6, 1))
    assert [memory.first_today(u) for u in (1, 2, 3, 1)] == [True, True, False, False]
