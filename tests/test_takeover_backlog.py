"""A takeover with a backlog larger than one page: paged in, in each chat's order, and the chats
without a backlog are served at once (utils/updates/recovery.py)."""

from __future__ import annotations

import signal
from collections import defaultdict
from collections.abc import Callable

from testbed.fake_bot_api import FakeBotAPI
from tests.conftest import BOT_ID, BotProcess, start_pair, wait_until
from utils.updates.recovery import BACKLOG_AHEAD, BACKLOG_PAGE

Spawn = Callable[..., BotProcess]

#: More than what the new leader holds at once: several pages are claimed while it runs.
BACKLOG = BACKLOG_AHEAD + 2 * BACKLOG_PAGE
CHATS = 30
NEW_CHAT = 9999


def test_backlog_is_paged_in_each_chats_order_and_other_chats_go_first(fake: FakeBotAPI, spawn: Spawn) -> None:
    a, b = start_pair(spawn)
    fake.send_delay = 60.0  # a's handlers hang: the burst piles up in the inbox
    items = [("/ping", 1 + i % CHATS, 1 + i % CHATS) for i in range(BACKLOG)]
    sent = fake.send_burst(BOT_ID, items)
    wait_until(lambda: ((a.health() or {}).get("updates", {}).get("inbox_waiting") or 0) >= BACKLOG, 60,
               message=f"{BACKLOG} updates in the inbox")
    fake.send_delay = 0.0
    a.signal(signal.SIGKILL)
    b.wait_mode("active")
    fresh = fake.send_user_message(BOT_ID, "/ping", user_id=NEW_CHAT, chat_id=NEW_CHAT)
    wait_until(lambda: all(fake.replies_to(m) for m in [*sent, fresh]), 120, message="the backlog answered")
    by_chat: dict[str, list[int]] = defaultdict(list)  # b's replies (a's hung ones may land late)
    for s in fake.snapshot_sent():
        if s.tag == b.name and s.reply_to is not None:
            by_chat[s.chat_id].append(s.reply_to)
    for chat in range(1, CHATS + 1):
        expected = [m for m, (_, _, c) in zip(sent, items, strict=True) if c == chat]
        assert by_chat[str(chat)] == expected, f"chat {chat} out of order"
    last_backlog_reply = max(s.at for s in fake.snapshot_sent() if s.chat_id != str(NEW_CHAT))
    assert fake.replies_to(fresh)[0].at < last_backlog_reply, "a chat without a backlog does not wait for it"
    log = b.log()
    assert log.count("resuming ") >= 3, log  # paged in: at least three pages
