"""A fake Telegram Bot API server, faithful to the semantics solobot depends on.

Where it says "as the real server", the reference is tdlib/telegram-bot-api (``Client.cpp``,
``WebhookActor.cpp``, ``td/db/TQueue.cpp``).

* One poller per token: a getUpdates that arrives while another is pending ends the *older* one
  with ``409 Conflict: terminated by other getUpdates request`` -- at most once every 3 s per
  token, as the real server does (a newer request waits out the rest of that window).
* A poller whose client disconnected (process killed, request cancelled) is gone, not a conflict.
* 409 "can't use getUpdates method while webhook is active" while a webhook is set; a setWebhook
  ends a pending getUpdates with 409 "terminated by setWebhook request".
* Offsets as the real server (``Client::do_get_updates``, ``TQueue::get``): ``offset`` confirms
  (drops) every update below it, at once when the request arrives; an offset beyond the queue's
  tail + 10 (tail: the id the next update will get) is invalid, and then the queue is served
  from its head and nothing is dropped; a negative offset keeps only the last ``-offset``
  updates. Updates are returned oldest first, ``limit`` at most.
* Update ids that start again (:meth:`FakeBotAPI.restart_update_ids`), a 409 on demand without a
  second poller (:meth:`FakeBotAPI.inject_conflict`), 429 with ``parameters.retry_after`` on
  demand (``flood``), and a send delay (slow handlers).
* Telegram's send limits, opt-in (``send_limits``): token buckets overall (30/s, burst 30), per
  private chat (1/s, burst 3) and per group or channel (20/min, burst 5), checked when a send
  arrives; a send past one is refused with 429 and ``parameters.retry_after`` (whole seconds until
  the bucket has room) and not delivered. Each refusal is recorded (:meth:`FakeBotAPI.snapshot_refused`).
* Webhook delivery as the real ``WebhookActor``, opt-in (``deliver_webhooks``): see
  :class:`_WebhookActor`.
* Every getUpdates, every call, every sent message and every webhook delivery is recorded, with
  the *tag* of the caller: instances are pointed at ``http://host:port/<tag>`` so the log says
  which process did what.

Run it by hand:  ``python -m testbed.fake_bot_api serve --port 8081``
and talk to it:  ``python -m testbed.fake_bot_api send --port 8081 --text /ping``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import math
import re
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

CONFLICT_WINDOW = 3.0
CONFLICT_TEXT = (
    "Conflict: terminated by other getUpdates request; "
    "make sure that only one bot instance is running"
)
WEBHOOK_TEXT = (
    "Conflict: can't use getUpdates method while webhook is active; "
    "use deleteWebhook to delete the webhook first"
)
SET_WEBHOOK_ABORT_TEXT = "Conflict: terminated by setWebhook request"

#: ``TQueue::get``: a from_id above ``tail_id + 10`` is "in the future" (tail_id: the next id).
OFFSET_FUTURE_SLACK = 10
#: The first update id of a fresh bot (ids are per bot and per server).
FIRST_UPDATE_ID = 1001
#: ``process_get_updates_query`` (opt-in here, ``throttle_repeated_offsets``): the same offset
#: again within 3 s gets a timeout of at least 3 s, within 0.5 s a limit of 1.
REPEAT_TIMEOUT_WINDOW = 3.0
REPEAT_MIN_TIMEOUT = 3.0
REPEAT_LIMIT_WINDOW = 0.5
MAX_LIMIT = 100

#: ``getWebhookInfo``/``setWebhook``: max_connections defaults to 40, 1-100 on the cloud server.
WEBHOOK_DEFAULT_MAX_CONNECTIONS = 40
WEBHOOK_MAX_CONNECTIONS_LIMIT = 100
#: ``WebhookActor::start_up``: ``max_loaded_updates_ = max_connections * 2`` -- only that many
#: updates from the queue's head are candidates for delivery at a time.
WEBHOOK_LOADED_PER_CONNECTION = 2
#: ``WebhookActor::create_new_connections``: no success in the last 10 s -> one connection only.
WEBHOOK_NO_SUCCESS_WINDOW = 10.0
#: ``on_update_error``: Retry-After is clamped to 0-3600 s.
WEBHOOK_MAX_RETRY_AFTER = 3600.0
#: ``process_set_webhook_query``: one setWebhook with a URL per second, else 429 retry_after=1.
SET_WEBHOOK_INTERVAL = 1.0
SET_WEBHOOK_RETRY_AFTER = 1
#: Methods a webhook response may not call (``WebhookActor::handle``), besides every ``get*``.
WEBHOOK_REPLY_FORBIDDEN = frozenset({"deletewebhook", "setwebhook", "close", "logout"})
#: The tag under which methods called from a webhook response are recorded.
WEBHOOK_REPLY_TAG = "webhook"
SECRET_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{0,256}")
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
#: setWebhook checks that the URL accepts a TCP connection before answering (the real server
#: answers once ``WebhookActor`` created its first connection).
WEBHOOK_VERIFY_TIMEOUT = 5.0

#: What a bot started against this fake is told about send limits when a test does not turn the
#: fake's on: none (the other tests send faster than Telegram allows, on purpose).
UNLIMITED_SENDS_ENV = {"SEND_OVERALL_PER_SECOND": "0", "SEND_PRIVATE_PER_SECOND": "0",
                       "SEND_GROUP_PER_MINUTE": "0"}

Params = dict[str, Any]
Req = web.Request
Resp = web.Response


@dataclass(frozen=True)
class SendLimits:
    """Telegram's limits on what a bot sends (Bots FAQ), as token buckets: rate per second, burst."""

    overall: tuple[float, float] = (30.0, 30.0)
    private: tuple[float, float] = (1.0, 3.0)
    group: tuple[float, float] = (20 / 60, 5.0)
    paid: tuple[float, float] = (1000.0, 1000.0)  # sends with allow_paid_broadcast


