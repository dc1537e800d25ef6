"""Telegram's send limits as pure bookkeeping: token buckets and who may send next. No I/O, no clock.

Telegram limits what a bot sends (Bots FAQ): about 30 messages a second overall, about one a second
in one chat (short bursts pass), 20 a minute in a group; past a limit the call fails with 429 and
``retry_after``, and the message is not delivered. How the field keeps to that:

* python-telegram-bot's ``AIORateLimiter``: an overall and a per-group ``aiolimiter`` (no
  per-private-chat limit); a 429 sets one event that halts *every* request of the bot; concurrent
  sends of one chat race for the limiter, so their order is not kept.
* grammY's ``transformer-throttler``: Bottleneck queues (global reservoir 30/s, per group 20/min
  with one at a time, per private chat one at a time with a minimum gap), plus ``auto-retry`` that
  sleeps ``retry_after`` and repeats the call.

Here, like grammY, one queue per chat with one send in flight at a time (so a chat's sends leave
and arrive in the order they were made), token buckets overall / per private chat / per group,
and a 429 that pauses only its chat, unless two chats meet one within :data:`OVERALL_429_WINDOW`
(Telegram does not say which limit was hit; the overall one hits whichever chat sends next, a
chat's own limit hits that chat alone), then everyone. Between chats the overall budget is shared
round robin: a chat with 100 queued sends gets one turn in each pass, like every other chat.

Each bucket holds a little less than Telegram's burst (:data:`ARRIVAL_MARGIN` seconds' worth of
its rate): a request granted exactly one interval after the previous one may reach Telegram a few
milliseconds sooner than that one did, and Telegram counts arrivals. The rates are Telegram's.

The asyncio side (``utils.sending.limiter``) only follows what :class:`SendPlan` says, so the cases
that matter (order, fairness, pauses, deadlines, cancellation) are unit-tested in milliseconds.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

#: Seconds of each bucket's rate held back from its burst: the jitter between a grant here and the
#: request's arrival at Telegram that the limits tolerate without a 429. Half a second: a loaded
#: host (a 2-core machine running four busy processes) was seen to delay a granted request by
#: 0.2 s and draw six 429s at once; it costs a burst of 316 sends 0.3 s (15 of 30 up front).
ARRIVAL_MARGIN = 0.5
#: Rounding slack: a bucket refilled to exactly one token by the clock may hold 0.9999999.
TOKEN_EPSILON = 1e-9
#: A 429 in a second chat within this many seconds of one in another: the overall limit was hit.
OVERALL_429_WINDOW = 1.0
#: Idle chats whose buckets are full again are forgotten every this many grants (bounded memory).
SWEEP_EVERY_GRANTS = 1000

WAITING, GRANTED, FAILED, DONE = "waiting", "granted", "failed", "done"


@dataclass(frozen=True)
class Rate:
    """*per_second* sends with a burst of *burst*; ``per_second == 0`` means unlimited."""

    per_second: float
    burst: float

    @property
    def unlimited(self) -> bool:
        return self.per_second <= 0


@dataclass(frozen=True)
class SendLimits:
    """The limits the bot keeps to (``SEND_*`` settings); the defaults are Telegram's."""

    overall: Rate = Rate(30.0, 30.0)
    private: Rate = Rate(1.0, 3.0)
    group: Rate = Rate(20 / 60, 5.0)
    #: Sends with ``allow_paid_broadcast`` (a fee in Stars per message above the free limit).
    paid: Rate = Rate(1000.0, 1000.0)
    #: ``SEND_PAID_BROADCAST``: every send that can carry ``allow_paid_broadcast`` gets it.
    paid_broadcast: bool = False
    #: ``SEND_RETRY_MAX_SECONDS``: a send that cannot go out this long after it was made fails.
    retry_max: float = 60.0


