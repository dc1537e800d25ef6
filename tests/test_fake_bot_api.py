"""The fake Bot API itself: the rules of the real server that solobot's tests rely on.

In-process and fast: the fake runs in its thread, these tests talk HTTP to it (urllib, or aiohttp
where a webhook receiver must run in the test's own loop).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from testbed.fake_bot_api import (
    CONFLICT_TEXT,
    FIRST_UPDATE_ID,
    OFFSET_FUTURE_SLACK,
    SECRET_HEADER,
    SET_WEBHOOK_ABORT_TEXT,
    WEBHOOK_REPLY_TAG,
    WEBHOOK_TEXT,
    FakeBotAPI,
)
from tests.conftest import BOT_ID, TOKEN, free_port, wait_until

#: Webhook retries in these tests start at 50 ms instead of 1 s.
RETRY_BASE = 0.05
#: Tokens of other bots (their own queues and limits).
OTHER_BOT_TOKENS = [f"{BOT_ID + n}:{TOKEN.partition(':')[2]}" for n in (1, 2)]
#: Timer slack: asyncio may wake a little early by the clock the test reads.
TIMER_SLACK = 0.01


def api(fake: FakeBotAPI, method: str, tag: str = "t", **params: Any) -> tuple[int, dict[str, Any]]:
    """Call *method* over HTTP as instance *tag*; (HTTP status, decoded body)."""
    body = json.dumps(params).encode()
    request = urllib.request.Request(f"{fake.url(tag)}/bot{TOKEN}/{method}", body,
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        return exc.code, dict(json.loads(exc.read()))


def update_ids(fake: FakeBotAPI, **params: Any) -> list[int]:
    status, body = api(fake, "getUpdates", **params)
    assert status == 200, body
    return [u["update_id"] for u in body["result"]]


def queue(fake: FakeBotAPI, n: int, chat_id: int = 1) -> list[int]:
    return fake.send_burst(BOT_ID, [(f"m{i}", chat_id, chat_id) for i in range(n)])


# -- offsets ---------------------------------------------------------------------------------


def test_offset_confirms_everything_below_it(fake: FakeBotAPI) -> None:
    queue(fake, 3)
    first = FIRST_UPDATE_ID
    assert update_ids(fake) == [first, first + 1, first + 2]
    assert update_ids(fake, offset=first + 1) == [first + 1, first + 2]
    assert fake.pending_updates(BOT_ID) == 2, "the offset dropped the one below it"
    assert update_ids(fake, offset=first + 3) == []
    assert fake.pending_updates(BOT_ID) == 0


def test_offset_beyond_tail_plus_10_is_served_from_the_head(fake: FakeBotAPI) -> None:
    queue(fake, 3)
    last = FIRST_UPDATE_ID + 2
    tail = last + 1  # TQueue's tail_id: the id the next update will get
    assert update_ids(fake, offset=tail + OFFSET_FUTURE_SLACK + 1) == [last - 2, last - 1, last]
    assert fake.pending_updates(BOT_ID) == 3, "an invalid offset drops nothing"
    assert fake.snapshot_polls()[-1].invalid_offset
    assert update_ids(fake, offset=tail + OFFSET_FUTURE_SLACK) == [], "tail + 10 is still valid"
    assert not fake.snapshot_polls()[-1].invalid_offset
    assert fake.pending_updates(BOT_ID) == 0


def test_negative_offset_keeps_the_last_ones(fake: FakeBotAPI) -> None:
    queue(fake, 5)
    assert update_ids(fake, offset=-2) == [FIRST_UPDATE_ID + 3, FIRST_UPDATE_ID + 4]
    assert fake.pending_updates(BOT_ID) == 2


def test_update_ids_restart_and_an_old_offset_is_served_from_the_head(fake: FakeBotAPI) -> None:
    queue(fake, 2)
    old_next = FIRST_UPDATE_ID + 2
    assert update_ids(fake, offset=old_next) == []  # everything confirmed
    fake.restart_update_ids(BOT_ID, 7)
    queue(fake, 2)
    assert update_ids(fake, offset=old_next) == [7, 8], "the old offset is in the future now"
    assert fake.snapshot_polls()[-1].invalid_offset
    assert update_ids(fake, offset=8) == [8]
    assert fake.pending_updates(BOT_ID) == 1


def test_restart_keeps_queued_updates(fake: FakeBotAPI) -> None:
    queue(fake, 2)
    fake.restart_update_ids(BOT_ID, 1)
    queue(fake, 1)
    assert update_ids(fake) == [FIRST_UPDATE_ID, FIRST_UPDATE_ID + 1, 1]


def test_repeated_offset_throttle_is_opt_in(fake: FakeBotAPI) -> None:
    queue(fake, 3)
    assert len(update_ids(fake, offset=0)) == 3
    assert len(update_ids(fake, offset=0)) == 3, "off by default"
    fake.throttle_repeated_offsets = True
    assert len(update_ids(fake, offset=0)) == 3  # the first with this setting sets the reference
    assert len(update_ids(fake, offset=0)) == 1, "the same offset again within 0.5 s: limit 1"


# -- conflicts -------------------------------------------------------------------------------


class PendingPoll:
    """A getUpdates long poll in a thread (urllib blocks)."""

    def __init__(self, fake: FakeBotAPI, tag: str, timeout: int = 10) -> None:
        self.result: tuple[int, dict[str, Any]] | None = None
        self.thread = threading.Thread(target=self._run, args=(fake, tag, timeout), daemon=True)
        self.thread.start()
        wait_until(lambda: any(p.tag == tag and p.outcome == "pending" for p in fake.snapshot_polls()),
                   message=f"{tag}'s poll pending")

    def _run(self, fake: FakeBotAPI, tag: str, timeout: int) -> None:
        self.result = api(fake, "getUpdates", tag, timeout=timeout)

    def join(self) -> tuple[int, dict[str, Any]]:
        self.thread.join(15)
        assert self.result is not None
        return self.result


def test_a_second_poller_ends_the_first_with_409(fake: FakeBotAPI) -> None:
    first = PendingPoll(fake, "one")
    second = PendingPoll(fake, "two", timeout=1)
    status, body = first.join()
    assert (status, body["description"]) == (409, CONFLICT_TEXT)
    assert second.join()[0] == 200
    assert fake.conflicts() == 1


def test_injected_conflicts_end_the_next_calls_at_once(fake: FakeBotAPI) -> None:
    queue(fake, 2)
    fake.inject_conflict(BOT_ID, 2)
    for _ in range(2):
        status, body = api(fake, "getUpdates", offset=FIRST_UPDATE_ID + 1, timeout=10)
        assert (status, body["description"]) == (409, CONFLICT_TEXT)
    assert fake.pending_updates(BOT_ID) == 1, "the offset of a conflicting call was applied"
    assert update_ids(fake) == [FIRST_UPDATE_ID + 1]
    assert [p.outcome for p in fake.snapshot_polls()] == ["conflict", "conflict", "ok"]


def test_injected_conflict_ends_a_pending_poll(fake: FakeBotAPI) -> None:
    pending = PendingPoll(fake, "leader")
    t0 = time.monotonic()
    fake.inject_conflict(BOT_ID)
    assert pending.join()[0] == 409
    assert time.monotonic() - t0 < 2.0, "at once, not at the end of its 10 s long poll"
    assert update_ids(fake, timeout=0) == [], "one conflict only"
    assert fake.conflicts() == 1


def test_send_burst_queues_3000_updates_at_once(fake: FakeBotAPI) -> None:
    items = [("/ping", 1000 + i % 50, 1000 + i % 50) for i in range(3000)]
    t0 = time.monotonic()
    message_ids = fake.send_burst(BOT_ID, items)
    assert time.monotonic() - t0 < 1.0
    assert len(set(message_ids)) == 3000 and message_ids == sorted(message_ids)
    assert fake.pending_updates(BOT_ID) == 3000
    _, body = api(fake, "getUpdates", limit=100)
    assert [u["message"]["chat"]["id"] for u in body["result"][:3]] == [1000, 1001, 1002]


# -- webhooks --------------------------------------------------------------------------------


@dataclass
class Hit:
    update_id: int
    chat_id: int
    secret: str | None
    started: float
    ended: float = 0.0


Respond = Callable[[dict[str, Any], int], Awaitable[web.StreamResponse]]


@dataclass
class Receiver:
    """A webhook endpoint in the test's loop; *respond(update, nth delivery of it)* answers."""

    respond: Respond
    hits: list[Hit] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        update = await request.json()
        hit = Hit(update["update_id"], update["message"]["chat"]["id"], request.headers.get(SECRET_HEADER),
                  time.monotonic())
        self.hits.append(hit)
        nth = sum(1 for h in self.hits if h.update_id == hit.update_id)
        try:
            return await self.respond(update, nth)
        finally:
            hit.ended = time.monotonic()

    def ids(self) -> list[int]:
        return [h.update_id for h in self.hits]