def flood_burst(private_chats: int = 150, per_private: int = 2, groups: int = 2,
                per_group: int = 8) -> list[tuple[str, int, int]]:
    """/ping from many chats at once, as ``(text, user_id, chat_id)`` for :meth:`FakeBotAPI.send_burst`.

    As users write at the same moment: in rounds, each chat's next message in every round
    (private chats 10000.., groups -20000..). The default is 316 messages: 150 private chats x 2,
    two groups x 8, which Telegram's limits let through in 316 / 30 = 10.5 s at the earliest.
    """
    items: list[tuple[str, int, int]] = []
    for round_ in range(max(per_private, per_group)):
        if round_ < per_private:
            items += [("/ping", 10_000 + n, 10_000 + n) for n in range(private_chats)]
        if round_ < per_group:
            items += [("/ping", 20_000 + n, -(20_000 + n)) for n in range(groups)]
    return items


def limits_allow(items: Sequence[tuple[str, int, int]], limits: SendLimits) -> float:
    """The least time Telegram's limits need for one send per item: the overall rate, or the
    slowest chat's own (its burst at once, then its rate), whichever is longer."""
    per_chat: dict[int, int] = {}
    for _, _, chat in items:
        per_chat[chat] = per_chat.get(chat, 0) + 1
    slowest = 0.0
    for chat, count in per_chat.items():
        rate, burst = limits.group if chat < 0 else limits.private
        slowest = max(slowest, max(0.0, count - burst) / rate)
    return max(len(items) / limits.overall[0], slowest)


class _Bucket:
    """A token bucket, full at first; :meth:`wait` says how long until one token."""

    def __init__(self, rate: tuple[float, float], now: float) -> None:
        self.per_second, self.burst = rate
        self.tokens, self.at = self.burst, now

    def wait(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_second)
        self.at = now
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.per_second


@dataclass
class Refused:
    """A send refused with 429 by the send limits."""

    tag: str
    chat_id: str
    retry_after: int
    limit: str  # overall | chat
    at: float


@dataclass
class Poll:
    tag: str
    started: float
    offset: int | None
    timeout: float
    ended: float | None = None
    outcome: str = "pending"  # ok | conflict | webhook | flood | gone
    count: int = 0
    invalid_offset: bool = False  # the offset was beyond tail + 10: served from the head


@dataclass
class Sent:
    tag: str
    method: str
    chat_id: str
    text: str | None
    reply_to: int | None
    message_id: int
    at: float


@dataclass
class Delivery:
    """One webhook POST: *status* is the HTTP status, 0 when there was none (see *error*)."""

    tag: str  # the tag of whoever called setWebhook
    update_id: int
    status: int
    attempt: int  # 1 for the first try of this update
    at: float  # when the outcome was known
    chat_id: int | None = None
    started: float = 0.0
    error: str = ""


@dataclass
class _Waiter:
    poll: Poll
    request: web.Request
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    conflict: bool = False
    aborted_by_webhook: bool = False


@dataclass
class BotState:
    bot_id: int
    updates: list[dict[str, Any]] = field(default_factory=list)
    last_update_id: int = FIRST_UPDATE_ID - 1  # the id the last queued update got
    next_message_id: int = 1
    poller: _Waiter | None = None
    last_conflict: float = 0.0
    injected_conflicts: int = 0
    previous_offset: int = 0
    previous_poll_start: float = float("-inf")
    allowed_updates: list[str] | None = None  # None: the default set (messages included)
    webhook: str = ""
    webhook_secret: str = ""
    webhook_max_connections: int = 0
    webhook_tag: str = ""
    last_error_date: int = 0
    last_error_message: str = ""
    next_set_webhook: float = 0.0
    actor: _WebhookActor | None = None
    new_update: asyncio.Event = field(default_factory=asyncio.Event)
    buckets: dict[str, _Bucket] = field(default_factory=dict)  # "overall", "paid", "chat:<id>"


def chat_key(update: dict[str, Any]) -> int | None:
    """The delivery queue of an update: its chat, else its user; None: a queue of its own."""
    for value in update.values():
        if isinstance(value, dict):
            chat = value.get("chat")
            if isinstance(chat, dict) and "id" in chat:
                return int(chat["id"])
            user = value.get("from")
            if isinstance(user, dict) and "id" in user:
                return int(user["id"])
    return None


def update_type(update: dict[str, Any]) -> str:
    return next((key for key in update if key != "update_id"), "")


@dataclass
class _Retry:
    failures: int
    delay: float
    wake_at: float


