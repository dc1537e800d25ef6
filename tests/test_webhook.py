"""Webhook mode end to end: real ``python main.py`` replicas behind a real nginx, the fake Bot API
delivering webhooks as telegram-bot-api's ``WebhookActor`` does.

The balancer is Debian's nginx started by the test on a free port (its own config in tmp_path,
``daemon off``, killed with its process group at the end), with ``proxy_next_upstream`` so a
delivery to a dead or refusing replica goes to the other one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
from aiogram.types import WebhookInfo
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from testbed.balancer import Nginx
from testbed.fake_bot_api import SECRET_HEADER, FakeBotAPI
from tests.conftest import BOT_ID, DATABASE_URL, START_WAIT, TOKEN, BotProcess, free_port, wait_until
from tests.test_postgres import TcpProxy, drop_tables
from utils.config import ConfigError, derive_webhook_secret, load_settings
from utils.state.database import DatabaseTarget
from utils.state.store import StateStore
from utils.updates.passive_notice import PassiveNotice
from utils.updates.webhook import Registration, WebhookReceiver

Spawn = Callable[..., BotProcess]
HOOK_PATH = "/tg/hook"
#: The stream of the "done when": one /ping every 20 ms, round robin over 7 chats, for 6 s.
STREAM_CHATS = 7
STREAM_INTERVAL = 0.02
STREAM_SECONDS = 6.0
#: A reply may be doubled only if it went out this shortly before kill -9 (its done mark was not
#: committed yet: at-least-once for side effects, docs/architecture.md).
UNRECORDED_WINDOW = 0.5
#: A replica's start (aiogram's imports alone take seconds on a loaded 2-core machine).
STARTUP_TIMEOUT = 60.0

@pytest.fixture
def fake() -> Iterator[FakeBotAPI]:
    """The fake Bot API with webhook delivery on; a failed delivery is retried after 0.2 s here."""
    server = FakeBotAPI(deliver_webhooks=True, webhook_retry_base=0.2, webhook_retry_max=2.0,
                        webhook_timeout=10.0).start_in_thread()
    yield server
    server.stop_thread()


@pytest.fixture
def balancer(tmp_path: Path) -> Iterator[Callable[[list[int]], Nginx]]:
    started: list[Nginx] = []

    def start(ports: list[int]) -> Nginx:
        nginx = Nginx(tmp_path, ports, HOOK_PATH)
        started.append(nginx)
        return nginx

    yield start
    for nginx in started:
        nginx.stop()


@pytest.fixture
def pg(worker_database: str) -> str:
    drop_tables(DATABASE_URL)
    return DATABASE_URL


def webhook_env(url: str, port: int, **extra: str) -> dict[str, str]:
    return {"BOT_MODE": "webhook", "WEBHOOK_URL": url, "HEALTH_PORT": str(port), **extra}


def pongs(fake: FakeBotAPI) -> Counter[int | None]:
    return Counter(s.reply_to for s in fake.snapshot_sent() if s.text == "pong")


def calls(fake: FakeBotAPI, method: str) -> list[str]:
    return [tag for tag, m, _ in list(fake.calls) if m == method]


def registrations(fake: FakeBotAPI) -> Counter[str]:
    """setWebhook calls by tag, less those Telegram refused with 429 (one a second per bot): a
    replica that becomes leader within a second of the last registration retries once, by design."""
    return Counter(calls(fake, "setWebhook")) - Counter(fake.set_webhook_throttled)


def idle(*bots: BotProcess) -> bool:
    """Every live replica reports an empty shared inbox and nothing held by its workers."""
    for bot in bots:
        if bot.proc.poll() is not None:
            continue
        updates = (bot.health() or {}).get("updates", {})
        if updates.get("inbox_waiting") != 0 or updates.get("waiting") != 0:
            return False
    return True


class PingStream:
    """One /ping every *interval*, round robin over *chats* chats, in a thread; records per chat."""

    def __init__(self, fake: FakeBotAPI, chats: int, interval: float, seconds: float) -> None:
        self.fake = fake
        self.chats = chats
        self.interval = interval
        self.seconds = seconds
        self.sent: dict[int, list[int]] = defaultdict(list)  # chat -> message ids in order
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PingStream:
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic()
        i = 0
        while time.monotonic() - t0 < self.seconds:
            chat = 5000 + i % self.chats
            self.sent[chat].append(self.fake.send_user_message(BOT_ID, "/ping", user_id=chat, chat_id=chat))
            i += 1
            next_at = t0 + i * self.interval
            time.sleep(max(0.0, next_at - time.monotonic()))
        self.done.set()

    def all_ids(self) -> list[int]:
        return [m for ids in self.sent.values() for m in ids]


def delivery_to_reply(fake: FakeBotAPI, stream: PingStream,
                      first_reply: dict[int, float]) -> list[tuple[float, float]]:
    """(delivered at, seconds to the first reply) per ping. A chat's updates are delivered one at a
    time in order, so its successful deliveries, by update id, are its pings in order."""
    delivered: dict[int, dict[int, float]] = defaultdict(dict)
    for d in fake.snapshot_deliveries():
        if 200 <= d.status < 300 and d.chat_id is not None:
            delivered[d.chat_id].setdefault(d.update_id, d.at)
    out = []
    for chat, ids in stream.sent.items():
        times = [delivered[chat][u] for u in sorted(delivered[chat])]
        out += [(at, first_reply[m] - at) for m, at in zip(ids, times, strict=False)]
    return out


def post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def leader_and_standby(spawn: Spawn, nginx_ports: list[int], url: str, **env: str) -> tuple[BotProcess, BotProcess]:
    """Two replicas started together (they pay for their imports in parallel): (leader, standby)."""
    a = spawn("a", **webhook_env(url, nginx_ports[0], **env))
    b = spawn("b", **webhook_env(url, nginx_ports[1], **env))

    def settled() -> tuple[BotProcess, BotProcess] | None:
        modes = (a.mode(), b.mode())
        if modes == ("active", "passive"):
            return a, b
        return (b, a) if modes == ("passive", "active") else None

    pair: tuple[BotProcess, BotProcess] = wait_until(settled, STARTUP_TIMEOUT,
                                                     "one replica active, the other passive", 0.02)
    return pair


# -- in-process: configuration, registration, the receiver ----------------------------------


BASE_ENV = {"BOT_TOKEN": TOKEN, "ENV_FILE": os.devnull}


def test_webhook_settings() -> None:
    polling = load_settings(BASE_ENV)
    assert polling.bot_mode == "polling" and polling.webhook_url is None
    hook = load_settings({**BASE_ENV, "BOT_MODE": "webhook", "WEBHOOK_URL": "http://127.0.0.1:8080/tg/hook"})
    assert hook.bot_mode == "webhook" and hook.webhook_insecure and hook.webhook_max_connections == 40
    assert hook.webhook_secret == derive_webhook_secret(TOKEN), "every replica derives the same secret"
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,256}", hook.webhook_secret)
    assert derive_webhook_secret(TOKEN + "x") != hook.webhook_secret
    assert hook.webhook_secret not in repr(hook)
    with pytest.raises(ConfigError) as raised:
        load_settings({**BASE_ENV, "BOT_MODE": "webhooks", "WEBHOOK_SECRET": "has space",
                       "WEBHOOK_MAX_CONNECTIONS": "101"})
    problems = "\n".join(raised.value.problems)
    assert "BOT_MODE" in problems and "WEBHOOK_MAX_CONNECTIONS" in problems and "has space" not in problems
    assert "WEBHOOK_SECRET" in problems
    with pytest.raises(ConfigError, match="WEBHOOK_URL: required"):
        load_settings({**BASE_ENV, "BOT_MODE": "webhook"})


def test_registration_differs_only_when_something_changed() -> None:
    wanted = Registration("https://bot.example/tg/hook", "s3cret", ("message",), 40)
    same = WebhookInfo(url=wanted.url, has_custom_certificate=False, pending_update_count=3,
                       max_connections=40, allowed_updates=["message"])
    assert wanted.differs(same, wanted.fingerprint()) == []
    assert wanted.differs(same, None) == ["secret (or not registered by solobot)"]
    other = Registration(wanted.url, "other", ("message",), 40)
    assert other.differs(same, wanted.fingerprint()) == ["secret (or not registered by solobot)"]
    moved = same.model_copy(update={"url": "https://old.example/hook", "max_connections": 10,
                                    "allowed_updates": None})
    assert wanted.differs(moved, wanted.fingerprint()) == ["url", "max_connections", "allowed_updates"]


class FailingInbox:
    async def store_batch(self, updates: object, *, epoch: int | None) -> object:
        raise ConnectionRefusedError("database down")


async def test_receiver_stores_then_answers(tmp_path: Path) -> None:
    target = DatabaseTarget.parse(None, tmp_path)
    store = StateStore.create(target, BOT_ID, "unit")
    await store.open()
    await store.migrate()
    woken: list[int] = []

    def on_stored() -> bool:
        woken.append(1)
        return True  # as if this process led: no NOTIFY (SQLite has none anyway)

    receiver = WebhookReceiver(store, path=HOOK_PATH, secret="s3cret", on_stored=on_stored)
    app = web.Application()
    app.router.add_routes(receiver.routes())
    good = {SECRET_HEADER: "s3cret"}
    try:
        async with TestClient(TestServer(app)) as client:
            body = forged_update(1)
            assert (await client.post(HOOK_PATH, data=body, headers=good)).status == 200
            assert (await client.post(HOOK_PATH, data=body, headers=good)).status == 200  # re-delivery
            assert woken == [1], "woken for the new row only"
            waiting, _oldest = await store.inbox.depth()
            assert waiting == 1
            assert (await client.post(HOOK_PATH, data=body, headers={SECRET_HEADER: "s3creT"})).status == 401
            assert (await client.post(HOOK_PATH, data=b"{}", headers=good)).status == 400
            receiver.store = cast(StateStore, type("Down", (), {"inbox": FailingInbox(),
                                                              "describe_error": store.describe_error})())
            down = await client.post(HOOK_PATH, data=forged_update(2), headers=good)
            assert down.status == 503 and down.headers["Retry-After"] == "1"
            assert receiver.ready()[0] is False and "database down" in (receiver.stats.inbox_error or "")
            receiver.store = store
            assert (await client.post(HOOK_PATH, data=forged_update(2), headers=good)).status == 200
            assert receiver.ready()[0] is True
        stats = receiver.stats
        assert (stats.accepted, stats.duplicates, stats.unauthorized, stats.malformed, stats.unavailable) == \
            (2, 1, 1, 1, 1)
    finally:
        await store.close()


def private_update(update_id: int, chat_id: int) -> bytes:
    return json.dumps({"update_id": update_id, "message": {
        "message_id": update_id, "date": int(time.time()), "text": "hi",
        "chat": {"id": chat_id, "type": "private", "first_name": "U"},
        "from": {"id": chat_id, "is_bot": False, "first_name": "U"}}}).encode()


def test_passive_notice_throttle() -> None:
    now = [100.0]
    notice = PassiveNotice("updating", per_chat=60.0, clock=lambda: now[0])
    assert notice.may_send(1)
    notice.sent(1)
    assert not notice.may_send(1) and notice.may_send(2)
    now[0] += 60.0
    assert notice.may_send(1)


async def test_passive_notice_while_nobody_leads(tmp_path: Path) -> None:
    """No leader takes the rows: the 200 carries sendMessage (Telegram runs it), once per chat."""
    store = StateStore.create(DatabaseTarget.parse(None, tmp_path), BOT_ID, "unit")
    await store.open()
    await store.migrate()
    receiver = WebhookReceiver(store, path=HOOK_PATH, secret="s3cret", on_stored=lambda: False,
                               notice=PassiveNotice("back in a minute", after=0.0))
    app = web.Application()
    app.router.add_routes(receiver.routes())
    good = {SECRET_HEADER: "s3cret"}
    try:
        async with TestClient(TestServer(app)) as client:
            first = await client.post(HOOK_PATH, data=private_update(1, 11), headers=good)
            assert first.status == 200
            assert await first.json() == {"method": "sendMessage", "chat_id": 11, "text": "back in a minute"}
            again = await client.post(HOOK_PATH, data=private_update(2, 11), headers=good)
            assert again.status == 200 and await again.read() == b"", "once per chat per 60 s"
            other = await client.post(HOOK_PATH, data=private_update(3, 12), headers=good)
            assert (await other.json())["chat_id"] == 12
        waiting, _ = await store.inbox.depth()
        assert waiting == 3, "the updates themselves are stored all the same"
    finally:
        await store.close()


# -- the "done when" stream -------------------------------------------------------------------


def test_kill9_of_the_leader_mid_stream_behind_nginx(fake: FakeBotAPI, spawn: Spawn, pg: str,
                                                      balancer: Callable[[list[int]], Nginx]) -> None:
    ports = [free_port(), free_port()]
    nginx = balancer(ports)
    a, b = leader_and_standby(spawn, ports, nginx.url, LOCK_BACKEND="postgres", DATABASE_URL=pg)
    wait_until(lambda: fake.webhook(BOT_ID) == nginx.url, START_WAIT, message="the leader registers the webhook")
    # "held by pid N", or "held by another instance" when b looked before a had written its record
    # (the two start together): either way b announced that it waits as the standby.
    wait_until(lambda: "standby: lock held by" in b.log(), message="b waits as the standby")
    fake.send_delay = 0.2
    stream = PingStream(fake, STREAM_CHATS, STREAM_INTERVAL, STREAM_SECONDS).start()
    time.sleep(STREAM_SECONDS / 3)  # a third of the way in (the stream's own clock)
    t_kill = time.time()
    a.signal(signal.SIGKILL)
    a.wait_exit()
    b.wait_mode("active", STARTUP_TIMEOUT)
    takeover = time.time() - t_kill
    assert stream.done.wait(STREAM_SECONDS + 10)
    pings = stream.all_ids()
    wait_until(lambda: all(fake.replies_to(m) for m in pings), 40, message="every /ping answered", interval=0.05)
    wait_until(lambda: idle(b), 10, message="b idle")

    counts = pongs(fake)
    doubled = [m for m in pings if counts[m] > 1]
    first_reply = {m: min(s.at for s in fake.replies_to(m)) for m in pings}
    late = {m: round(t_kill - first_reply[m], 3) for m in doubled if t_kill - first_reply[m] > UNRECORDED_WINDOW}
    print(f"\nwebhook, kill -9 of the leader mid-stream: {len(pings)} pings, takeover {takeover:.2f} s, "
          f"{len(doubled)} doubled (replied in the instant before the kill)")
    latency = delivery_to_reply(fake, stream, first_reply)
    steady = sorted(v for at, v in latency if not t_kill - 0.5 <= at <= t_kill + takeover + 1.0)
    if steady:
        print(f"delivery -> reply outside the takeover window: p50 {steady[len(steady) // 2] * 1000:.0f} ms, "
              f"p99 {steady[int(len(steady) * 0.99)] * 1000:.0f} ms, max {steady[-1] * 1000:.0f} ms")
    # The guarantee: only a reply whose done mark was not committed yet (sent in the instant before
    # the kill) is answered again. How many that is depends on the group commit's lag, not on the
    # chats: on a quiet machine 0 (the marks commit within DONE_DELAY), on a loaded one up to a few
    # per chat (seen: 8 over 7 chats with replies taking 4 s) - so no bound by the number of chats.
    assert not late, f"answered twice long after their first reply: {late}"
    for chat, ids in stream.sent.items():
        order = sorted(ids, key=lambda m: first_reply[m])
        assert order == ids, f"chat {chat}: answered out of order"
    assert calls(fake, "deleteWebhook") == []
    set_by = registrations(fake)
    assert set_by == Counter({a.name: 1}), f"at most one setWebhook per activation: {set_by}"
    health = b.health()
    assert health is not None and health["updates"]["delivery"] == "webhook"
    assert health["updates"]["inbox_waiting"] == 0
    wait_until(lambda: ((b.health() or {}).get("updates", {}).get("webhook", {}).get("info") or {}).get("url"),
               5, message="b's cached getWebhookInfo")


# -- kill -9 of a passive replica, SIGTERM of the leader (SQLite: the sweep) -----------------


def accepted(bot: BotProcess) -> int:
    """Deliveries this replica stored (its /health), 0 if it does not answer."""
    return int(((bot.health() or {}).get("updates", {}).get("webhook") or {}).get("accepted", 0))


def test_kill9_of_a_passive_then_sigterm_of_the_leader(fake: FakeBotAPI, spawn: Spawn,
                                                       balancer: Callable[[list[int]], Nginx]) -> None:
    """Three replicas (SQLite: the leader learns of the others' rows by its sweep): kill -9 of a
    passive one right after it accepted updates, then SIGTERM of the leader mid-stream."""
    ports = [free_port(), free_port(), free_port()]
    nginx = balancer(ports)
    replicas = [spawn(name, **webhook_env(nginx.url, port)) for name, port in zip("abc", ports, strict=True)]

    def settled() -> BotProcess | None:
        modes = [r.mode() for r in replicas]
        if Counter(modes) != Counter({"active": 1, "passive": 2}):
            return None
        return replicas[modes.index("active")]

    leader = wait_until(settled, STARTUP_TIMEOUT, message="one replica active, two passive", interval=0.02)
    victim, heir = (r for r in replicas if r is not leader)
    wait_until(lambda: fake.webhook(BOT_ID) == nginx.url, START_WAIT, message="the leader registers the webhook")
    fake.send_delay = 0.05
    stream = PingStream(fake, 4, 0.03, 2.5).start()
    wait_until(lambda: accepted(victim) >= 3, 10, message="the passive replica accepts deliveries")
    victim.signal(signal.SIGKILL)
    victim.wait_exit()
    wait_until(lambda: len(stream.all_ids()) >= 40, 10, message="the stream goes on")
    leader.signal(signal.SIGTERM)
    try:
        code = leader.wait_exit(15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the leader did not exit within 15 s of SIGTERM:\n{leader.log()[-4000:]}")
    assert code == 0
    heir.wait_mode("active", STARTUP_TIMEOUT)
    assert stream.done.wait(10)
    pings = stream.all_ids()
    wait_until(lambda: all(fake.replies_to(m) for m in pings), 30, message="every /ping answered", interval=0.05)
    wait_until(lambda: idle(heir), 10, message="the new leader idle")
    counts = pongs(fake)
    assert [m for m in pings if counts[m] != 1] == [], "answered exactly once (no kill -9 of a leader)"
    for chat, ids in stream.sent.items():
        replies = [s.reply_to for s in sorted(fake.snapshot_sent(), key=lambda s: s.at)
                   if s.chat_id == str(chat) and s.text == "pong"]
        assert replies == ids, f"chat {chat}: out of order"
    assert calls(fake, "deleteWebhook") == []
    assert fake.webhook(BOT_ID) == nginx.url, "the webhook stays set through a handover"
    assert registrations(fake) == Counter({leader.name: 1})


# -- the database goes away under a steady stream ---------------------------------------------

#: How long the database is unreachable (the issue's 10 s scaled down: CI time; the mechanism is
#: the same at any length, Telegram just retries longer).
OUTAGE_SECONDS = 3.0


def test_database_outage_answers_503_then_loses_nothing(fake: FakeBotAPI, spawn: Spawn, pg: str,
                                                        balancer: Callable[[list[int]], Nginx]) -> None:
    proxy = TcpProxy()
    try:
        via_proxy = pg.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        ports = [free_port(), free_port()]
        nginx = balancer(ports)
        a, b = leader_and_standby(spawn, ports, nginx.url, LOCK_BACKEND="postgres", DATABASE_URL=via_proxy)
        wait_until(lambda: fake.webhook(BOT_ID) == nginx.url, START_WAIT, message="the leader registers the webhook")
        stream = PingStream(fake, 3, 0.05, OUTAGE_SECONDS + 2.0).start()
        time.sleep(1.0)
        t_cut = time.time()
        proxy.cut()
        wait_until(lambda: any(d.status == 503 and d.at > t_cut for d in fake.snapshot_deliveries()), 10,
                   message="a 503 while the database is away")
        time.sleep(max(0.0, t_cut + OUTAGE_SECONDS - time.time()))  # the outage's length, not a sync
        proxy.restore()
        assert stream.done.wait(15)
        pings = stream.all_ids()
        wait_until(lambda: all(fake.replies_to(m) for m in pings), 40, message="every /ping answered", interval=0.05)
        wait_until(lambda: idle(a, b), 15, message="the replicas idle")
        counts = pongs(fake)
        statuses = Counter(d.status for d in fake.snapshot_deliveries())
        print(f"\nwebhook, database away {OUTAGE_SECONDS:g} s: {len(pings)} pings, deliveries {dict(statuses)}")
        assert [m for m in pings if counts[m] == 0] == []
        # A reply may be doubled only by a leader cut off after its reply and before its done mark.
        assert sum(1 for m in pings if counts[m] > 1) <= 3
        assert calls(fake, "deleteWebhook") == []
        for bot in (a, b):
            assert "Traceback" not in bot.log()
            assert "answering 503" in bot.log() or bot.proc.poll() is not None
    finally:
        proxy.stop()


# -- refused deliveries, then switching the bot to polling and back ------------------------------


def forged_update(message_id: int) -> bytes:
    """A well-formed /ping update that did not come from Telegram."""
    return json.dumps({"update_id": 42, "message": {
        "message_id": message_id, "date": int(time.time()), "text": "/ping",
        "entities": [{"type": "bot_command", "offset": 0, "length": 5}],
        "chat": {"id": 31337, "type": "private", "first_name": "M"},
        "from": {"id": 31337, "is_bot": False, "first_name": "M"}}}).encode()


def test_refused_deliveries_then_switch_to_polling_and_back(fake: FakeBotAPI, spawn: Spawn,
                                                            balancer: Callable[[list[int]], Nginx]) -> None:
    """Forged (no or wrong secret) -> 401, never handled; malformed or too large -> 400, the replica
    stays up; then the same bot moves to polling (one deleteWebhook) and back (one setWebhook)."""
    port = free_port()
    nginx = balancer([port])
    hook = spawn("hook1", **webhook_env(nginx.url, port))
    hook.wait_mode("active", STARTUP_TIMEOUT)
    # The next replica of a rolling deploy that switches the mode, started now so that its start
    # overlaps the checks below; it waits as the standby.
    poller = spawn("poller")
    wait_until(lambda: fake.webhook(BOT_ID) == nginx.url, message="the webhook registered")
    direct = f"http://127.0.0.1:{port}{HOOK_PATH}"
    forged_id = 987654
    forged = forged_update(forged_id)
    secret = derive_webhook_secret(TOKEN)
    for url in (direct, nginx.url):
        assert post(url, forged, {}) == 401
        assert post(url, forged, {SECRET_HEADER: "x" + secret[1:]}) == 401
        assert post(url, forged, {SECRET_HEADER: ""}) == 401
    good = {SECRET_HEADER: secret}
    assert post(direct, b"{not json", good) == 400
    assert post(direct, b'{"message": {"text": "no update_id"}}', good) == 400
    assert post(direct, b"[1, 2]", good) == 400
    assert post(direct, b'{"update_id": 1, "padding": "' + b"x" * (2 << 20) + b'"}', good) == 400

    first = fake.send_user_message(BOT_ID, "/ping")
    wait_until(lambda: fake.replies_to(first), message="a real update still answered")
    wait_until(lambda: idle(hook), message="the replica idle")
    assert hook.proc.poll() is None
    assert not fake.replies_to(forged_id), "a forged update was handled"
    log = hook.log()
    assert "Traceback" not in log
    assert log.count("refused (400)") == 4, log
    assert secret not in log
    webhook = (hook.health() or {})["updates"]["webhook"]
    assert webhook["unauthorized"] == 6 and webhook["malformed"] == 4 and webhook["accepted"] == 1

    def scrape() -> dict[tuple[str, str | None], float] | None:
        """/metrics' samples once its inbox lookup (bounded: 0.25 s) made it into the scrape."""
        status, body = hook.get("/metrics")
        assert status == 200
        found = {(s.name, s.labels.get("outcome")): s.value
                 for family in text_string_to_metric_families(body.decode()) for s in family.samples}
        return found if ("solobot_inbox_pending_updates", None) in found else None

    samples = wait_until(scrape, message="a /metrics scrape with the inbox depth")
    assert samples[("solobot_webhook_deliveries_total", "unauthorized")] == 6
    assert samples[("solobot_webhook_deliveries_total", "malformed")] == 4
    assert samples[("solobot_webhook_deliveries_total", "accepted")] == 1
    assert samples[("solobot_webhook_inbox_writable", None)] == 1
    assert samples[("solobot_inbox_pending_updates", None)] == 0

    wait_until(lambda: "standby: lock held by pid" in poller.log(), STARTUP_TIMEOUT, message="the poller waits")
    hook.signal(signal.SIGTERM)
    assert hook.wait_exit() == 0
    assert "hook1" not in calls(fake, "deleteWebhook"), "stopping never deletes the webhook"
    poller.wait_mode("active", STARTUP_TIMEOUT)
    second = fake.send_user_message(BOT_ID, "/ping")
    wait_until(lambda: fake.replies_to(second), message="answered in polling mode")
    assert fake.webhook(BOT_ID) == ""
    assert calls(fake, "deleteWebhook") == ["poller"]
    back = spawn("hook2", **webhook_env(nginx.url, port))
    wait_until(lambda: "standby: lock held by pid" in back.log(), STARTUP_TIMEOUT, message="the webhook replica waits")
    poller.signal(signal.SIGTERM)
    assert poller.wait_exit() == 0
    back.wait_mode("active", STARTUP_TIMEOUT)
    wait_until(lambda: fake.webhook(BOT_ID) == nginx.url, message="registered again")
    third = fake.send_user_message(BOT_ID, "/ping")
    wait_until(lambda: fake.replies_to(third), message="answered in webhook mode again")
    assert registrations(fake) == Counter({"hook1": 1, "hook2": 1})
    assert [pongs(fake)[m] for m in (first, second, third)] == [1, 1, 1]
