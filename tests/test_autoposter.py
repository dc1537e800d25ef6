"""The autoposter end to end, the fake Bot API as the channel, SQLite state: real processes where a
signal, kill -9 or a standby is the point; the whole daemon in-process (tests/daemon.py) for the rest."""

from __future__ import annotations

import itertools
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from testbed.fake_bot_api import FakeBotAPI, Sent
from tests.conftest import ADMIN_ID, BOT_ID, BotProcess, start_pair, wait_until
from tests.daemon import StartDaemon, in_process, wait_for  # noqa: F401

Spawn = Callable[..., BotProcess]
CHANNEL = "@solochan"
POSTER = {"CHANNEL_ID": CHANNEL, "POST_INTERVAL": "1"}
#: Posts queued for a failover: three from the first leader before it goes, the rest (three or
#: more: a catch-up and on-schedule ones) from its standby.
FAILOVER_POSTS = 6


def channel_posts(fake: FakeBotAPI) -> list[Sent]:
    return [s for s in fake.snapshot_sent() if s.chat_id == CHANNEL]


def say_as_admin(fake: FakeBotAPI, text: str, expect: str, user: int) -> Callable[[], str | None]:
    """Send *text* as *user*; the returned check finds the bot's answer that contains *expect*."""
    before = len(fake.snapshot_sent())
    fake.send_user_message(BOT_ID, text, user_id=user)

    def answer() -> str | None:
        for s in fake.snapshot_sent()[before:]:
            if s.chat_id == str(user) and s.text and expect in s.text:
                return s.text
        return None

    return answer


def admin_says(fake: FakeBotAPI, text: str, *, expect: str, user: int = ADMIN_ID) -> str:
    """Send *text* as *user* and return the bot's answer that contains *expect*."""
    answer = say_as_admin(fake, text, expect, user)
    return str(wait_until(answer, 15, message=f"an answer with {expect!r} to {text[:30]!r}"))


async def admin_says_async(fake: FakeBotAPI, text: str, *, expect: str, user: int = ADMIN_ID) -> str:
    """:func:`admin_says` for a test whose daemon runs in-process (on the test's loop)."""
    answer = say_as_admin(fake, text, expect, user)
    return str(await wait_for(answer, 15, message=f"an answer with {expect!r} to {text[:30]!r}"))


def post_rows(state_dir: Path) -> list[tuple[int, str, str]]:
    path = state_dir / "solobot.sqlite3"
    if not path.exists():
        return []
    with sqlite3.connect(path, timeout=10) as db:
        return [(int(r[0]), str(r[1]), str(r[2])) for r in
                db.execute("SELECT id, status, text FROM solobot_posts ORDER BY id")]


def all_sent(state_dir: Path, count: int) -> bool:
    """*count* posts on record, each of them sent."""
    return [status for _, status, _ in post_rows(state_dir)] == ["sent"] * count


def last_slot(state_dir: Path) -> str | None:
    """The autoposter's record of the last slot it served (paused or not)."""
    with sqlite3.connect(state_dir / "solobot.sqlite3", timeout=10) as db:
        row = db.execute("SELECT value FROM solobot_flags WHERE name = 'last_slot'").fetchone()
    return None if row is None else str(row[0])


def queue_paused(fake: FakeBotAPI, count: int) -> None:
    admin_says(fake, "/pause", expect="Paused")
    for i in range(1, count + 1):
        admin_says(fake, f"/post post {i}", expect="Queued post")


async def queue_paused_async(fake: FakeBotAPI, count: int) -> None:
    await admin_says_async(fake, "/pause", expect="Paused")
    for i in range(1, count + 1):
        await admin_says_async(fake, f"/post post {i}", expect="Queued post")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_failover_publishes_every_post_exactly_once(
    fake: FakeBotAPI, spawn: Spawn, shared_dirs: dict[str, Path], sig: signal.Signals
) -> None:
    a, _b = start_pair(spawn, **POSTER)
    queue_paused(fake, FAILOVER_POSTS)
    admin_says(fake, "/resume", expect="Resumed")
    wait_until(lambda: len(channel_posts(fake)) >= 3, 15, message="three posts")
    # Kill once the third is on record as sent (the kill lands between posts, not mid-send).
    wait_until(lambda: sum(1 for _, status, _ in post_rows(shared_dirs["state"]) if status == "sent") >= 3,
               message="third post marked sent")
    t_stop = time.time()
    a.signal(sig)
    wait_until(lambda: len(channel_posts(fake)) >= FAILOVER_POSTS, 30, message="every post")
    # The positive marker: every post is on record as sent and none is left to claim, so no
    # further (duplicate) post can be sent; only then count.
    wait_until(lambda: all_sent(shared_dirs["state"], FAILOVER_POSTS), message="all marked sent")
    posts = channel_posts(fake)
    texts = Counter(p.text for p in posts)
    assert texts == Counter({f"post {i}": 1 for i in range(1, FAILOVER_POSTS + 1)}), texts
    assert [p.text for p in posts] == [f"post {i}" for i in range(1, FAILOVER_POSTS + 1)], "in queue order"
    assert {p.tag for p in posts if p.at > t_stop} == {"b"}, "later ones from the former standby"
    assert all(p.tag == "a" for p in posts if p.at < t_stop)
    gaps = [round(b2.at - b1.at, 2) for b1, b2 in itertools.pairwise(posts)]
    print(f"\n{sig.name}: post gaps (s) {gaps}; from b: {sum(p.tag == 'b' for p in posts)}")
    assert all(g <= 2.5 for g in gaps), gaps
    # No burst: a new leader serves at most one catch-up post, which may land just before the next
    # slot (0.54 s late and 0.44 s before the next was seen), so two posts may be close, never three.
    spans = [round(later.at - first.at, 2) for first, later in zip(posts, posts[2:], strict=False)]
    assert all(s >= 1.0 for s in spans), (gaps, spans)
    if sig == signal.SIGTERM:
        assert a.wait_exit() == 0