class _WebhookActor:
    """Delivers one bot's queue to its webhook the way telegram-bot-api's ``WebhookActor`` does.

    * Candidates: only the first ``2 * max_connections`` queued updates (``max_loaded_updates_``),
      and of those only the oldest of each chat: one update in flight per chat, so a chat's
      updates arrive strictly in order, while chats run in parallel up to ``max_connections``
      (one while nothing succeeded for 10 s, as the real server falls back to one connection).
    * A 2xx answer removes the update from the queue; a JSON object with a ``method`` in the body
      is executed as a Bot API call (not ``get*``, setWebhook, deleteWebhook, close, logOut).
    * Anything else (connection error, timeout, non-2xx) keeps it at the head of its chat and
      retries it after ``retry_base`` seconds, then twice that each time up to ``retry_max``;
      ``Retry-After`` on the answer replaces the delay. getWebhookInfo shows the last error.

    The real server's first retry of an update is immediate and its cap is a random 60-120 s;
    here the first retry waits ``retry_base`` (the tests' spec), the cap is ``retry_max``.
    """

    def __init__(self, fake: FakeBotAPI, state: BotState) -> None:
        self.fake = fake
        self.state = state
        self.url = state.webhook
        self.secret = state.webhook_secret
        self.max_connections = state.webhook_max_connections
        self.tag = state.webhook_tag
        self.wake = asyncio.Event()
        self.busy_chats: set[object] = set()
        self.in_flight: dict[int, asyncio.Task[None]] = {}  # id(update) -> its delivery
        self.retries: dict[int, _Retry] = {}  # id(update) -> its schedule
        self.replies: set[asyncio.Task[Any]] = set()
        self.last_success = float("-inf")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"webhook-{self.state.bot_id}")

    def kick(self) -> None:
        self.wake.set()

    async def close(self) -> None:
        """Stop delivering; updates in flight stay queued (the real actor is closed the same way)."""
        tasks = [t for t in (self._task, *self.in_flight.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                self.wake.clear()
                wake_at = self._launch(session)
                timeout = None if wake_at is None else max(0.0, wake_at - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), timeout)

    def _launch(self, session: aiohttp.ClientSession) -> float | None:
        """Start every delivery that may start now; return when the next retry is due."""
        now = time.monotonic()
        recently_ok = now - self.last_success <= WEBHOOK_NO_SUCCESS_WINDOW
        connections = self.max_connections if recently_ok else 1
        window = self.state.updates[: self.max_connections * WEBHOOK_LOADED_PER_CONNECTION]
        heads: set[object] = set()
        wake_at: float | None = None
        for update in window:
            key: object = chat_key(update)
            if key is None:
                key = ("update", id(update))
            if key in heads:
                continue
            heads.add(key)
            if key in self.busy_chats:
                continue
            retry = self.retries.get(id(update))
            if retry is not None and retry.wake_at > now:
                wake_at = retry.wake_at if wake_at is None else min(wake_at, retry.wake_at)
                continue
            if len(self.in_flight) >= connections:
                break
            attempt = 1 + (retry.failures if retry is not None else 0)
            self.busy_chats.add(key)
            task = asyncio.get_running_loop().create_task(self._deliver(session, update, key, attempt))
            self.in_flight[id(update)] = task
        return wake_at

    async def _deliver(self, session: aiohttp.ClientSession, update: dict[str, Any], key: object,
                       attempt: int) -> None:
        started = time.time()
        status, reason, body, retry_after, error = 0, "", b"", 0.0, ""
        headers = {"Content-Type": "application/json"}
        if self.secret:
            headers[SECRET_HEADER] = self.secret
        try:
            timeout = aiohttp.ClientTimeout(total=self.fake.webhook_timeout)
            async with session.post(self.url, data=json.dumps(update).encode(), headers=headers,
                                    timeout=timeout) as response:
                status, reason = response.status, response.reason or ""
                body = await response.read()
                retry_after = _retry_after(response.headers.get("Retry-After"))
        except TimeoutError:
            error = "Read timeout expired"
        except aiohttp.ClientConnectorError as exc:
            error = f"Connection refused: {exc.os_error}" if exc.os_error else "Connection refused"
        except aiohttp.ClientError:
            error = "Webhook connection closed"
        except Exception as exc:  # noqa: BLE001 - any other failure is a failed delivery, retried later
            error = f"Webhook delivery failed: {type(exc).__name__}"
        finally:
            self.busy_chats.discard(key)
            self.in_flight.pop(id(update), None)
            self.wake.set()
        if error:
            status = 0  # no complete answer, whatever began to arrive
        elif not 200 <= status <= 299:
            error = f"Wrong response from the webhook: {status} {reason}".rstrip()
        ok = not error
        self.fake._record_delivery(Delivery(self.tag, int(update["update_id"]), status, attempt, time.time(),
                                            chat_key(update), started, error))
        if ok:
            self._on_ok(update, body)
        else:
            self._on_error(update, error, retry_after)

    def _on_ok(self, update: dict[str, Any], body: bytes) -> None:
        self.last_success = time.monotonic()
        self.retries.pop(id(update), None)
        queue = self.state.updates
        for i, queued in enumerate(queue):
            if queued is update:
                del queue[i]
                break
        request = _json_object(body)
        method = str(request.pop("method", "")) if request is not None else ""
        if request is None or not method:
            return
        if method.lower() in WEBHOOK_REPLY_FORBIDDEN or method.lower().startswith("get"):
            return
        task = asyncio.get_running_loop().create_task(
            self.fake._execute(self.state, method, request, None, WEBHOOK_REPLY_TAG))
        self.replies.add(task)
        task.add_done_callback(self.replies.discard)

    def _on_error(self, update: dict[str, Any], error: str, retry_after: float) -> None:
        now = time.monotonic()
        retry = self.retries.get(id(update))
        if retry is None:
            retry = self.retries[id(update)] = _Retry(0, self.fake.webhook_retry_base, now)
        retry.failures += 1
        if retry_after > 0:
            retry.wake_at = now + retry_after
        else:
            retry.wake_at = now + retry.delay
            retry.delay = min(retry.delay * 2, self.fake.webhook_retry_max)
        self.state.last_error_date = int(time.time())
        self.state.last_error_message = error


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value or 0), 0.0), WEBHOOK_MAX_RETRY_AFTER)
    except ValueError:
        return 0.0


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body) if body else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _json_list(value: Any) -> list[Any] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value if isinstance(value, list) else None


