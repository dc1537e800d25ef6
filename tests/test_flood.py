"""The send limiter's pure plan: buckets, per-chat order, fairness, 429 pauses, deadlines (milliseconds)."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from utils.sending.flood import (
    ARRIVAL_MARGIN,
    DONE,
    FAILED,
    GRANTED,
    OVERALL_429_WINDOW,
    WAITING,
    Rate,
    SendLimits,
    SendPlan,
    Target,
    Ticket,
    TokenBucket,
    is_group,
    seconds_until,
    sends_into_chat,
)

PRIVATE = Target("1", group=False)
LIMITS = SendLimits()


def chat(n: int, *, group: bool = False) -> Target:
    return Target(str(-n if group else n), group=group)


def grant_all(plan: SendPlan, now: float) -> list[Ticket]:
    granted, _ = plan.grant(now)
    return granted


# -- buckets ---------------------------------------------------------------------------------

def test_bucket_burst_then_rate() -> None:
    bucket = TokenBucket(Rate(1.0, 3.0), now=0.0, margin=0.0)
    for _ in range(3):
        assert bucket.ready_at(0.0) == 0.0
        bucket.take(0.0)
    assert bucket.ready_at(0.0) == pytest.approx(1.0)
    assert bucket.ready_at(0.5) == pytest.approx(1.0)
    bucket.take(1.0)
    assert bucket.ready_at(1.0) == pytest.approx(2.0)
    assert not bucket.full(2.0)
    assert bucket.full(10.0), "refills up to its burst, never beyond"
    assert bucket.tokens == pytest.approx(3.0)


def test_bucket_margin_holds_back_a_little_of_the_burst_only() -> None:
    overall = TokenBucket(Rate(30.0, 30.0), now=0.0)
    assert overall.capacity == pytest.approx(30.0 - 30.0 * ARRIVAL_MARGIN)
    group = TokenBucket(Rate(20 / 60, 5.0), now=0.0)
    assert group.capacity == pytest.approx(5.0 - 20 / 60 * ARRIVAL_MARGIN)
    tiny = TokenBucket(Rate(1000.0, 1.0), now=0.0)
    assert tiny.capacity == 1.0, "never below one send"


def test_unlimited_bucket_is_always_ready() -> None:
    bucket = TokenBucket(Rate(0.0, 0.0), now=0.0)
    for _ in range(1000):
        bucket.take(0.0)
    assert bucket.ready_at(0.0) == 0.0 and bucket.full(0.0)


# -- which calls -----------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "limited"), [
    ("sendMessage", True), ("sendPhoto", True), ("sendMediaGroup", True), ("copyMessage", True),
    ("forwardMessage", True), ("forwardMessages", True), ("editMessageText", True),
    ("editMessageReplyMarkup", True), ("stopPoll", True), ("sendChatAction", False),
    ("getUpdates", False), ("getMe", False), ("answerCallbackQuery", False), ("setWebhook", False),
    ("deleteMessage", False), ("getChat", False),
])
def test_which_methods_send_into_a_chat(method: str, limited: bool) -> None:
    assert sends_into_chat(method) is limited


@pytest.mark.parametrize(("chat_id", "group"), [
    (12345, False), (-12345, True), (-1001234567890, True), ("@channel", True), ("777", False),
    ("-100777", True),
])
def test_groups_channels_and_private_chats(chat_id: int | str, group: bool) -> None:
    assert is_group(chat_id) is group


def test_seconds_until_counts_whole_seconds_at_least_one() -> None:
    assert seconds_until(10.0, 10.0) == 1
    assert seconds_until(12.2, 10.0) == 3


# -- order and fairness ----------------------------------------------------------------------

def test_one_send_per_chat_on_the_wire_in_the_order_made() -> None:
    plan = SendPlan(LIMITS, 0.0)
    a1, a2, a3 = (plan.submit(PRIVATE, 0.0) for _ in range(3))
    assert grant_all(plan, 0.0) == [a1], "the second waits for the first's answer"
    assert (a1.state, a2.state, plan.waiting) == (GRANTED, WAITING, 2)
    plan.finished(a1, 0.01)
    assert grant_all(plan, 0.01) == [a2]
    plan.finished(a2, 0.02)
    granted, wake = plan.grant(0.02)
    assert granted == [] and wake == pytest.approx(ARRIVAL_MARGIN), "the burst's last send, a margin later"
    assert grant_all(plan, ARRIVAL_MARGIN) == [a3]
    assert a1.state == DONE


def test_private_chat_rate_after_its_burst() -> None:
    plan = SendPlan(LIMITS, 0.0)
    tickets = [plan.submit(PRIVATE, 0.0) for _ in range(5)]
    now = 0.0
    times = []
    for ticket in tickets:
        while ticket.state == WAITING:
            granted, wake = plan.grant(now)
            if not granted:
                assert wake is not None
                now = wake
        times.append(now)
        plan.finished(ticket, now)
    assert times[:2] == [0.0, 0.0]
    assert times[2] == pytest.approx(ARRIVAL_MARGIN), "a burst of 3, the third held back by the margin"
    assert times[3] - times[2] == pytest.approx(1.0)
    assert times[4] - times[3] == pytest.approx(1.0)


def test_a_waiting_chat_never_delays_another() -> None:
    plan = SendPlan(LIMITS, 0.0)
    group = chat(1, group=True)
    for _ in range(8):
        plan.submit(group, 0.0)
    now = 0.0
    for _ in range(5):  # the group's burst
        granted, wake = plan.grant(now)
        if not granted:
            assert wake is not None and wake - now == pytest.approx(ARRIVAL_MARGIN)
            now = wake
            granted = grant_all(plan, now)
        plan.finished(granted[0], now)
    assert grant_all(plan, now) == [], "the group waits 3 s for its next slot"
    other = plan.submit(chat(2), now)
    assert grant_all(plan, now) == [other], "another chat goes at once"


def test_overall_budget_shared_round_robin() -> None:
    limits = SendLimits(overall=Rate(10.0, 10.0), private=Rate(0.0, 0.0))
    plan = SendPlan(limits, 0.0)
    hog = [plan.submit(chat(1), 0.0) for _ in range(100)]
    for n in range(2, 12):
        for _ in range(5):
            plan.submit(chat(n), 0.0)
    sent: list[str] = []
    now = 0.0
    while len(sent) < 55:
        granted, wake = plan.grant(now)
        for ticket in granted:
            sent.append(ticket.target.chat)
            plan.finished(ticket, now)
        if not granted:
            assert wake is not None
            now = wake
    assert sorted(sent[:11], key=int) == [str(n) for n in range(1, 12)], f"every chat had a turn: {sent}"
    assert sent[:55].count("1") == 5, f"the hog gets one turn in eleven: {sent}"
    assert hog[0].state == DONE and hog[10].state == WAITING


def test_paid_broadcasts_use_their_own_overall_budget() -> None:
    limits = SendLimits(overall=Rate(1.0, 1.0), private=Rate(0.0, 0.0), paid=Rate(1000.0, 1000.0))
    plan = SendPlan(limits, 0.0)
    free = [plan.submit(chat(n), 0.0) for n in range(1, 4)]
    paid = [plan.submit(Target(str(n), False, paid=True), 0.0) for n in range(10, 40)]
    granted = grant_all(plan, 0.0)
    assert sum(1 for t in granted if not t.target.paid) == 1, "free: one per second"
    assert all(t in granted for t in paid), "paid: up to its own budget"
    assert free[1].state == WAITING


def test_cancelled_waiting_send_leaves_no_trace() -> None:
    plan = SendPlan(LIMITS, 0.0)
    first = plan.submit(PRIVATE, 0.0)
    second = plan.submit(PRIVATE, 0.0)
    grant_all(plan, 0.0)
    plan.finished(second, 0.0)  # its waiter was cancelled
    assert plan.waiting == 0 and second.state == DONE
    plan.finished(first, 0.0)
    third = plan.submit(PRIVATE, 0.0)
    assert grant_all(plan, 0.0) == [third]


def test_idle_chats_are_forgotten_once_their_bucket_is_full() -> None:
    plan = SendPlan(LIMITS, 0.0)
    ticket = plan.submit(PRIVATE, 0.0)
    grant_all(plan, 0.0)
    plan.finished(ticket, 0.0)
    assert plan.chats == 1, "the bucket remembers the send"
    again = plan.submit(PRIVATE, 5.0)
    grant_all(plan, 5.0)
    plan.finished(again, 5.0)
    assert plan.chats == 1
    last = plan.submit(PRIVATE, 100.0)
    grant_all(plan, 100.0)
    plan.finished(last, 200.0)
    assert plan.chats == 0


# -- 429 -------------------------------------------------------------------------------------

def test_chat_429_pauses_only_that_chat_and_keeps_its_order() -> None:
    plan = SendPlan(LIMITS, 0.0)
    a1, a2 = plan.submit(chat(1), 0.0), plan.submit(chat(1), 0.0)
    [granted] = grant_all(plan, 0.0)
    assert granted is a1
    pause = plan.retry_after(a1, 5, 0.1)
    assert not pause.overall and pause.until == pytest.approx(5.1) and pause.expired == []
    assert a1.state == WAITING and plan.waiting == 2
    b = plan.submit(chat(2), 0.2)
    assert grant_all(plan, 0.2) == [b], "other chats keep flowing"
    granted_list, wake = plan.grant(0.3)
    assert granted_list == [] and wake == pytest.approx(5.1)
    assert grant_all(plan, 5.1) == [a1], "the refused send goes first, then the rest in order"
    plan.finished(a1, 5.2)
    assert grant_all(plan, 5.2) == [a2]
    assert plan.rate_limited == 1


def test_429s_of_two_chats_close_together_pause_everyone() -> None:
    plan = SendPlan(LIMITS, 0.0)
    a, b = plan.submit(chat(1), 0.0), plan.submit(chat(2), 0.0)
    grant_all(plan, 0.0)
    assert not plan.retry_after(a, 1, 0.0).overall
    pause = plan.retry_after(b, 1, 0.0 + OVERALL_429_WINDOW / 2)
    assert pause.overall
    c = plan.submit(chat(3), 0.6)
    granted, wake = plan.grant(0.6)
    assert granted == [] and wake == pytest.approx(1.5), "nobody sends during an overall pause"
    assert {t.target.chat for t in grant_all(plan, 1.5)} == {"1", "2", "3"}
    assert c.state == GRANTED


def test_429s_of_two_chats_far_apart_stay_per_chat() -> None:
    plan = SendPlan(LIMITS, 0.0)
    a = plan.submit(chat(1), 0.0)
    grant_all(plan, 0.0)
    plan.retry_after(a, 1, 0.0)
    b = plan.submit(chat(2), 5.0)
    grant_all(plan, 5.0)
    assert not plan.retry_after(b, 1, 5.0).overall


def test_a_pause_beyond_the_deadline_fails_the_sends_at_once() -> None:
    plan = SendPlan(SendLimits(retry_max=60.0), 0.0)
    a1, a2 = plan.submit(chat(1), 0.0), plan.submit(chat(1), 30.0)
    other = plan.submit(chat(2), 0.0)
    grant_all(plan, 0.0)
    pause = plan.retry_after(a1, 3600, 1.0)
    assert set(pause.expired) == {a1, a2}, "both would wait past 60 s from when they were made"
    assert a1.state == FAILED and a1.blocked_until == pytest.approx(3601.0)
    assert other.state == GRANTED
    assert plan.waiting == 0


def test_a_pause_within_the_deadline_keeps_the_send() -> None:
    plan = SendPlan(SendLimits(retry_max=60.0), 0.0)
    a = plan.submit(chat(1), 0.0)
    grant_all(plan, 0.0)
    assert plan.retry_after(a, 59, 0.5).expired == []
    assert plan.paused_until("1") == pytest.approx(59.5)


# -- the burst of the issue, simulated ---------------------------------------------------------

class Telegram:
    """Telegram's limits as it applies them: on the request's arrival, exact token buckets."""

    def __init__(self) -> None:
        self.overall = TokenBucket(Rate(30.0, 30.0), 0.0, margin=0.0)
        self.chats: dict[str, TokenBucket] = {}

    def accept(self, target: Target, at: float) -> bool:
        bucket = self.chats.setdefault(
            target.chat, TokenBucket(Rate(20 / 60, 5.0) if target.group else Rate(1.0, 3.0), 0.0, margin=0.0))
        if bucket.ready_at(at) > at or self.overall.ready_at(at) > at:
            return False
        bucket.take(at)
        self.overall.take(at)
        return True


def test_the_316_burst_in_order_without_429s_close_to_the_limits() -> None:
    rng = random.Random(19)
    plan = SendPlan(LIMITS, 0.0)
    telegram = Telegram()
    targets = [chat(n) for n in range(1, 151) for _ in range(2)] + \
        [chat(n, group=True) for n in (1, 2) for _ in range(8)]
    made: dict[str, list[Ticket]] = defaultdict(list)
    for target in targets:
        made[target.chat].append(plan.submit(target, 0.0))
    arrived: dict[str, list[Ticket]] = defaultdict(list)
    in_flight: list[tuple[float, Ticket]] = []  # (answer time, ticket)
    now, refused, last = 0.0, 0, 0.0
    while len([t for ts in arrived.values() for t in ts]) < len(targets):
        granted, wake = plan.grant(now)
        for ticket in granted:
            arrival = now + rng.uniform(0.001, 0.030)  # the loaded machine's jitter
            if telegram.accept(ticket.target, arrival):
                arrived[ticket.target.chat].append(ticket)
                last = max(last, arrival)
                in_flight.append((arrival + 0.002, ticket))
            else:
                refused += 1
                plan.retry_after(ticket, 1, arrival)
        in_flight.sort(key=lambda item: item[0])
        moments = [m for m in (wake, in_flight[0][0] if in_flight else None) if m is not None]
        assert moments, "stuck"
        now = max(now, min(moments))
        while in_flight and in_flight[0][0] <= now:
            _, done = in_flight.pop(0)
            plan.finished(done, now)
    assert refused == 0
    assert all(arrived[key] == tickets for key, tickets in made.items()), "each chat in the order made"
    allowed = len(targets) / 30.0
    assert last <= 1.1 * allowed, f"{last:.2f} s where the limits allow {allowed:.2f} s"