async def test_queue_survives_restart_and_pause_persists(
    fake: FakeBotAPI, in_process: StartDaemon, shared_dirs: dict[str, Path]  # noqa: F811
) -> None:
    a = await in_process("a", **POSTER)
    await a.wait_mode("active")
    await queue_paused_async(fake, 3)
    assert await a.stop() == 0  # SIGTERM's path
    b = await in_process("b", **POSTER)
    await b.wait_mode("active")
    assert (await admin_says_async(fake, "/schedule", expect="Schedule")).count("Paused.") == 1
    assert "Next posts (paused" in await admin_says_async(fake, "/queue", expect="#")
    # The positive marker: two slots served by b while paused (the last-slot record moves on).
    first = await wait_for(lambda: last_slot(shared_dirs["state"]), 10, message="b serves a slot")
    await wait_for(lambda: last_slot(shared_dirs["state"]) not in (None, first), 10,
                   message="b serves another slot")
    assert channel_posts(fake) == [], "paused survives the restart"
    await admin_says_async(fake, "/resume", expect="Resumed")
    await wait_for(lambda: len(channel_posts(fake)) == 3, 15, message="the queued posts")
    assert [p.text for p in channel_posts(fake)] == ["post 1", "post 2", "post 3"]


async def test_non_admin_refused_and_long_text_refused(
    fake: FakeBotAPI, in_process: StartDaemon, shared_dirs: dict[str, Path]  # noqa: F811
) -> None:
    a = await in_process("a", **POSTER)
    await a.wait_mode("active")
    assert "only the bot's admins" in await admin_says_async(fake, "/post hello", expect="Sorry", user=4242)
    assert "only the bot's admins" in await admin_says_async(fake, "plain text", expect="Sorry", user=4242)
    # More plain text the same day gets no refusal; an explicit command still does. A chat's
    # updates are handled in order, so once the command is answered the text before it was too.
    fake.send_user_message(BOT_ID, "more plain text", user_id=4242)
    await admin_says_async(fake, "/queue", expect="Sorry", user=4242)
    refusals = [s for s in fake.snapshot_sent() if s.chat_id == "4242" and "only the bot's admins" in (s.text or "")]
    assert len(refusals) == 3, [s.text for s in refusals]
    answer = await admin_says_async(fake, "/post " + "x" * 4097, expect="Not queued")
    assert "4097" in answer and "4096" in answer
    assert post_rows(shared_dirs["state"]) == []
    assert "admins only" in await admin_says_async(fake, "/status", expect="admins", user=4242)
    status = await admin_says_async(fake, "/status", expect="mode:")
    assert "mode: active" in status and "autoposter: running" in status


async def test_admin_commands(fake: FakeBotAPI, in_process: StartDaemon,  # noqa: F811
                             shared_dirs: dict[str, Path]) -> None:
    a = await in_process("a", **POSTER)
    await a.wait_mode("active")
    await queue_paused_async(fake, 3)
    assert "Post #2 cancelled" in await admin_says_async(fake, "/cancel 2", expect="cancel")
    assert "is cancelled, not queued" in await admin_says_async(fake, "/cancel 2", expect="cancel")
    assert "no post #99" in await admin_says_async(fake, "/cancel 99", expect="post #99")
    await admin_says_async(fake, "/postnow 3", expect="Publishing post #3")
    await wait_for(lambda: [p.text for p in channel_posts(fake)] == ["post 3"], message="postnow while paused")
    queue = await admin_says_async(fake, "/queue", expect="#1")
    assert "#3" not in queue and "#2" not in queue
    fake.send_user_message(BOT_ID, "a photo caption", user_id=ADMIN_ID, photo=True)
    await wait_for(lambda: len(post_rows(shared_dirs["state"])) == 4, message="photo queued")