async def ok(update: dict[str, Any], nth: int) -> web.StreamResponse:
    return web.Response(text="")


async def until(predicate: Callable[[], Any], timeout: float = 10.0, message: str = "condition") -> Any:
    """The async twin of conftest.wait_until: the receiver must keep running meanwhile."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        await asyncio.sleep(0.005)
    return value


@pytest.fixture
def hook_fake() -> Iterator[FakeBotAPI]:
    server = FakeBotAPI(deliver_webhooks=True, webhook_retry_base=RETRY_BASE).start_in_thread()
    yield server
    server.stop_thread()


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[[Respond], Awaitable[Receiver]]]:
    started: list[Receiver] = []

    async def start(respond: Respond) -> Receiver:
        receiver = Receiver(respond)
        await receiver.start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        assert receiver.runner is not None
        await receiver.runner.cleanup()


async def call(fake: FakeBotAPI, method: str, tag: str = "t", token: str = TOKEN,
               **params: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, \
            session.post(f"{fake.url(tag)}/bot{token}/{method}", json=params) as response:
        return response.status, dict(await response.json())


async def test_webhook_delivers_in_order_per_chat_and_in_parallel_across_chats(
        hook_fake: FakeBotAPI, receivers: Callable[[Respond], Awaitable[Receiver]]) -> None:
    async def slow(update: dict[str, Any], nth: int) -> web.StreamResponse:
        await asyncio.sleep(0.05)
        return web.Response(text="")

    receiver = await receivers(slow)
    status, body = await call(hook_fake, "setWebhook", "leader", url=receiver.url, secret_token="s3cret_-X",
                              max_connections=3)
    assert (status, body["description"]) == (200, "Webhook was set")
    chats = [11, 12, 13, 14]
    hook_fake.send_burst(BOT_ID, [("/ping", c, c) for _ in range(5) for c in chats])
    await until(lambda: len(hook_fake.snapshot_deliveries()) == 20, message="20 deliveries")
    assert {h.secret for h in receiver.hits} == {"s3cret_-X"}
    for chat in chats:
        mine = [h for h in receiver.hits if h.chat_id == chat]
        assert [h.update_id for h in mine] == sorted(h.update_id for h in mine), "in order per chat"
        assert all(a.ended <= b.started for a, b in itertools.pairwise(mine)), "one at a time per chat"
    overlap = max(sum(1 for o in receiver.hits if o.started <= h.started < o.ended) for h in receiver.hits)
    assert overlap == 3, f"chats in parallel up to max_connections, got {overlap}"
    deliveries = hook_fake.snapshot_deliveries()
    assert {(d.tag, d.status, d.attempt) for d in deliveries} == {("leader", 200, 1)}
    assert hook_fake.pending_updates(BOT_ID) == 0
    status, body = await call(hook_fake, "getUpdates")
    assert (status, body["description"]) == (409, WEBHOOK_TEXT)


async def test_failed_delivery_is_retried_with_doubling_delay_and_holds_only_its_chat(
        hook_fake: FakeBotAPI, receivers: Callable[[Respond], Awaitable[Receiver]]) -> None:
    async def fail_the_first_three_times(update: dict[str, Any], nth: int) -> web.StreamResponse:
        if update["update_id"] == FIRST_UPDATE_ID and nth <= 3:
            return web.Response(status=500)
        return web.Response(text="")

    receiver = await receivers(fail_the_first_three_times)
    hook_fake.set_webhook(BOT_ID, receiver.url)
    hook_fake.send_burst(BOT_ID, [("a", 1, 1), ("b", 1, 1), ("c", 2, 2)])
    first = FIRST_UPDATE_ID
    await until(lambda: hook_fake.pending_updates(BOT_ID) == 0, message="all delivered")
    tries = [h.started for h in receiver.hits if h.update_id == first]
    assert len(tries) == 4
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    for gap, expected in zip(gaps, [RETRY_BASE, 2 * RETRY_BASE, 4 * RETRY_BASE], strict=True):
        assert gap >= expected - TIMER_SLACK, f"retry gaps {gaps}"
    ids = receiver.ids()
    assert ids.index(first + 2) < ids.index(first + 1), "chat 2 was not held by chat 1's failures"
    assert ids.index(first + 1) > len(ids) - 2, "chat 1's next update only after its first succeeded"
    attempts = [(d.status, d.attempt) for d in hook_fake.snapshot_deliveries() if d.update_id == first]
    assert attempts == [(500, 1), (500, 2), (500, 3), (200, 4)]
    info = hook_fake.webhook_info(BOT_ID)
    assert info["last_error_message"] == "Wrong response from the webhook: 500 Internal Server Error"
    assert info["last_error_date"] >= int(time.time()) - 60
    assert info["pending_update_count"] == 0


async def test_retry_after_is_honoured(hook_fake: FakeBotAPI,
                                       receivers: Callable[[Respond], Awaitable[Receiver]]) -> None:
    async def busy_once(update: dict[str, Any], nth: int) -> web.StreamResponse:
        if nth == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(text="")

    receiver = await receivers(busy_once)
    hook_fake.set_webhook(BOT_ID, receiver.url)
    queue(hook_fake, 1)
    await until(lambda: len(hook_fake.snapshot_deliveries()) == 2, message="the retry")
    gap = receiver.hits[1].started - receiver.hits[0].started
    assert gap >= 1.0 - TIMER_SLACK, f"retried after {gap:.3f} s despite Retry-After: 1"
    assert [d.status for d in hook_fake.snapshot_deliveries()] == [429, 200]


async def test_connection_errors_and_timeouts_are_retried(
        hook_fake: FakeBotAPI, receivers: Callable[[Respond], Awaitable[Receiver]]) -> None:
    closed_port = free_port()
    hook_fake.set_webhook(BOT_ID, f"http://127.0.0.1:{closed_port}/hook")
    queue(hook_fake, 1)
    await until(lambda: len(hook_fake.snapshot_deliveries()) >= 2, message="two failed tries")
    refused = hook_fake.snapshot_deliveries()
    assert {d.status for d in refused} == {0} and refused[1].attempt == 2
    assert hook_fake.webhook_info(BOT_ID)["last_error_message"].startswith("Connection refused")

    hang = asyncio.Event()

    async def hang_once(update: dict[str, Any], nth: int) -> web.StreamResponse:
        if nth == 1:
            await hang.wait()
        return web.Response(text="")

    receiver = await receivers(hang_once)
    hook_fake.webhook_timeout = 0.2
    hook_fake.set_webhook(BOT_ID, receiver.url)
    await until(lambda: len(receiver.hits) == 2, message="a retry after the timeout")
    hang.set()
    await until(lambda: hook_fake.pending_updates(BOT_ID) == 0, message="delivered")
    timed_out = [d for d in hook_fake.snapshot_deliveries() if d.tag == "" and d.error == "Read timeout expired"]
    assert len(timed_out) == 1


async def test_method_in_the_answer_is_executed(hook_fake: FakeBotAPI,
                                                receivers: Callable[[Respond], Awaitable[Receiver]]) -> None:
    async def reply(update: dict[str, Any], nth: int) -> web.StreamResponse:
        message = update["message"]
        if message["text"] == "/me":
            return web.json_response({"method": "getMe"})  # never executed from a webhook answer
        return web.json_response({"method": "sendMessage", "chat_id": message["chat"]["id"], "text": "pong",
                                  "reply_parameters": {"message_id": message["message_id"]}})

    receiver = await receivers(reply)
    hook_fake.set_webhook(BOT_ID, receiver.url)
    me = hook_fake.send_user_message(BOT_ID, "/me")
    ping = hook_fake.send_user_message(BOT_ID, "/ping", chat_id=5)
    replies = await until(lambda: hook_fake.replies_to(ping), message="the reply")
    assert [(r.tag, r.method, r.chat_id, r.text) for r in replies] == [(WEBHOOK_REPLY_TAG, "sendMessage", "5", "pong")]
    await until(lambda: hook_fake.pending_updates(BOT_ID) == 0, message="both delivered")
    assert not hook_fake.replies_to(me)
    assert [m for tag, m, _ in hook_fake.calls if tag == WEBHOOK_REPLY_TAG] == ["sendMessage"]


async def test_set_webhook_rules(hook_fake: FakeBotAPI, receivers: Callable[[Respond], Awaitable[Receiver]]) -> None:
    receiver = await receivers(ok)
    # Every setWebhook with a URL counts towards the limit of one a second, failed ones too: other bots.
    status, body = await call(hook_fake, "setWebhook", token=OTHER_BOT_TOKENS[0],
                              url=f"http://127.0.0.1:{free_port()}/hook")
    assert status == 400 and body["description"].startswith("Bad Request: bad webhook: Connection refused")
    status, body = await call(hook_fake, "setWebhook", token=OTHER_BOT_TOKENS[1], url=receiver.url,
                              secret_token="no spaces")
    assert (status, body["description"]) == (400, "Bad Request: secret token contains unallowed characters")

    # A pending getUpdates ends when a webhook is set.
    poll = asyncio.ensure_future(call(hook_fake, "getUpdates", "poller", timeout=10))
    await until(lambda: any(p.outcome == "pending" for p in hook_fake.snapshot_polls()), message="pending poll")
    status, body = await call(hook_fake, "setWebhook", url=receiver.url, allowed_updates=["message"])
    assert (status, body["description"]) == (200, "Webhook was set")
    assert await poll == (409, {"ok": False, "error_code": 409, "description": SET_WEBHOOK_ABORT_TEXT})
    assert hook_fake.conflicts() == 0, "not a getUpdates conflict"

    status, body = await call(hook_fake, "setWebhook", url=receiver.url + "2")
    assert (status, body["parameters"]) == (429, {"retry_after": 1}), "one setWebhook per second"
    info = hook_fake.webhook_info(BOT_ID)
    assert (info["url"], info["max_connections"], info["allowed_updates"]) == (receiver.url, 40, ["message"])


async def test_set_webhook_again_with_the_same_parameters_changes_nothing(
        hook_fake: FakeBotAPI, receivers: Callable[[Respond], Awaitable[Receiver]]) -> None:
    receiver = await receivers(ok)
    hook_fake.set_webhook(BOT_ID, receiver.url)  # by someone else: no rate limit applies
    status, body = await call(hook_fake, "setWebhook", url=receiver.url, allowed_updates=["message", "poll"])
    assert (status, body["description"]) == (200, "Webhook is already set")
    assert hook_fake.webhook_info(BOT_ID)["allowed_updates"] == ["message", "poll"]
    hook_fake.set_webhook(BOT_ID, receiver.url, allowed_updates=["poll"])
    queue(hook_fake, 1)
    assert hook_fake.pending_updates(BOT_ID) == 0, "an update type not allowed is never queued"


async def test_delete_webhook_stops_delivery_and_can_drop_the_queue(
        hook_fake: FakeBotAPI, receivers: Callable[[Respond], Awaitable[Receiver]]) -> None:
    async def refuse(update: dict[str, Any], nth: int) -> web.StreamResponse:
        return web.Response(status=503)

    receiver = await receivers(refuse)
    hook_fake.set_webhook(BOT_ID, receiver.url)
    queue(hook_fake, 2)
    await until(lambda: len(receiver.hits) >= 2, message="failing deliveries")
    status, body = await call(hook_fake, "deleteWebhook")
    assert (status, body["description"]) == (200, "Webhook was deleted")
    deleted_at = time.monotonic()
    assert hook_fake.webhook_info(BOT_ID)["pending_update_count"] == 2, "undelivered updates stay queued"
    assert update_ids(hook_fake, timeout=0) == [FIRST_UPDATE_ID, FIRST_UPDATE_ID + 1], "polling works again"
    assert all(h.started < deleted_at for h in receiver.hits), "no delivery after deleteWebhook"
    status, body = await call(hook_fake, "deleteWebhook", drop_pending_updates=True)
    assert status == 200 and hook_fake.pending_updates(BOT_ID) == 0


async def test_only_the_first_2x_max_connections_updates_are_candidates(
        hook_fake: FakeBotAPI, receivers: Callable[[Respond], Awaitable[Receiver]]) -> None:
    """As the real server: a chat with many failing updates at the head starves the others."""
    healthy = asyncio.Event()

    async def chat_1_down(update: dict[str, Any], nth: int) -> web.StreamResponse:
        if update["message"]["chat"]["id"] == 1 and not healthy.is_set():
            return web.Response(status=500)
        return web.Response(text="")

    receiver = await receivers(chat_1_down)
    hook_fake.set_webhook(BOT_ID, receiver.url, max_connections=1)  # two loaded at a time
    hook_fake.send_burst(BOT_ID, [("a", 1, 1), ("b", 1, 1), ("c", 2, 2)])
    await until(lambda: len(receiver.hits) >= 3, message="three failed tries of chat 1")
    assert set(receiver.ids()) == {FIRST_UPDATE_ID}, "chat 2's update was not loaded"
    healthy.set()
    await until(lambda: hook_fake.pending_updates(BOT_ID) == 0, message="all delivered")
    assert receiver.ids()[-2:] == [FIRST_UPDATE_ID + 1, FIRST_UPDATE_ID + 2]


async def test_webhook_delivery_is_opt_in(fake: FakeBotAPI,
                                          receivers: Callable[[Respond], Awaitable[Receiver]]) -> None:
    receiver = await receivers(ok)
    fake.set_webhook(BOT_ID, receiver.url)
    queue(fake, 1)
    _, body = await call(fake, "getWebhookInfo")
    assert body["result"]["pending_update_count"] == 1
    fake.deliver_webhooks = True
    await until(lambda: receiver.hits, message="delivery once turned on")
