"""PASSIVE_NOTICE: one throttled "updating, back soon" text to a chat while nobody leads.

Pure bookkeeping (the receiver decides when the inbox says nobody leads): at most one notice per
chat per ``per_chat`` seconds, a bounded memory of whom it told. Only chats get it (never a
channel post's channel or an update without a chat). The text goes back as a method in the 200's
body, which Telegram executes: a passive replica never calls the Bot API itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiogram.dispatcher.middlewares.user_context import UserContextMiddleware
from aiogram.types import Update

#: A stored update nobody took for this long means no leader handles updates.
NOTICE_AFTER = 5.0
#: At most one notice per chat per this many seconds.
NOTICE_PER_CHAT = 60.0
#: Chats remembered at most (older entries are forgotten first).
NOTICE_MEMORY = 10_000


@dataclass
class PassiveNotice:
    text: str
    after: float = NOTICE_AFTER
    per_chat: float = NOTICE_PER_CHAT
    clock: Callable[[], float] = time.monotonic
    _told: dict[int, float] = field(default_factory=dict)

    @staticmethod
    def chat_of(update: Update) -> int | None:
        """The private or group chat to tell (None for channels and updates without a chat)."""
        chat = UserContextMiddleware.resolve_event_context(update).chat
        if chat is None or chat.type == "channel":
            return None
        return int(chat.id)

    def may_send(self, chat_id: int) -> bool:
        told = self._told.get(chat_id)
        return told is None or self.clock() - told >= self.per_chat

    def sent(self, chat_id: int) -> None:
        now = self.clock()
        self._told.pop(chat_id, None)
        self._told[chat_id] = now
        if len(self._told) > NOTICE_MEMORY:
            for old in [c for c, at in self._told.items() if now - at >= self.per_chat]:
                del self._told[old]
            while len(self._told) > NOTICE_MEMORY:  # all recent: forget the oldest
                del self._told[next(iter(self._told))]