def test_interrupted_send_is_uncertain_and_reported(
    fake: FakeBotAPI, spawn: Spawn, shared_dirs: dict[str, Path]
) -> None:
    a, b = start_pair(spawn, **POSTER)
    queue_paused(fake, 2)
    fake.send_delay = 2.0  # the channel send hangs: kill it midway
    fake.send_user_message(BOT_ID, "/resume", user_id=ADMIN_ID)
    wait_until(lambda: any(status == "sending" for _, status, _ in post_rows(shared_dirs["state"])),
               message="a post in sending")
    wait_until(lambda: fake.sending_now >= 1, message="the send in flight")
    a.signal(signal.SIGKILL)
    b.wait_mode("active")
    fake.send_delay = 0
    notice = wait_until(lambda: next((s.text for s in fake.snapshot_sent()
                                       if s.chat_id == str(ADMIN_ID) and s.text and "may or may not" in s.text),
                                      None), 15, message="admins told")
    assert "/retry 1" in notice
    wait_until(lambda: [r[1] for r in post_rows(shared_dirs["state"])] == ["uncertain", "sent"], 15,
               message="the queue goes on past the uncertain post")
    assert [p.text for p in channel_posts(fake)].count("post 2") == 1
    admin_says(fake, "/retry 1", expect="queued again")
    wait_until(lambda: post_rows(shared_dirs["state"])[0][1] == "sent", 15, message="retried post sent")


async def test_chat_not_found_fails_post_and_tells_admins(
    fake: FakeBotAPI, in_process: StartDaemon, shared_dirs: dict[str, Path]  # noqa: F811
) -> None:
    a = await in_process("a", CHANNEL_ID="@missing_chan", POST_INTERVAL="1")
    await a.wait_mode("active")
    await admin_says_async(fake, "/post hello", expect="Queued")
    await admin_says_async(fake, "/post again", expect="Queued")
    await wait_for(lambda: [r[1] for r in post_rows(shared_dirs["state"])] == ["failed", "failed"], 15,
                   message="both failed")
    notices = [s.text for s in fake.snapshot_sent() if s.text and "failed" in s.text]
    assert any("chat not found" in (t or "") for t in notices)


async def test_rate_limited_post_waits_retry_after(fake: FakeBotAPI, in_process: StartDaemon,  # noqa: F811
                                                   shared_dirs: dict[str, Path]) -> None:
    a = await in_process("a", **POSTER)
    await a.wait_mode("active")
    await queue_paused_async(fake, 1)
    fake.set_flood("sendMessage", 1, 2, chat_id=CHANNEL)  # the channel post meets one 429, retry_after=2
    resumed = time.time()
    fake.send_user_message(BOT_ID, "/resume", user_id=ADMIN_ID)
    await wait_for(lambda: channel_posts(fake), 15, message="the post after the 429")
    assert channel_posts(fake)[0].at - resumed >= 2.0
    await wait_for(lambda: [r[1] for r in post_rows(shared_dirs["state"])] == ["sent"], message="marked sent")


def test_missed_slots_give_one_catch_up_not_a_burst(
    fake: FakeBotAPI, spawn: Spawn, shared_dirs: dict[str, Path]
) -> None:
    a = spawn("a", **POSTER)
    a.wait_mode("active")
    queue_paused(fake, 1)
    admin_says(fake, "/resume", expect="Resumed")
    wait_until(lambda: len(channel_posts(fake)) == 1, message="first post")
    admin_says(fake, "/pause", expect="Paused")
    for i in range(2, 6):
        admin_says(fake, f"/post post {i}", expect="Queued post")
    admin_says(fake, "/resume", expect="Resumed")
    a.signal(signal.SIGKILL)
    a.wait_exit()
    time.sleep(3.5)  # the scenario itself: three or four slots pass with no instance running
    restarted = time.time()
    b = spawn("b", **POSTER)
    wait_until(lambda: len(channel_posts(fake)) >= 3, 20, message="catch-up then schedule")
    later = [p for p in channel_posts(fake) if p.at > restarted]
    assert later[1].at - later[0].at >= 0.8, "one catch-up, then back on schedule (no burst)"
    assert "catch-up post now" in b.log()


async def test_sigterm_mid_send_finishes_and_marks_the_post(
    fake: FakeBotAPI, in_process: StartDaemon, shared_dirs: dict[str, Path]  # noqa: F811
) -> None:
    """A stop request (SIGTERM's path, tests/daemon.py) in the middle of a channel send."""
    a = await in_process("a", **POSTER)
    await a.wait_mode("active")
    await queue_paused_async(fake, 1)
    fake.send_delay = 1.0  # the channel send is slow: the stop lands in the middle of it
    fake.send_user_message(BOT_ID, "/resume", user_id=ADMIN_ID)
    await wait_for(lambda: [r[1] for r in post_rows(shared_dirs["state"])] == ["sending"], 15, message="sending")
    await wait_for(lambda: fake.sending_now >= 1, message="the send in flight")
    assert await a.stop() == 0
    assert [r[1] for r in post_rows(shared_dirs["state"])] == ["sent"]
    assert [p.text for p in channel_posts(fake)] == ["post 1"]
