"""Webhook mode: every replica receives into the durable inbox, the leader handles.

Why not aiogram's ``SimpleRequestHandler``: it answers 200 before the handler ran (an update in
flight is lost by kill -9) and has no notion of a leader, so behind a load balancer every replica
would handle what it received, and run the scheduler too.

Here, two halves:

* :class:`WebhookReceiver`, on **every** replica (active or passive): a POST route on the health
  server's port at the path of ``WEBHOOK_URL``. The secret header is checked in constant time
  (401, nothing stored); a body too large or not an Update is refused (400, one log line); a valid
  update is stored in the inbox and answered 200 only after the commit; deliveries that arrive
  together share one transaction (:mod:`utils.updates.group_commit`).
  If the inbox cannot be written the answer is 503 with ``Retry-After``: Telegram keeps the update
  and delivers it again. Receiving never calls Telegram (a passive replica cannot).
* :class:`WebhookRole`, a role of the leadership controller (instead of polling) and the second
  source of the update pipeline (the sink, :mod:`utils.updates.pipeline`): starts the pipeline,
  registers the webhook (``setWebhook`` at most once per activation, and only when
  ``getWebhookInfo`` or our record of the last registration differs), and adopts the rows the
  replicas stored into the sink, as many as it has room for: at once on a notification
  (PostgreSQL ``LISTEN``; in-process when the receiving replica is the leader itself), and on a
  short sweep as a safety net (the only way on SQLite, whose replicas share one host and one
  file); a full sink is waited for, then adoption goes on. Nobody deletes the webhook on stop:
  updates keep flowing into the inbox through a handover.

Order per chat: Telegram has one delivery in flight per chat and sends the next only after a 2xx,
which we give after the commit, so a chat's rows are in the inbox in its order; the pipeline runs
them in inbox order.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from aiogram import Bot
from aiogram.exceptions import TelegramBadRequest, TelegramRetryAfter, TelegramUnauthorizedError
from aiogram.fsm.strategy import FSMStrategy
from aiogram.types import Update, WebhookInfo
from aiohttp import web
from pydantic import ValidationError

from utils.base.episode import FailureEpisode
from utils.base.interrupt import set_within
from utils.base.lease import Lease, LeaseLost
from utils.base.lookup import BoundedLookup, cancel_within, within
from utils.state.database import DatabaseTarget
from utils.state.fencing import FencedError
from utils.state.inbox import NewUpdate, is_row_error, unstorable
from utils.state.notify import inbox_listener, notify_inbox
from utils.state.store import StateStore
from utils.updates.group_commit import GroupCommit
from utils.updates.passive_notice import PassiveNotice
from utils.updates.pipeline import CANCEL_GRACE, UpdatePipeline, to_new_update

log = logging.getLogger("solobot.webhook")


SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
#: A delivery larger than this is refused (an Update is a few KB; this bounds memory per request).
MAX_BODY_BYTES = 1 << 20
#: A delivery's body must have arrived within this many seconds of its head (then 408).
BODY_TIMEOUT = 10.0
#: ``Content-Encoding`` values of a body taken as it is: Telegram sends plain JSON, and an encoded
#: body is never inflated (a 1 MB gzip body can inflate to 1 GB).
PLAIN_ENCODINGS = frozenset({"", "identity"})
#: Connections the webhook's own port holds at once (Telegram's up to 100, a balancer's pool);
#: lowered to fit the open-file limit (utils/ops/http_listener.py).
WEBHOOK_HTTP_CONNECTIONS = 1024
#: A delivery waits at most this long for the inbox write; then 503 and Telegram retries.
STORE_TIMEOUT = 5.0
#: A NOTIFY to wake the leader gives up after this (the leader's sweep finds the rows anyway).
NOTIFY_TIMEOUT = 1.0
#: ``Retry-After`` on a 503: Telegram waits this long before delivering again.
RETRY_AFTER_SECONDS = 1
#: The PASSIVE_NOTICE lookup (one indexed query) gives up after this; the delivery is answered anyway.
NOTICE_LOOKUP_TIMEOUT = 0.5
#: Refused deliveries are logged at WARNING at most once per this many seconds (then DEBUG).
REFUSAL_LOG_INTERVAL = 60.0
#: The leader looks for rows stored elsewhere this often when nothing woke it: on SQLite this is
#: how it learns of them; on PostgreSQL only a safety net behind LISTEN/NOTIFY.
SWEEP_SQLITE = 0.05
SWEEP_POSTGRES = 1.0
#: A failed adoption (database down) is retried after this long.
ADOPT_RETRY = 0.5
#: getWebhookInfo for /health is refreshed this often on the leader (never on a /health request).
INFO_REFRESH = 30.0
#: Registration that failed (Telegram unreachable, bad URL): from this, doubling, capped.
REGISTER_RETRY_FIRST, REGISTER_RETRY_MAX = 1.0, 300.0
#: A dropped LISTEN connection is opened again after this long (the sweep covers the gap).
LISTEN_RETRY = 1.0
#: The flag that records what this bot last registered (a hash: the secret is never stored).
REGISTRATION_FLAG = "webhook_registration"


# -- receiving, on every replica ------------------------------------------------------------


@dataclass
class ReceiverStats:
    """Counters for /health and /metrics; ``inbox_error`` is set while the inbox cannot be written."""

    accepted: int = 0
    duplicates: int = 0
    unauthorized: int = 0
    malformed: int = 0
    unavailable: int = 0
    inbox_error: str | None = None


class _Throttle:
    """At most one WARNING per interval for a kind of refusal (the rest at DEBUG)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}

    def level(self, kind: str) -> int:
        now = time.monotonic()
        if now - self._last.get(kind, float("-inf")) >= self.interval:
            self._last[kind] = now
            return logging.WARNING
        return logging.DEBUG


