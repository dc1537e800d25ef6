"""Send limits end to end: the issue's burst on both backends (the whole daemon in-process,
tests/daemon.py), and a SIGTERM handover while replies wait for their slots (real processes: a
standby takes over and answers what the old leader did not send)."""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from collections.abc import Callable

import pytest

from testbed.fake_bot_api import FakeBotAPI, SendLimits, Sent, flood_burst, limits_allow
from testbed.waiting import wait_until
from tests.conftest import BOT_ID, BotProcess
from tests.daemon import StartDaemon, in_process, wait_for  # noqa: F401
from tests.test_postgres import pg, pg_env  # noqa: F401 - the fixture, for the PostgreSQL backend

Spawn = Callable[..., BotProcess]
#: Telegram's limits back on (the harness turns the bot's off for the other tests).
TELEGRAM_LIMITS = {"SEND_OVERALL_PER_SECOND": "30", "SEND_PRIVATE_PER_SECOND": "1",
                   "SEND_GROUP_PER_MINUTE": "20"}
def replies_in_order(fake: FakeBotAPI, items: list[tuple[str, int, int]], ids: list[int]) -> list[str]:
    """The chats whose replies did not go out in the order of their messages."""
    asked: dict[str, list[int]] = defaultdict(list)
    for (_, _, chat), mid in zip(items, ids, strict=True):
        asked[str(chat)].append(mid)
    answered: dict[str, list[int | None]] = defaultdict(list)
    for sent in fake.snapshot_sent():
        answered[sent.chat_id].append(sent.reply_to)
    return [chat for chat, mids in asked.items() if answered[chat] != mids]


@pytest.mark.xdist_group("timing")
@pytest.mark.parametrize("backend", ["file", "postgres"])
async def test_the_burst_is_answered_once_in_order_close_to_the_limits(
    fake: FakeBotAPI, in_process: StartDaemon, backend: str, request: pytest.FixtureRequest  # noqa: F811
) -> None:
    fake.set_send_limits(SendLimits())
    env = dict(TELEGRAM_LIMITS)
    env.update(pg_env(request.getfixturevalue("pg")) if backend == "postgres" else {"DATABASE_URL": ""})
    a = await in_process("a", **env)
    await a.wait_mode("active")
    items = flood_burst()
    started = time.time()
    ids = fake.send_burst(BOT_ID, items)
    await wait_for(lambda: all(fake.replies_to(m) for m in ids), 60, message="every reply", interval=0.1)
    replies: list[Sent] = [r for m in ids for r in fake.replies_to(m)]
    took = max(r.at for r in replies) - started
    allowed = limits_allow(items, SendLimits())  # 316 / 30: the slowest group needs (8 - 5) * 3 s
    refused = fake.snapshot_refused()
    print(f"\nburst ({backend}): {len(items)} replies in {took:.2f} s (limits allow {allowed:.2f} s, "
          f"{took / allowed:.2f}x), {len(refused)} 429s")
    assert len(replies) == len(items), "every reply once"
    assert replies_in_order(fake, items, ids) == []
    assert len(refused) <= 5, refused
    assert took <= 1.1 * allowed, f"{took:.2f} s where the limits allow {allowed:.2f} s"
    metrics = (await a.get("/metrics"))[1].decode()
    assert f"solobot_telegram_rate_limited_total {float(len(refused))}" in metrics
    assert "solobot_send_wait_seconds_count 316.0" in metrics


@pytest.mark.xdist_group("timing")
def test_sigterm_while_100_replies_wait_hands_them_to_the_standby(fake: FakeBotAPI, spawn: Spawn) -> None:
    fake.set_send_limits(SendLimits())
    env = {**TELEGRAM_LIMITS, "DATABASE_URL": "", "DRAIN_TIMEOUT": "2"}
    # The old leader sends 5 a second: a hundred replies queue up behind its own limit.
    a = spawn("a", **{**env, "SEND_OVERALL_PER_SECOND": "5", "SEND_OVERALL_BURST": "1"})
    a.wait_mode("active")
    b = spawn("b", **env)
    b.wait_mode("passive")
    ids = fake.send_burst(BOT_ID, [("/ping", 30_000 + n, 30_000 + n) for n in range(100)])
    health = wait_until(lambda: (h := a.health()) and h["sends"]["waiting"] >= 80 and h, 30,
                        message="replies waiting for their slots")
    assert health["sends"]["waiting"] <= 100
    a.signal(signal.SIGTERM)
    assert a.wait_exit() == 0
    b.wait_mode("active")
    wait_until(lambda: all(fake.replies_to(m) for m in ids), 30, message="every ping answered")
    answers = {m: fake.replies_to(m) for m in ids}
    twice = {m: [s.tag for s in r] for m, r in answers.items() if len(r) != 1}
    assert twice == {}, "every ping answered exactly once"
    by_a = [s for r in answers.values() for s in r if s.tag == "a"]
    by_b = [s for r in answers.values() for s in r if s.tag == "b"]
    assert by_a and len(by_b) >= 50, (len(by_a), len(by_b))
    b_first_call = min(at for tag, _, at in fake.calls if tag == "b")
    assert max(s.at for s in by_a) < b_first_call, "the old leader sent nothing after it let go"
    assert "still waiting for their slot at the drain deadline" in a.log()
    assert fake.snapshot_refused() == []