class TokenBucket:
    """*rate.burst* tokens (less the arrival margin) refilled at *rate.per_second*; one per send."""

    def __init__(self, rate: Rate, now: float, margin: float = ARRIVAL_MARGIN) -> None:
        self.rate = rate.per_second
        self.capacity = max(1.0, rate.burst - margin * rate.per_second)
        self.tokens = self.capacity
        self.at = now

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
            self.at = now

    def ready_at(self, now: float) -> float:
        """The first moment (>= *now*) a send may take a token."""
        if self.rate <= 0:
            return now
        self._refill(now)
        return now if self.tokens >= 1.0 - TOKEN_EPSILON else now + (1.0 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        if self.rate > 0:
            self._refill(now)
            self.tokens -= 1.0

    def full(self, now: float) -> bool:
        """Nothing to remember: a fresh bucket would say the same."""
        if self.rate <= 0:
            return True
        self._refill(now)
        return self.tokens >= self.capacity


@dataclass(frozen=True)
class Target:
    """Where a send goes: its chat's key, and which limits apply."""

    chat: str
    group: bool  # a group, supergroup or channel (chat id < 0, or an @username)
    paid: bool = False  # allow_paid_broadcast: the paid overall budget instead of the free one


@dataclass(eq=False)
class Ticket:
    """One send's place in the plan, from the call until its request has an answer."""

    target: Target
    made_at: float
    deadline: float
    state: str = WAITING
    granted_at: float | None = None
    #: FAILED: the moment its chat (or everyone) may send again, beyond the deadline.
    blocked_until: float | None = None


@dataclass
class _Chat:
    bucket: TokenBucket
    queue: deque[Ticket] = field(default_factory=deque)
    busy: Ticket | None = None  # the send of this chat on the wire (one at a time: order)
    paused_until: float = 0.0  # a 429 of this chat


@dataclass(frozen=True)
class Pause:
    """What a 429 did: who pauses until when, and the sends that cannot wait that long."""

    overall: bool
    until: float
    expired: list[Ticket]


class SendPlan:
    """Which sends may go now; the asyncio side grants them and reports how each ended."""

    def __init__(self, limits: SendLimits, now: float) -> None:
        self.limits = limits
        self._overall = TokenBucket(limits.overall, now)
        self._paid = TokenBucket(limits.paid, now)
        self._chats: dict[str, _Chat] = {}
        #: Chats with waiting sends, in turn order: private chats (False), groups (True).
        self._rings: dict[bool, deque[str]] = {False: deque(), True: deque()}
        self._first = True  # which kind of chat has the next turn
        self._paused_until = 0.0  # a 429 of the overall limit: everyone
        self._last_429: tuple[str, float] | None = None
        self._grants = 0
        self.waiting = 0
        self.rate_limited = 0  # 429s received

    # -- reading -----------------------------------------------------------------------------

    @property
    def chats(self) -> int:
        """Chats the plan remembers (waiting, in flight, or a bucket not yet full again)."""
        return len(self._chats)

    def paused_until(self, chat: str | None = None) -> float:
        """When sends may go again: everyone's pause, or *chat*'s (whichever is later)."""
        own = self._chats[chat].paused_until if chat is not None and chat in self._chats else 0.0
        return max(self._paused_until, own)

    # -- changing ----------------------------------------------------------------------------

    def submit(self, target: Target, now: float) -> Ticket:
        """A send was made: it waits behind its chat's earlier ones."""
        ticket = Ticket(target, now, now + self.limits.retry_max)
        chat = self._chat(target, now)
        if not chat.queue:
            self._rings[target.group].append(target.chat)
        chat.queue.append(ticket)
        self.waiting += 1
        return ticket

    def grant(self, now: float) -> tuple[list[Ticket], float | None]:
        """The sends that may go now (at most one per chat, round robin), and when to ask again.

        ``None`` for the second: nothing can go before something else happens (a send finishes,
        a new one is made).
        """
        granted: list[Ticket] = []
        if not self.waiting:
            return granted, None
        if now < self._paused_until:
            return granted, self._paused_until
        wake: float | None = None
        kept: dict[bool, deque[str]] = {False: deque(), True: deque()}
        again: dict[bool, list[str]] = {False: [], True: []}
        order = _alternate(self._rings, self._first)
        for index, (group, key) in enumerate(order):
            chat = self._chats[key]
            if chat.busy is not None:  # its finish asks again
                kept[group].append(key)
                continue
            ticket = chat.queue[0]
            budget = self._budget(ticket.target)
            budget_at = budget.ready_at(now)
            ready = max(chat.paused_until, chat.bucket.ready_at(now), budget_at)
            if ready > now:
                kept[group].append(key)
                wake = ready if wake is None else min(wake, ready)
                if budget_at > now and not self._other_budget_usable(ticket.target, now):
                    # Nobody else can go before the overall budget refills.
                    wake = min(wake, budget_at)
                    for rest_group, rest in order[index + 1:]:
                        kept[rest_group].append(rest)
                    break
                continue
            chat.queue.popleft()
            chat.bucket.take(now)
            budget.take(now)
            chat.busy = ticket
            ticket.state, ticket.granted_at = GRANTED, now
            self.waiting -= 1
            granted.append(ticket)
            self._first = not group  # the other kind has the next turn
            if chat.queue:
                again[group].append(key)  # its next turn comes after every chat that waited
        for group in (False, True):
            kept[group].extend(again[group])
            self._rings[group] = kept[group]
        self._grants += len(granted)
        if self._grants >= SWEEP_EVERY_GRANTS:
            self._grants = 0
            self._sweep(now)
        return granted, wake

    def finished(self, ticket: Ticket, now: float) -> None:
        """*ticket*'s request has an answer (anything but a 429), or its waiter gave up."""
        if ticket.state == WAITING:
            self._drop_waiting(ticket)
        chat = self._chats.get(ticket.target.chat)
        if chat is not None and chat.busy is ticket:
            chat.busy = None
            self._forget_if_idle(ticket.target.chat, chat, now)
        if ticket.state in (WAITING, GRANTED):
            ticket.state = DONE

    def retry_after(self, ticket: Ticket, seconds: float, now: float) -> Pause:
        """*ticket* got a 429: it goes back to the head of its chat, and its chat (or everyone,
        see the module's docstring) pauses *seconds*. Sends that could not go out before their
        deadline fail now (``FAILED``, removed) rather than wait to fail."""
        self.rate_limited += 1
        key = ticket.target.chat
        chat = self._chat(ticket.target, now)
        if chat.busy is ticket:
            chat.busy = None
        until = now + max(0.0, seconds)
        last, self._last_429 = self._last_429, (key, now)
        overall = last is not None and last[0] != key and now - last[1] <= OVERALL_429_WINDOW
        if overall:
            self._paused_until = max(self._paused_until, until)
        else:
            chat.paused_until = max(chat.paused_until, until)
        ticket.state, ticket.granted_at = WAITING, None
        if not chat.queue:
            self._rings[ticket.target.group].appendleft(key)
        chat.queue.appendleft(ticket)
        self.waiting += 1
        expired: list[Ticket] = []
        for name in (list(self._chats) if overall else [key]):
            expired += self._expire(name, until)
        return Pause(overall, until, expired)

    # -- inside ------------------------------------------------------------------------------

    def _chat(self, target: Target, now: float) -> _Chat:
        chat = self._chats.get(target.chat)
        if chat is None:
            chat = _Chat(TokenBucket(self.limits.group if target.group else self.limits.private, now))
            self._chats[target.chat] = chat
        return chat

    def _budget(self, target: Target) -> TokenBucket:
        return self._paid if target.paid else self._overall

    def _other_budget_usable(self, target: Target, now: float) -> bool:
        """Could a send on the other overall budget (paid / free) still go in this pass?"""
        other = self._overall if target.paid else self._paid
        return other.ready_at(now) <= now

    def _expire(self, key: str, until: float) -> list[Ticket]:
        chat = self._chats.get(key)
        if chat is None:
            return []
        late = [t for t in chat.queue if t.deadline < until]
        for ticket in late:
            chat.queue.remove(ticket)
            ticket.state, ticket.blocked_until = FAILED, until
            self.waiting -= 1
        if late and not chat.queue:
            self._rings[late[0].target.group].remove(key)
        return late

    def _drop_waiting(self, ticket: Ticket) -> None:
        chat = self._chats.get(ticket.target.chat)
        if chat is None or ticket not in chat.queue:
            return
        chat.queue.remove(ticket)
        self.waiting -= 1
        if not chat.queue:
            self._rings[ticket.target.group].remove(ticket.target.chat)

    def _forget_if_idle(self, key: str, chat: _Chat, now: float) -> None:
        if not chat.queue and chat.busy is None and chat.paused_until <= now and chat.bucket.full(now):
            del self._chats[key]

    def _sweep(self, now: float) -> None:
        for key, chat in list(self._chats.items()):
            self._forget_if_idle(key, chat, now)


def _alternate(rings: dict[bool, deque[str]], first: bool) -> list[tuple[bool, str]]:
    """Both rings' chats taking turns, kind *first* first: ``[(is a group, chat key), ...]``.

    Private chats and groups take turns at the overall budget: a group's send waits for at most
    one private chat's (and the other way round), so a group's own slow limit (20 a minute) is
    not stretched further by waiting behind every private chat, and neither kind starves the other.
    """
    one, two = rings[first], rings[not first]
    out: list[tuple[bool, str]] = []
    for index in range(max(len(one), len(two))):
        if index < len(one):
            out.append((first, one[index]))
        if index < len(two):
            out.append((not first, two[index]))
    return out


def seconds_until(moment: float, now: float) -> int:
    """Whole seconds (at least 1) until *moment*, as Telegram's ``retry_after`` counts."""
    return max(1, math.ceil(moment - now))


#: Bot API methods that put something into a chat (with a ``chat_id``), besides every ``send*``.
CHAT_SEND_PREFIXES = ("send", "forwardMessage", "copyMessage", "editMessage")
CHAT_SEND_METHODS = frozenset({"stopPoll", "stopMessageLiveLocation"})
#: ``send*`` methods that are not messages: not counted against the message limits.
NOT_SENDS = frozenset({"sendChatAction"})


def sends_into_chat(api_method: str) -> bool:
    """Whether a Bot API method counts against the message limits (when it names a chat)."""
    if api_method in NOT_SENDS:
        return False
    return api_method in CHAT_SEND_METHODS or api_method.startswith(CHAT_SEND_PREFIXES)


def is_group(chat_id: int | str) -> bool:
    """A group, supergroup or channel: a negative id, or a channel's ``@username``."""
    if isinstance(chat_id, int):
        return chat_id < 0
    text = str(chat_id).strip()
    return text.startswith("@") or text.startswith("-")
