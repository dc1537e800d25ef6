"""The update pipeline end to end against the fake Bot API: real ``python main.py`` processes for
SIGTERM and kill -9 with a standby, the whole daemon in-process (tests/daemon.py) for the rest.

Per-chat order, no head-of-line blocking, nothing lost at SIGTERM or kill -9. Slow handlers are
made by the fake: its reply to a chat takes as long as the test says (the bot's handler waits
for it), so a "stuck" handler is one chat's reply that does not come back.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from testbed.fake_bot_api import FakeBotAPI
from tests.conftest import BOT_ID, BotProcess, start_pair, wait_until
from tests.daemon import StartDaemon, in_process, wait_for  # noqa: F401

Spawn = Callable[..., BotProcess]


class SlowChatsFake(FakeBotAPI):
    """The fake, with a reply delay per chat (or a random one) and a record of replies in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.chat_delay: dict[str, float] = {}
        self.random_delay: tuple[float, float] | None = None
        self.in_flight: set[int] = set()
        self.reply_started: dict[int, float] = {}

    async def _send(self, state: Any, params: dict[str, Any], tag: str, method: str,
                    extra: dict[str, Any]) -> Any:
        chat = str(params.get("chat_id", ""))
        delay = self.chat_delay.get(chat, 0.0)
        if self.random_delay is not None:
            delay += random.uniform(*self.random_delay)
        rp = params.get("reply_parameters")
        rp = json.loads(rp) if isinstance(rp, str) else rp
        reply_to = int(rp["message_id"]) if isinstance(rp, dict) and "message_id" in rp else None
        if reply_to is not None:
            self.in_flight.add(reply_to)
            self.reply_started.setdefault(reply_to, time.time())
        try:
            if delay:
                await asyncio.sleep(delay)
            return await super()._send(state, params, tag, method, extra)
        finally:
            if reply_to is not None:
                self.in_flight.discard(reply_to)


@pytest.fixture
def fake() -> Iterator[SlowChatsFake]:
    server = SlowChatsFake()
    server.start_in_thread()
    yield server
    server.stop_thread()


def pongs(fake: FakeBotAPI) -> Counter[int | None]:
    return Counter(s.reply_to for s in fake.snapshot_sent() if s.text == "pong")


def replies_by_chat(fake: FakeBotAPI) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for s in fake.snapshot_sent():
        if s.text == "pong" and s.reply_to is not None:
            out[s.chat_id].append(s.reply_to)
    return out


async def test_replies_keep_each_chats_order(fake: SlowChatsFake, in_process: StartDaemon) -> None:  # noqa: F811
    """10 chats x 30 numbered messages, interleaved, handlers of random 0-50 ms."""
    fake.random_delay = (0.0, 0.05)
    a = await in_process("a")
    await a.wait_mode("active")
    sent: dict[str, list[int]] = defaultdict(list)
    for _ in range(30):
        for chat in range(1, 11):
            sent[str(chat)].append(fake.send_user_message(BOT_ID, "/ping", user_id=chat, chat_id=chat))
    await wait_for(lambda: sum(pongs(fake).values()) >= 300, 60, message="300 replies")
    got = replies_by_chat(fake)
    for chat_id, ids in sent.items():
        assert got[chat_id] == ids, f"chat {chat_id} answered out of order: {got[chat_id]}"
    assert all(n == 1 for n in pongs(fake).values())


async def test_stuck_chat_blocks_nobody_else(fake: SlowChatsFake, in_process: StartDaemon) -> None:  # noqa: F811
    """One chat's handler hangs; 200 pings from other chats at 50/s are all answered promptly."""
    stuck_for = 8.0
    fake.chat_delay["999"] = stuck_for
    a = await in_process("a", HANDLER_WARN_SECONDS="2")
    await a.wait_mode("active")
    stuck = fake.send_user_message(BOT_ID, "/ping", user_id=999, chat_id=999)
    await wait_for(lambda: stuck in fake.in_flight, message="the stuck handler is running")
    fake.chat_delay.clear()  # only that one reply hangs; the chat's next one is quick
    after_stuck = fake.send_user_message(BOT_ID, "/ping", user_id=999, chat_id=999)
    sent_at: dict[int, float] = {}
    for i in range(200):
        chat = 1 + i % 7
        mid = fake.send_user_message(BOT_ID, "/ping", user_id=chat, chat_id=chat)
        sent_at[mid] = time.time()
        await asyncio.sleep(0.02)  # pacing the stream at 50/s, not synchronisation
    await wait_for(lambda: all(fake.replies_to(m) for m in sent_at), 20, message="every other chat answered")
    latencies = sorted(fake.replies_to(m)[0].at - t for m, t in sent_at.items())
    p99 = latencies[int(0.99 * len(latencies)) - 1]
    print(f"\nstuck chat: 200 pings from other chats, p50 {statistics.median(latencies) * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms")
    assert p99 < 1.0
    assert not fake.replies_to(after_stuck), "the stuck chat's next message waits for it"
    await wait_for(lambda: fake.replies_to(after_stuck), stuck_for + 10, message="the stuck chat resumes")
    assert replies_by_chat(fake)["999"] == [stuck, after_stuck]
    log = a.log()
    assert log.count("still running after") == 1 and "c:999" in log, log


