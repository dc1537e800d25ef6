"""A suspect of two deaths that is merely slow (not poison) runs alone only for HANDLER_WARN_SECONDS;
then the other chats run beside it, and it is never set aside."""

from __future__ import annotations

import signal
from collections.abc import Callable

from tests.conftest import BOT_ID, BotProcess, wait_until
from tests.test_pipeline import SlowChatsFake, fake  # noqa: F401 - the fixture: a fake with slow chats

Spawn = Callable[..., BotProcess]

SLOW_CHAT = 42
SLOW_FOR = 10.0  # the slow chat's reply takes this long: it outlives two leaders, and the third
# answers the other chats beside it before it ends (in well under a second on a quiet machine)
WARN = "1"  # HANDLER_WARN_SECONDS


def test_a_slow_suspect_holds_the_other_chats_only_for_a_while(
        fake: SlowChatsFake, spawn: Spawn) -> None:  # noqa: F811 - the fixture imported above
    env = {"HANDLER_WARN_SECONDS": WARN, "POISON_AFTER": "2"}
    a = spawn("a", **env)
    a.wait_mode("active")
    b, c = spawn("b", **env), spawn("c", **env)
    b.wait_mode("passive")
    c.wait_mode("passive")
    fake.chat_delay[str(SLOW_CHAT)] = SLOW_FOR
    slow = fake.send_user_message(BOT_ID, "/ping", user_id=SLOW_CHAT, chat_id=SLOW_CHAT)
    wait_until(lambda: slow in fake.in_flight, message="the slow handler runs on a")
    a.signal(signal.SIGKILL)  # death 1 (normal running: nothing recorded)
    wait_until(lambda: "the last leader died" in b.log() + c.log(), 30, message="a takeover")
    second = b if "the last leader died" in b.log() else c
    third = c if second is b else b
    second.wait_mode("active")
    wait_until(lambda: f"(c:{SLOW_CHAT}) still running after" in second.log(), 30,
               message="the slow handler runs again, under a started record")
    second.signal(signal.SIGKILL)  # death 2: the slow update was running, with others possibly
    third.wait_mode("active")
    wait_until(lambda: "run one at a time first" in third.log(), 30, message="the slow update is a suspect")
    wait_until(lambda: "a suspect of a death running alone, still running" in third.log(), 30,
               message="the alone phase ends after HANDLER_WARN_SECONDS")
    others = [fake.send_user_message(BOT_ID, "/ping", user_id=chat, chat_id=chat) for chat in range(1, 6)]
    wait_until(lambda: all(fake.replies_to(m) for m in others), SLOW_FOR, message="the other chats answered beside it")
    assert slow in fake.in_flight, "the other chats did not wait for the slow suspect"
    wait_until(lambda: fake.replies_to(slow), SLOW_FOR + 20, message="the slow update finishes")
    assert "set aside" not in third.log()