class BodyTooLarge(Exception):
    pass


async def read_limited(request: web.Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, or :class:`BodyTooLarge` as soon as it exceeds *limit* bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"{request.content_length} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def describe_peer(request: web.Request) -> str:
    """The peer as the socket says, and what a balancer's ``X-Real-IP`` claims (not a fact: any
    client can send that header)."""
    claimed = request.headers.get("X-Real-IP")
    peer = request.remote or "?"
    return f"{peer} (X-Real-IP {claimed[:64]!r})" if claimed and claimed != peer else peer


def parse_update(body: bytes) -> Update:
    """An Update from a delivery's body; :class:`ValueError` with one line if it is not one."""
    try:
        return Update.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(part) for part in errors[0]["loc"]) if errors else ""
        what = errors[0]["msg"] if errors else "invalid"
        raise ValueError(f"not an Update ({where or 'body'}: {what}; "
                         f"{exc.error_count()} error(s))") from None


def secret_matches(given: str | None, expected: bytes) -> bool:
    """Constant-time comparison of the secret header (missing never matches)."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected)


class WebhookReceiver:
    """The webhook route on every replica: check, store durably, then answer."""

    def __init__(self, store: StateStore, *, path: str, secret: str,
                 on_stored: Callable[[], bool] = lambda: False,
                 notice: PassiveNotice | None = None,
                 strategy: FSMStrategy = FSMStrategy.USER_IN_CHAT) -> None:
        """*on_stored* is called after new rows committed; it returns True when this process
        leads and was woken directly (then no NOTIFY is needed). *notice*: PASSIVE_NOTICE.
        *strategy*: the dispatcher's FSM strategy, which the rows' ordering key follows."""
        self.store = store
        self.strategy = strategy
        self.notice = notice
        self.path = path or "/"
        self._secret = secret.encode()
        self._on_stored = on_stored
        self.stats = ReceiverStats()
        self._throttle = _Throttle(REFUSAL_LOG_INTERVAL)
        self._commits: GroupCommit[NewUpdate] = GroupCommit(self._write, is_item_error=is_row_error)
        self._oldest_unclaimed = BoundedLookup(store.inbox.oldest_unclaimed_age, NOTICE_LOOKUP_TIMEOUT,
                                               name="PASSIVE_NOTICE lookup")
        self._notifier: asyncio.Task[None] | None = None
        self._notify_again = False

    async def _write(self, rows: Sequence[NewUpdate]) -> list[bool]:
        """One transaction for a batch of deliveries; which of them were new.

        Stored unclaimed, on the leader too: the leader takes every row through one path (its
        adoption, oldest first), so a chat's updates reach its queue in inbox order whichever
        replica received them. (A leader that queued its own deliveries directly could run a
        chat's update before the one a passive replica stored just before it and the leader
        has not adopted yet; it measured no faster either.)
        """
        batch = await within(self.store.inbox.store_batch(rows, epoch=None), STORE_TIMEOUT, name="the inbox write")
        if batch.new and not self._on_stored():
            self._notify_leader()
        new = {(entry.update_id, entry.payload) for entry in batch.new}
        return [(row.update_id, row.payload) in new for row in rows]

    def _notify_leader(self) -> None:
        """NOTIFY the leader in the background: a slow NOTIFY must not hold up the next batch.
        Coalesced: while one is on its way, later commits ask for one more after it."""
        if self._notifier is not None and not self._notifier.done():
            self._notify_again = True
            return
        self._notifier = asyncio.create_task(self._notify_loop(), name="solobot-webhook-notify")

    async def _notify_loop(self) -> None:
        self._notify_again = True
        while self._notify_again:
            self._notify_again = False
            try:
                await within(notify_inbox(self.store.engine, self.store.bot_id), NOTIFY_TIMEOUT, name="NOTIFY")
            except Exception as exc:  # noqa: BLE001 - stored; the leader's sweep finds it
                log.debug("webhook: NOTIFY after storing updates failed: %s", exc)

    def routes(self) -> list[web.RouteDef]:
        return [web.post(self.path, self.handle)]

    def ready(self) -> tuple[bool, str]:
        """Whether a balancer should send deliveries here: yes while the inbox can be written."""
        if self.stats.inbox_error is not None:
            return False, f"webhook: the inbox cannot be written ({self.stats.inbox_error})"
        return True, "accepting webhook deliveries"

    async def handle(self, request: web.Request) -> web.Response:
        """The secret first, before anything that costs: the body is not read (nor inflated: it
        never is) for a delivery without it."""
        peer = describe_peer(request)
        if not secret_matches(request.headers.get(SECRET_HEADER), self._secret):
            self.stats.unauthorized += 1
            log.log(self._throttle.level("secret"), "webhook delivery from %s refused (401): %s secret "
                    "header", peer, "no" if SECRET_HEADER not in request.headers else "wrong")
            return web.Response(status=401, text="unauthorized")
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in PLAIN_ENCODINGS:
            self.stats.malformed += 1
            log.log(self._throttle.level("encoding"), "webhook delivery from %s refused (415): "
                    "Content-Encoding %.40r (only plain JSON is taken)", peer, encoding)
            return web.Response(status=415, text="unsupported content encoding")
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                body = await read_limited(request)
        except TimeoutError:
            self.stats.malformed += 1
            log.log(self._throttle.level("slow"), "webhook delivery from %s refused (408): body not "
                    "received within %.0f s", peer, BODY_TIMEOUT)
            return web.Response(status=408, text="request timeout")
        except BodyTooLarge as exc:
            self.stats.malformed += 1
            log.warning("webhook delivery from %s refused (400): body too large (%s)", peer, exc)
            return web.Response(status=400, text="bad request")
        try:
            update = parse_update(body)
            row = to_new_update(update, self.strategy)
            problem = unstorable(row)
            if problem:
                raise ValueError(problem)
        except ValueError as exc:
            self.stats.malformed += 1
            log.warning("webhook delivery from %s refused (400): %s", peer, exc)
            return web.Response(status=400, text="bad request")
        try:
            new = await within(self._commits.submit(row), STORE_TIMEOUT, name="the inbox write")
        except Exception as exc:  # noqa: BLE001 - any failure to store: Telegram must deliver again
            if is_row_error(exc):  # this delivery's data, alone (the others of its batch are stored)
                self.stats.malformed += 1
                log.warning("webhook delivery from %s refused (400): the inbox cannot hold it (%s)",
                            peer, self.store.describe_error(exc))
                return web.Response(status=400, text="bad request")
            self.stats.unavailable += 1
            reason = self.store.describe_error(exc, waited=STORE_TIMEOUT)
            if self.stats.inbox_error is None:
                log.warning("webhook: cannot store updates in the inbox (%s); answering 503, "
                            "Telegram delivers them again", reason)
            self.stats.inbox_error = reason
            return web.Response(status=503, text="inbox unavailable",
                                headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        if self.stats.inbox_error is not None:
            log.info("webhook: the inbox can be written again")
            self.stats.inbox_error = None
        if not new:
            self.stats.duplicates += 1  # a re-delivery: answer 200 again, nothing new
            return web.Response(status=200)
        self.stats.accepted += 1
        if self.notice is not None and not self._on_stored():
            reply = await self._notice_for(update)
            if reply is not None:
                return web.json_response(reply)
        return web.Response(status=200)

    async def _notice_for(self, update: Update) -> dict[str, Any] | None:
        """PASSIVE_NOTICE as a method in the 200's body (Telegram executes it: no Bot API call
        leaves this replica), when nobody has taken a stored update for a few seconds."""
        notice = self.notice
        assert notice is not None
        chat_id = notice.chat_of(update)
        if chat_id is None or not notice.may_send(chat_id):
            return None
        try:
            age = await self._oldest_unclaimed()
        except Exception as exc:  # noqa: BLE001 - no notice rather than a late or failed answer
            log.debug("webhook: PASSIVE_NOTICE lookup failed: %s", exc)
            return None
        if age is None or age < notice.after:
            return None
        notice.sent(chat_id)
        return {"method": "sendMessage", "chat_id": chat_id, "text": notice.text}


# -- registration, pure -----------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """What the leader registers with setWebhook."""

    url: str
    secret: str = field(repr=False)
    allowed_updates: tuple[str, ...]
    max_connections: int

    def fingerprint(self) -> str:
        """A hash of all of it, secret included (getWebhookInfo does not return the secret)."""
        text = json.dumps([self.url, self.secret, sorted(self.allowed_updates), self.max_connections])
        return hashlib.sha256(text.encode()).hexdigest()

    def differs(self, info: WebhookInfo, recorded: str | None) -> list[str]:
        """What differs between this and the webhook Telegram has (empty: nothing to do)."""
        why = []
        if info.url != self.url:
            why.append("url")
        if (info.max_connections or 0) != self.max_connections:
            why.append("max_connections")
        if sorted(info.allowed_updates or []) != sorted(self.allowed_updates):
            why.append("allowed_updates")
        if recorded != self.fingerprint():
            why.append("secret (or not registered by solobot)")
        return why


def masked_url(url: str | None) -> str | None:
    """``https://host/***``: a webhook URL's path may hold the token or another secret."""
    if not url:
        return url
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/***" if parts.path.strip("/") else url


def info_for_health(info: WebhookInfo) -> dict[str, Any]:
    return {
        "url": masked_url(info.url),
        "pending_update_count": info.pending_update_count,
        "last_error_message": info.last_error_message,
        "last_error_date": info.last_error_date.timestamp() if info.last_error_date else None,
        "max_connections": info.max_connections,
    }


# -- handling, on the leader -----------------------------------------------------------------


class WebhookRole:
    """The leader's half of webhook mode (a role of the leadership controller): the webhook source,
    adopting what the receivers stored into the sink."""

    name = "webhook"

    def __init__(
        self,
        bot: Bot,
        store: StateStore,
        pipeline: UpdatePipeline,
        *,
        registration: Registration,
        target: DatabaseTarget,
        instance_id: str,
        step_down: Callable[[str], None],
    ) -> None:
        self.bot = bot
        self.store = store
        self.pipeline = pipeline
        self.registration = registration
        self.target = target
        self.instance_id = instance_id
        self.step_down = step_down
        self.sweep = SWEEP_POSTGRES if target.is_postgres else SWEEP_SQLITE
        self.info: dict[str, Any] | None = None  # getWebhookInfo, refreshed on the leader
        self._lease: Lease | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- role interface ----------------------------------------------------------------------

    async def start(self, lease: Lease) -> None:
        self._lease = lease
        self._wake = asyncio.Event()
        await self.pipeline.start(lease)
        self._tasks = [asyncio.create_task(self._adopt_loop(), name="solobot-webhook-adopt"),
                       asyncio.create_task(self._register_and_watch(lease), name="solobot-webhook-register")]
        if self.target.is_postgres:
            self._tasks.append(asyncio.create_task(self._listen_loop(), name="solobot-webhook-listen"))
        self._wake.set()  # rows stored while nobody led

    async def stop(self, *, voluntary: bool) -> None:
        """Stop adopting, then drain the pipeline. The webhook stays set (never deleteWebhook)."""
        tasks, self._tasks = self._tasks, []
        await asyncio.gather(*(cancel_within(task, CANCEL_GRACE) for task in tasks))
        await self.pipeline.stop()
        self._lease = None
        self.info = None

    def wake(self) -> bool:
        """A row was stored by this process: adopt it now. False when not leading."""
        if self._lease is None:
            return False
        self._wake.set()
        return True

    # -- adopting what the replicas stored ---------------------------------------------------

    async def _adopt_loop(self) -> None:
        """Take stored rows into the sink when woken (or on the sweep, if any wait), as many as it
        has room for; a full sink is waited for before taking more."""
        failing = FailureEpisode()
        while True:
            woken = await set_within(self._wake, self.sweep)
            self._wake.clear()
            try:
                if not woken and not await self.store.inbox.has_unclaimed():
                    continue
                room = await self.pipeline.take_stored()
            except LeaseLost:
                return
            except FencedError as exc:
                self.step_down(f"fenced while taking webhook updates: {exc}")
                return
            except Exception as exc:  # noqa: BLE001 - database down: rows wait; retry
                if failing.failed():
                    log.warning("webhook: cannot take stored updates from the inbox (%s); retrying",
                                exc)
                await asyncio.sleep(ADOPT_RETRY)
                continue
            if failing.recovered():
                log.info("webhook: taking stored updates from the inbox again")
            if not room:  # the sink is full and more may wait: take them once it has room
                await self.pipeline.until_room()
                self._wake.set()

    async def _listen_loop(self) -> None:
        """PostgreSQL: wake on every NOTIFY of the bot's inbox channel; reconnect if dropped."""
        failing = FailureEpisode()
        while True:
            try:
                async with inbox_listener(self.target, self.store.bot_id, self.instance_id) as notes:
                    if failing.recovered():
                        log.info("webhook: listening for stored updates again")
                    self._wake.set()  # anything stored while we were not listening
                    async for _ in notes:
                        self._wake.set()
            except Exception as exc:  # noqa: BLE001 - the sweep covers the gap
                if failing.failed():
                    log.warning("webhook: LISTEN connection failed (%s); the sweep every %.1f s "
                                "takes stored updates meanwhile", exc, self.sweep)
            await asyncio.sleep(LISTEN_RETRY)

    # -- registration and getWebhookInfo -----------------------------------------------------

    async def _register_and_watch(self, lease: Lease) -> None:
        registered = False
        delay = REGISTER_RETRY_FIRST
        while True:
            try:
                info = await self.bot.get_webhook_info()
                if not registered:
                    called = await self._register(info, lease)
                    registered = True  # never a second setWebhook in this activation
                    if called:
                        info = await self.bot.get_webhook_info()  # as set (for /health)
                self.info = info_for_health(info)
                delay = REGISTER_RETRY_FIRST
                await asyncio.sleep(INFO_REFRESH)
            except LeaseLost:
                return
            except FencedError as exc:
                self.step_down(f"fenced while recording the webhook registration: {exc}")
                return
            except TelegramUnauthorizedError as exc:
                log.error("webhook: Telegram refuses the token (%s)", exc)
                self.step_down("the bot token is refused")
                return
            except TelegramRetryAfter as exc:
                await asyncio.sleep(exc.retry_after)
            except Exception as exc:  # noqa: BLE001 - Telegram or the network: retry with backoff
                level = logging.ERROR if isinstance(exc, TelegramBadRequest) else logging.WARNING
                log.log(level, "webhook: %s failed (%s); retrying in %.0f s",
                        "getWebhookInfo" if registered else "registration", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, REGISTER_RETRY_MAX)

    async def _register(self, info: WebhookInfo, lease: Lease) -> bool:
        """setWebhook if what Telegram has differs (at most one successful call per activation:
        the caller calls this until it returns); True if it called setWebhook."""
        wanted = self.registration
        try:
            recorded = await self.store.get_flag(REGISTRATION_FLAG)
        except Exception as exc:  # noqa: BLE001 - unsure: register once rather than not at all
            log.debug("webhook: registration record unreadable (%s)", exc)
            recorded = None
        why = wanted.differs(info, recorded)
        if not why:
            log.info("webhook already registered at %s; not set again", wanted.url)
            return False
        await self.bot.set_webhook(
            url=wanted.url, secret_token=wanted.secret, allowed_updates=list(wanted.allowed_updates),
            max_connections=wanted.max_connections, drop_pending_updates=False,
        )
        log.info("webhook registered at %s (max_connections %d, updates: %s; differed: %s)",
                 wanted.url, wanted.max_connections, ", ".join(wanted.allowed_updates) or "default",
                 ", ".join(why))
        try:
            await self.store.set_flag(REGISTRATION_FLAG, wanted.fingerprint(), epoch=lease.epoch)
        except FencedError:
            raise
        except Exception as exc:  # noqa: BLE001 - the next leader registers once more, harmlessly
            log.warning("webhook: could not record the registration (%s)", exc)
        return True


def webhook_path(url: str) -> str:
    """The path part of WEBHOOK_URL: where the route is mounted (``/`` if none)."""
    return urlsplit(url).path or "/"