def test_sigterm_with_handlers_slower_than_the_drain(fake: SlowChatsFake, spawn: Spawn) -> None:
    """Cancelled at the drain deadline: not lost, the standby runs them (attempt 2)."""
    fake.send_delay = 3.0
    a, b = start_pair(spawn, DRAIN_TIMEOUT="1", SHUTDOWN_TIMEOUT="4")
    pings = [fake.send_user_message(BOT_ID, "/ping", user_id=c, chat_id=c) for c in range(1, 6)]
    wait_until(lambda: len(fake.in_flight) == 5, message="five slow handlers running")
    t_term = time.monotonic()
    a.signal(signal.SIGTERM)
    assert a.wait_exit(10) == 0
    stopped_in = time.monotonic() - t_term
    print(f"\nSIGTERM with 3 s handlers, DRAIN_TIMEOUT=1: exit 0 after {stopped_in:.2f} s")
    assert stopped_in < 4.0 + 1.0, "within SHUTDOWN_TIMEOUT (plus process exit)"
    assert "cancelled; they stay in the inbox" in a.log()
    fake.send_delay = 0.0
    wait_until(lambda: all(fake.replies_to(m) for m in pings), 20, message="the standby answers them")
    counts = pongs(fake)
    assert [counts[m] for m in pings] == [1] * 5
    assert {s.tag for s in fake.snapshot_sent()} == {"b"}
    health = b.health()
    assert health is not None and health["updates"]["redelivered"] == 5


def test_kill9_mid_burst_loses_nothing_doubles_only_the_unrecorded(fake: SlowChatsFake, spawn: Spawn) -> None:
    fake.send_delay = 0.2
    a, b = start_pair(spawn)
    pings = [fake.send_user_message(BOT_ID, "/ping", user_id=1 + i % 20, chat_id=1 + i % 20) for i in range(120)]
    wait_until(lambda: sum(pongs(fake).values()) >= 40, 30, message="the burst under way")
    t_kill = time.time()
    a.signal(signal.SIGKILL)
    a.wait_exit()
    wait_until(lambda: all(fake.replies_to(m) for m in pings), 30, message="nothing lost")
    wait_until(lambda: b.health() is not None and b.health()["updates"]["waiting"] == 0,  # type: ignore[index]
               message="b idle")
    counts = pongs(fake)
    doubled = [m for m in pings if counts[m] > 1]
    first_reply = {m: min(s.at for s in fake.replies_to(m)) for m in doubled}
    print(f"\nkill -9 mid-burst: {len(doubled)} doubled of {len(pings)}")
    # A double is an update whose reply went out just before the kill, before its done mark was
    # committed (group commit within milliseconds): never an older one.
    late = {m: t_kill - t for m, t in first_reply.items() if t_kill - t > 0.5}
    assert not late, f"doubled long after their first reply: {late}"
    assert len(doubled) <= 16


async def test_update_ids_that_restart_are_followed_not_skipped(fake: SlowChatsFake,
                                                                in_process: StartDaemon) -> None:  # noqa: F811
    """The same STATE_DIR, ids starting again far below the stored offset: every update answered once."""
    a = await in_process("a")
    await a.wait_mode("active")
    before = [fake.send_user_message(BOT_ID, "/ping", user_id=c, chat_id=c) for c in range(1, 31)]
    await wait_for(lambda: all(fake.replies_to(m) for m in before), 20, message="the first 30 answered")
    t_restart = time.time()
    fake.restart_update_ids(BOT_ID, 5)
    after = [fake.send_user_message(BOT_ID, "/ping", user_id=c, chat_id=c) for c in range(1, 31)]
    await wait_for(lambda: all(fake.replies_to(m) for m in after), 20, message="the 30 with restarted ids")
    counts = pongs(fake)
    assert [counts[m] for m in before + after] == [1] * 60
    log = a.log()
    assert log.count("update ids restarted") == 1, log
    polls_since = [p for p in fake.snapshot_polls() if p.started >= t_restart]
    assert len(polls_since) <= 10, f"no hot loop: {len(polls_since)} getUpdates after the restart"


#: "At once" for a retry in a test on a loaded machine: well below the 5 s a conflict backoff waits.
AT_ONCE = 1.5


async def test_one_stray_409_costs_nothing(fake: SlowChatsFake, in_process: StartDaemon) -> None:  # noqa: F811
    """A single 409 with a verified lease: retried at once; repeated 409s still back off."""
    a = await in_process("a")
    await a.wait_mode("active")
    await wait_for(lambda: any(p.tag == "a" and p.outcome == "pending" for p in fake.snapshot_polls()),
                   message="a long-polls")
    fake.inject_conflict(BOT_ID, 1)
    conflict = await wait_for(lambda: next((p for p in fake.snapshot_polls() if p.outcome == "conflict"), None),
                              message="the stray 409")
    ended = conflict.ended
    assert ended is not None
    retry = await wait_for(lambda: next((p for p in fake.snapshot_polls()
                                         if p.tag == "a" and p.started >= ended and p.outcome != "conflict"),
                                        None), 5, message="the next getUpdates")
    print(f"\none stray 409: next getUpdates {(retry.started - ended) * 1000:.0f} ms later")
    assert retry.started - ended < AT_ONCE, "retried at once, not after the 5 s conflict backoff"
    assert "Backing off" not in a.log()
    ping = fake.send_user_message(BOT_ID, "/ping")
    await wait_for(lambda: fake.replies_to(ping), message="still answering")
    # Persistent conflicts (an outside poller): the second in a row backs off 5 s and says so once.
    fake.inject_conflict(BOT_ID, 3)
    await wait_for(lambda: "Backing off" in a.log(), 10, message="the backoff WARNING")
    await wait_for(lambda: len([p for p in fake.snapshot_polls() if p.outcome == "conflict"]) >= 4, 20,
                   message="the third injected 409")
    conflicts = [p for p in fake.snapshot_polls() if p.outcome == "conflict"]
    gap = conflicts[3].started - (conflicts[2].ended or conflicts[2].started)
    assert gap >= 4.9, f"backoff starts at 5 s, got {gap:.2f} s"
    assert a.log().count("Backing off") == 1