class FakeBotAPI:
    """The server; run it in a background thread with :meth:`start_in_thread` (tests).

    ``deliver_webhooks`` turns webhook delivery on (off: a set webhook only makes getUpdates
    answer 409, as before). ``webhook_retry_base`` / ``webhook_retry_max`` / ``webhook_timeout``
    shape retries (seconds); ``throttle_repeated_offsets`` turns on the real server's answer to
    the same offset polled again quickly (timeout >= 3 s, limit 1).
    """

    def __init__(self, *, deliver_webhooks: bool = False, webhook_retry_base: float = 1.0,
                 webhook_retry_max: float = 60.0, webhook_timeout: float = 60.0,
                 throttle_repeated_offsets: bool = False, send_limits: SendLimits | None = None) -> None:
        self.bots: dict[int, BotState] = {}
        #: Telegram's send limits, enforced when set (off by default: see UNLIMITED_SENDS_ENV).
        self.send_limits = send_limits
        self.refused: list[Refused] = []
        self.polls: list[Poll] = []
        self.sent: list[Sent] = []
        self.deliveries: list[Delivery] = []
        self.calls: list[tuple[str, str, float]] = []  # (tag, method, at)
        #: The setWebhook calls of :attr:`calls` refused with 429 (more than one a second), by tag.
        self.set_webhook_throttled: list[str] = []
        self.flood: dict[str, list[int]] = {}  # method -> [remaining, retry_after]
        self.flood_chat: dict[str, str] = {}  # method -> only requests to this chat_id
        self.send_delay = 0.0
        self.revoked: set[str] = set()  # tokens answered with 401
        self.sending_now = 0
        self.port = 0
        self.webhook_retry_base = webhook_retry_base
        self.webhook_retry_max = webhook_retry_max
        self.webhook_timeout = webhook_timeout
        self.throttle_repeated_offsets = throttle_repeated_offsets
        self._deliver_webhooks = deliver_webhooks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- app ---------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", r"/{tag:[^/]*}/bot{token}/{method}", self._api)
        app.router.add_route("*", r"/bot{token}/{method}", self._api)
        app.router.add_post("/_fake/message", self._control_message)
        app.router.add_get("/_fake/sent", self._control_sent)
        app.router.add_get("/_fake/polls", self._control_polls)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        # handler_cancellation: a client that goes away cancels its pending getUpdates.
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        for state in self.bots.values():
            await self._close_actor(state)
        if self._runner is not None:
            await self._runner.cleanup()

    def start_in_thread(self) -> FakeBotAPI:
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start())
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-bot-api", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("fake Bot API did not start")
        return self

    def stop_thread(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def url(self, tag: str = "") -> str:
        base = f"http://127.0.0.1:{self.port}"
        return f"{base}/{tag}" if tag else base

    # -- test controls (thread-safe) ---------------------------------------------------------

    def _call(self, fn: Any, *args: Any) -> Any:
        """Run *fn* (plain or async) on the server's loop and return its result."""
        assert self._loop is not None

        async def run() -> Any:
            result = fn(*args)
            if inspect.isawaitable(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def send_user_message(self, bot_id: int, text: str, *, user_id: int = 111, chat_id: int | None = None,
                          photo: bool = False) -> int:
        """Queue a message update as if *user_id* wrote it; return the update's message_id."""
        return int(self._call(self._add_message, bot_id, text, user_id, chat_id or user_id, photo))

    def send_burst(self, bot_id: int, items: Sequence[tuple[str, int, int]]) -> list[int]:
        """Queue one message per ``(text, user_id, chat_id)`` in one go; return their message_ids."""
        return list(self._call(self._add_burst, bot_id, list(items)))

    def restart_update_ids(self, bot_id: int, start: int) -> None:
        """The next update gets id *start* (as after a week without updates, or another server).

        Queued updates keep their ids. The real server only picks a new start for an empty queue;
        restart with updates still queued only to test what a mixed queue does.
        """
        self._call(lambda: setattr(self._bot(bot_id), "last_update_id", start - 1))

    def inject_conflict(self, bot_id: int, count: int = 1, *, include_pending: bool = True) -> None:
        """The next *count* getUpdates end at once with 409 "terminated by other getUpdates request".

        As if a stray request of another poller arrived: with *include_pending*, a getUpdates that
        is pending now is the first to end (its offset was applied when it arrived). No conflict
        window applies. Each shows as outcome "conflict" in the poll record.
        """

        def arm() -> None:
            state = self._bot(bot_id)
            remaining = count
            if include_pending and remaining > 0 and state.poller is not None:
                state.poller.conflict = True
                state.poller.wake.set()
                state.poller = None
                remaining -= 1
            state.injected_conflicts += remaining

        self._call(arm)

    def set_webhook(self, bot_id: int, url: str, *, secret_token: str = "",
                    max_connections: int = WEBHOOK_DEFAULT_MAX_CONNECTIONS,
                    allowed_updates: list[str] | None = None) -> None:
        """Set (or with ``url=""`` delete) the webhook as if another deployment did it.

        No rate limit and no reachability check (those apply to the setWebhook method).
        """
        self._call(lambda: self._apply_webhook(self._bot(bot_id), url, secret_token, max_connections,
                                               allowed_updates, "", False))

    def webhook(self, bot_id: int) -> str:
        return str(self._call(lambda: self._bot(bot_id).webhook))

    def webhook_info(self, bot_id: int) -> dict[str, Any]:
        """What getWebhookInfo answers now."""
        return dict(self._call(lambda: self._webhook_info(self._bot(bot_id))))

    @property
    def deliver_webhooks(self) -> bool:
        return self._deliver_webhooks

    @deliver_webhooks.setter
    def deliver_webhooks(self, value: bool) -> None:
        self._deliver_webhooks = value
        if self._loop is not None:
            self._call(self._sync_actors)

    def set_flood(self, method: str, count: int, retry_after: int, chat_id: str | None = None) -> None:
        """The next *count* calls of *method* (to *chat_id*, if given) get 429 retry_after."""

        def arm() -> None:
            self.flood[method] = [count, retry_after]
            if chat_id is not None:
                self.flood_chat[method] = chat_id

        self._call(arm)

    def pending_updates(self, bot_id: int) -> int:
        return int(self._call(lambda: len(self._bot(bot_id).updates)))

    def snapshot_polls(self) -> list[Poll]:
        with self._lock:
            return [Poll(**vars(p)) for p in self.polls]

    def snapshot_sent(self) -> list[Sent]:
        with self._lock:
            return list(self.sent)

    def snapshot_refused(self) -> list[Refused]:
        with self._lock:
            return list(self.refused)

    def set_send_limits(self, limits: SendLimits | None) -> None:
        """Enforce *limits* from now on (None: off), with every bucket full again."""

        def apply() -> None:
            self.send_limits = limits
            for state in self.bots.values():
                state.buckets.clear()

        self._call(apply)

    def snapshot_deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)

    def conflicts(self) -> int:
        return sum(1 for p in self.snapshot_polls() if p.outcome == "conflict")

    def replies_to(self, message_id: int) -> list[Sent]:
        return [s for s in self.snapshot_sent() if s.reply_to == message_id]

    # -- state -------------------------------------------------------------------------------

    def _bot(self, bot_id: int) -> BotState:
        if bot_id not in self.bots:
            self.bots[bot_id] = BotState(bot_id)
        return self.bots[bot_id]

    def _add_message(self, bot_id: int, text: str, user_id: int, chat_id: int, photo: bool,
                     notify: bool = True) -> int:
        state = self._bot(bot_id)
        state.next_message_id += 1
        chat: dict[str, Any] = {"id": chat_id, "type": "private", "first_name": "User"}
        if chat_id < 0:
            chat = {"id": chat_id, "type": "supergroup", "title": f"Group {-chat_id}"}
        message: dict[str, Any] = {
            "message_id": state.next_message_id,
            "date": int(time.time()),
            "chat": chat,
            "from": {"id": user_id, "is_bot": False, "first_name": "User"},
        }
        if photo:
            message["photo"] = [{"file_id": f"photo-{state.next_message_id}", "file_unique_id": "u",
                                 "width": 10, "height": 10}]
            if text:
                message["caption"] = text
        else:
            message["text"] = text
            if text.startswith("/"):
                command = text.split()[0]
                message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(command)}]
        # As the real server: an update type the bot did not allow is never queued.
        if state.allowed_updates is None or "message" in state.allowed_updates:
            state.last_update_id += 1
            state.updates.append({"update_id": state.last_update_id, "message": message})
            if notify:
                self._notify(state)
        return int(state.next_message_id)

    def _add_burst(self, bot_id: int, items: list[tuple[str, int, int]]) -> list[int]:
        ids = [self._add_message(bot_id, text, user_id, chat_id, False, False) for text, user_id, chat_id in items]
        self._notify(self._bot(bot_id))
        return ids

    def _notify(self, state: BotState) -> None:
        state.new_update.set()
        if state.actor is not None:
            state.actor.kick()

    def _record_delivery(self, delivery: Delivery) -> None:
        with self._lock:
            self.deliveries.append(delivery)

    # -- webhooks ----------------------------------------------------------------------------

    async def _apply_webhook(self, state: BotState, url: str, secret: str, max_connections: int,
                             allowed_updates: list[str] | None, tag: str, drop_pending: bool) -> None:
        """Set the webhook to *url* ("" deletes it): close the old actor, start a new one."""
        await self._close_actor(state)
        if drop_pending:
            state.updates = []
        if allowed_updates is not None:
            state.allowed_updates = allowed_updates or None
        if url and state.poller is not None:
            state.poller.aborted_by_webhook = True
            state.poller.wake.set()
            state.poller = None
        state.last_error_date, state.last_error_message = 0, ""  # as the real on_webhook_closed
        state.webhook, state.webhook_tag = url, tag
        state.webhook_secret = secret if url else ""
        state.webhook_max_connections = max_connections if url else 0
        self._sync_actor(state)

    async def _sync_actors(self) -> None:
        for state in self.bots.values():
            if self._deliver_webhooks:
                self._sync_actor(state)
            else:
                await self._close_actor(state)

    def _sync_actor(self, state: BotState) -> None:
        if self._deliver_webhooks and state.webhook and state.actor is None:
            state.actor = _WebhookActor(self, state)
            state.actor.start()

    async def _close_actor(self, state: BotState) -> None:
        actor, state.actor = state.actor, None
        if actor is not None:
            await actor.close()

    def _webhook_info(self, state: BotState) -> dict[str, Any]:
        info: dict[str, Any] = {"url": state.webhook, "has_custom_certificate": False,
                                "pending_update_count": len(state.updates)}
        if state.last_error_date:
            info["last_error_date"] = state.last_error_date
            info["last_error_message"] = state.last_error_message
        if state.webhook_max_connections:
            info["max_connections"] = state.webhook_max_connections
        if state.webhook:
            info["ip_address"] = "127.0.0.1"
        if state.allowed_updates is not None:
            info["allowed_updates"] = list(state.allowed_updates)
        return info

    # -- the API -----------------------------------------------------------------------------

    @staticmethod
    def _ok(result: Any, description: str | None = None) -> web.Response:
        body: dict[str, Any] = {"ok": True, "result": result}
        if description:
            body["description"] = description
        return web.json_response(body)

    @staticmethod
    def _error(code: int, description: str, **parameters: Any) -> web.Response:
        body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
        if parameters:
            body["parameters"] = parameters
        return web.json_response(body, status=code)

    async def _params(self, request: web.Request) -> dict[str, Any]:
        params: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            if request.content_type == "application/json":
                params.update(await request.json())
            else:
                for key, value in (await request.post()).items():
                    params[key] = value if isinstance(value, str) else getattr(value, "filename", "")
        return params

    async def _api(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        method = request.match_info["method"]
        tag = request.match_info.get("tag", "")
        bot_id_text, _, secret = token.partition(":")
        if not bot_id_text.isdigit() or len(secret) < 30 or token in self.revoked:
            with self._lock:
                self.calls.append((tag, method, time.time()))
            return self._error(401, "Unauthorized")
        state = self._bot(int(bot_id_text))
        params = await self._params(request)
        return await self._execute(state, method, params, request, tag)

    async def _execute(self, state: BotState, method: str, params: Params, request: Req | None,
                       tag: str) -> web.Response:
        """One Bot API call, from HTTP or from a webhook's answer (*request* None)."""
        with self._lock:
            self.calls.append((tag, method, time.time()))
        flood = self.flood.get(method)
        wanted_chat = self.flood_chat.get(method)
        if wanted_chat is not None and str(params.get("chat_id")) != wanted_chat:
            flood = None
        if flood and flood[0] > 0:
            flood[0] -= 1
            if method == "getUpdates":
                with self._lock:
                    self.polls.append(Poll(tag, time.time(), None, 0, time.time(), "flood"))
            return self._error(429, f"Too Many Requests: retry after {flood[1]}", retry_after=flood[1])
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:  # method names are case-insensitive on the real server
            handler = next((getattr(self, name) for name in dir(self)
                            if name.startswith("_m_") and name[3:].lower() == method.lower()), None)
        if handler is None:
            return self._error(404, "Not Found: method not found")
        result: web.Response = await handler(state, params, request, tag)
        return result

    async def _m_getMe(self, state: BotState, params: Params, request: Req | None, tag: str) -> Resp:
        return self._ok({"id": state.bot_id, "is_bot": True, "first_name": "Fake",
                         "username": f"fake_{state.bot_id}_bot"})

    async def _m_deleteWebhook(self, state: BotState, params: Params, request: Req | None, tag: str) -> Resp:
        drop = _to_bool(params.get("drop_pending_updates"))
        if not state.webhook and not drop:
            return self._ok(True, "Webhook is already deleted")
        await self._apply_webhook(state, "", "", 0, None, tag, drop)
        return self._ok(True, "Webhook was deleted")

    async def _m_setWebhook(self, state: BotState, params: Params, request: Req | None, tag: str) -> Resp:
        url = str(params.get("url") or "")
        if not url:
            return await self._m_deleteWebhook(state, params, request, tag)
        now = time.monotonic()
        if now < state.next_set_webhook:
            with self._lock:
                self.set_webhook_throttled.append(tag)
            return self._error(429, f"Too Many Requests: retry after {SET_WEBHOOK_RETRY_AFTER}",
                               retry_after=SET_WEBHOOK_RETRY_AFTER)
        state.next_set_webhook = now + SET_WEBHOOK_INTERVAL
        secret = str(params.get("secret_token") or "")
        max_connections = min(max(int(params.get("max_connections") or WEBHOOK_DEFAULT_MAX_CONNECTIONS), 1),
                              WEBHOOK_MAX_CONNECTIONS_LIMIT)
        allowed = _json_list(params["allowed_updates"]) if params.get("allowed_updates") else None
        drop = _to_bool(params.get("drop_pending_updates"))
        if (url, secret, max_connections) == (state.webhook, state.webhook_secret, state.webhook_max_connections) \
                and not drop:
            if allowed is not None:
                state.allowed_updates = allowed or None
            return self._ok(True, "Webhook is already set")
        if len(secret) > 256:
            return self._error(400, "Bad Request: secret token is too long")
        if not SECRET_TOKEN_PATTERN.fullmatch(secret):
            return self._error(400, "Bad Request: secret token contains unallowed characters")
        parsed = urllib.parse.urlsplit(url if "://" in url else f"https://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            return self._error(400, "Bad Request: invalid webhook URL specified")
        if self._deliver_webhooks:
            problem = await _tcp_problem(parsed)
            if problem:
                return self._error(400, f"Bad Request: bad webhook: {problem}")
        await self._apply_webhook(state, url, secret, max_connections, allowed, tag, drop)
        return self._ok(True, "Webhook was set")

    async def _m_getWebhookInfo(self, state: BotState, params: Params, request: Req | None, tag: str) -> Resp:
        return self._ok(self._webhook_info(state))

    async def _m_setMyCommands(self, state: BotState, params: Params, request: Req | None, tag: str) -> Resp:
        return self._ok(True)

    def _confirm(self, state: BotState, offset: int, poll: Poll) -> None:
        """Apply a getUpdates offset as the real server does, when the request arrives."""
        if offset < 0:
            state.updates = state.updates[offset:]
        elif offset > state.last_update_id + 1 + OFFSET_FUTURE_SLACK:
            poll.invalid_offset = True  # "Specified from_id is in the future": served from the head
        elif offset > 0:
            state.updates = [u for u in state.updates if u["update_id"] >= offset]

    async def _m_getUpdates(self, state: BotState, params: Params, request: Req | None, tag: str) -> Resp:
        assert request is not None, "getUpdates is never called from a webhook answer"
        offset = int(params["offset"]) if params.get("offset") not in (None, "") else None
        limit = max(1, min(MAX_LIMIT, int(params.get("limit") or MAX_LIMIT)))
        timeout = float(params.get("timeout") or 0)
        poll = Poll(tag, time.time(), offset, timeout)
        with self._lock:
            self.polls.append(poll)
        if state.webhook:
            return self._finish(poll, "webhook", self._error(409, WEBHOOK_TEXT))
        if params.get("allowed_updates"):
            allowed = _json_list(params["allowed_updates"])
            if allowed is not None:
                state.allowed_updates = allowed or None
        if self.throttle_repeated_offsets:
            now = time.monotonic()
            if (offset or 0) == state.previous_offset:
                if timeout < REPEAT_MIN_TIMEOUT and now < state.previous_poll_start + REPEAT_TIMEOUT_WINDOW:
                    timeout = REPEAT_MIN_TIMEOUT
                if now < state.previous_poll_start + REPEAT_LIMIT_WINDOW:
                    limit = 1
            state.previous_offset, state.previous_poll_start = offset or 0, now
        self._confirm(state, offset or 0, poll)
        if state.injected_conflicts > 0:
            state.injected_conflicts -= 1
            return self._finish(poll, "conflict", self._error(409, CONFLICT_TEXT))
        me = _Waiter(poll, request)
        # One poller per token: end the older one (at most once per CONFLICT_WINDOW).
        while state.poller is not None and state.poller is not me:
            old = state.poller
            transport = old.request.transport
            if transport is None or transport.is_closing():
                old.poll.outcome = "gone"
                state.poller = None
                break
            wait = state.last_conflict + CONFLICT_WINDOW - time.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            state.last_conflict = time.time()
            old.conflict = True
            old.wake.set()
            state.poller = None
        state.poller = me
        try:
            deadline = time.monotonic() + timeout
            while not state.updates and not me.conflict and not me.aborted_by_webhook:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                state.new_update.clear()
                waits = [asyncio.ensure_future(state.new_update.wait()),
                         asyncio.ensure_future(me.wake.wait())]
                try:
                    await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
            if me.conflict:
                return self._finish(poll, "conflict", self._error(409, CONFLICT_TEXT))
            if me.aborted_by_webhook:
                return self._finish(poll, "webhook", self._error(409, SET_WEBHOOK_ABORT_TEXT))
            batch = state.updates[:limit]
            poll.count = len(batch)
            return self._finish(poll, "ok", self._ok(batch))
        except asyncio.CancelledError:
            poll.outcome = "gone"
            poll.ended = time.time()
            raise
        finally:
            if state.poller is me:
                state.poller = None

    def _finish(self, poll: Poll, outcome: str, response: web.Response) -> web.Response:
        poll.outcome = outcome
        poll.ended = time.time()
        return response

    async def _send(self, state: BotState, params: dict[str, Any], tag: str, method: str,
                    extra: dict[str, Any]) -> web.Response:
        chat_id = str(params.get("chat_id", ""))
        if not chat_id:
            return self._error(400, "Bad Request: chat_id is empty")
        if chat_id.startswith("@") and "missing" in chat_id:
            return self._error(400, "Bad Request: chat not found")
        refused = self._over_limit(state, chat_id, _to_bool(params.get("allow_paid_broadcast")))
        if refused is not None:
            limit, retry_after = refused
            with self._lock:
                self.refused.append(Refused(tag, chat_id, retry_after, limit, time.time()))
            return self._error(429, f"Too Many Requests: retry after {retry_after}", retry_after=retry_after)
        reply_to = None
        if params.get("reply_parameters"):
            rp = params["reply_parameters"]
            rp = json.loads(rp) if isinstance(rp, str) else rp
            reply_to = int(rp.get("message_id"))
        elif params.get("reply_to_message_id"):
            reply_to = int(params["reply_to_message_id"])
        self.sending_now += 1
        try:
            if self.send_delay:
                await asyncio.sleep(self.send_delay)
        finally:
            self.sending_now -= 1
        state.next_message_id += 1
        text = params.get("text", params.get("caption"))
        with self._lock:
            self.sent.append(Sent(tag, method, chat_id, text, reply_to, state.next_message_id, time.time()))
        numeric = int(chat_id) if chat_id.lstrip("-").isdigit() else -1001
        chat: dict[str, Any] = {"id": numeric, "type": "supergroup" if numeric < 0 else "private"}
        if chat_id.startswith("@"):
            chat = {"id": -1001234567890, "type": "channel", "username": chat_id[1:], "title": chat_id}
        message = {"message_id": state.next_message_id, "date": int(time.time()), "chat": chat, **extra}
        if text is not None:
            message["text" if method == "sendMessage" else "caption"] = text
        return self._ok(message)

    def _over_limit(self, state: BotState, chat_id: str, paid: bool) -> tuple[str, int] | None:
        """None if a send to *chat_id* may go now (its tokens taken), else (limit, retry_after)."""
        limits = self.send_limits
        if limits is None:
            return None
        now = time.monotonic()
        group = chat_id.startswith(("-", "@"))
        chat = state.buckets.get(f"chat:{chat_id}")
        if chat is None:
            chat = state.buckets[f"chat:{chat_id}"] = _Bucket(limits.group if group else limits.private, now)
        kind = "paid" if paid else "overall"
        overall = state.buckets.get(kind)
        if overall is None:
            overall = state.buckets[kind] = _Bucket(limits.paid if paid else limits.overall, now)
        for limit, bucket in (("chat", chat), ("overall", overall)):
            wait = bucket.wait(now)
            if wait > 0:
                return limit, max(1, math.ceil(wait))
        chat.tokens -= 1.0
        overall.tokens -= 1.0
        return None

    async def _m_sendMessage(self, state: BotState, params: Params, request: Req | None, tag: str) -> Resp:
        return await self._send(state, params, tag, "sendMessage", {})

    async def _m_sendPhoto(self, state: BotState, params: Params, request: Req | None, tag: str) -> Resp:
        photo = [{"file_id": str(params.get("photo")), "file_unique_id": "u", "width": 10, "height": 10}]
        return await self._send(state, params, tag, "sendPhoto", {"photo": photo})

    # -- HTTP controls (for the manual demo) -------------------------------------------------

    async def _control_message(self, request: web.Request) -> web.Response:
        body = await request.json()
        user_id = int(body.get("user_id", 111))
        message_id = self._add_message(int(body["bot_id"]), str(body["text"]), user_id,
                                       int(body.get("chat_id", user_id)), False)
        return web.json_response({"message_id": message_id})

    async def _control_sent(self, _request: web.Request) -> web.Response:
        return web.json_response([vars(s) for s in self.snapshot_sent()])

    async def _control_polls(self, _request: web.Request) -> web.Response:
        return web.json_response([vars(p) for p in self.snapshot_polls()])


def _to_bool(value: Any) -> bool:
    """``Client::to_bool``: true, yes or 1 (any case)."""
    return str(value).strip().lower() in ("true", "yes", "1") if value is not None else False


async def _tcp_problem(url: urllib.parse.SplitResult) -> str:
    """Why the webhook's host does not accept a connection ("" when it does)."""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(url.hostname, port), WEBHOOK_VERIFY_TIMEOUT)
    except TimeoutError:
        return "Connection timed out"
    except OSError as exc:
        return f"Connection refused: {exc.strerror or exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return ""


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.fake_bot_api", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the fake server")
    serve.add_argument("--port", type=int, default=8081)
    serve.add_argument("--deliver-webhooks", action="store_true", help="POST updates to a set webhook")
    serve.add_argument("--send-limits", action="store_true", help="enforce Telegram's send limits (429)")
    send = sub.add_parser("send", help="make a user write to the bot")
    send.add_argument("--port", type=int, default=8081)
    send.add_argument("--bot-id", type=int, default=123456)
    send.add_argument("--user-id", type=int, default=111)
    send.add_argument("--text", required=True)
    sub.add_parser("sent", help="print what the bot sent").add_argument("--port", type=int, default=8081)
    args = parser.parse_args(argv)
    if args.command == "serve":
        fake = FakeBotAPI(deliver_webhooks=args.deliver_webhooks,
                          send_limits=SendLimits() if args.send_limits else None)

        async def run() -> None:
            await fake.start(port=args.port)
            print(f"fake Bot API on http://127.0.0.1:{fake.port} (TELEGRAM_API_URL)", flush=True)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()

        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run())
        return 0
    base = f"http://127.0.0.1:{args.port}/_fake/"
    if args.command == "send":
        body = json.dumps({"bot_id": args.bot_id, "text": args.text, "user_id": args.user_id}).encode()
        request = urllib.request.Request(base + "message", body, {"Content-Type": "application/json"})
        print(urllib.request.urlopen(request, timeout=5).read().decode())
        return 0
    for item in json.loads(urllib.request.urlopen(base + "sent", timeout=5).read()):
        print(f"[{item['tag'] or '-'}] to {item['chat_id']}: {item['text']!r} (reply to {item['reply_to']})")
    return 0


if __name__ == "__main__":
    sys.exit(_cli(sys.argv[1:]))
