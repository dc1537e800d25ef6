"""Nobody on the network can stall the leader or exhaust its files: gzip bombs, idle connections,
a delivery the inbox cannot hold, and what the public side shows."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import threading
import time
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from testbed.balancer import Nginx
from testbed.fake_bot_api import SECRET_HEADER, FakeBotAPI
from tests.conftest import BOT_ID, DATABASE_URL, TOKEN, BotProcess, free_port, wait_until
from tests.daemon import StartDaemon, in_process, wait_for  # noqa: F401
from utils.config import derive_webhook_secret
from utils.locking.backend import HEARTBEAT_INTERVAL
from utils.ops.http_listener import (
    MIN_CONNECTIONS,
    RESERVED_FILES,
    SERVER_HEADER,
    GuardedListener,
    connection_cap,
)
from utils.updates.group_commit import GroupCommit

Spawn = Callable[..., BotProcess]
HOOK_PATH = "/tg/hook"
SECRET = derive_webhook_secret(TOKEN)
#: The issue's bounds while the bombs land.
ANSWER_BOUND = 0.5
HEARTBEAT_LATE_BOUND = 1.0
BOMBS = 3


@cache
def gzip_bomb() -> bytes:
    """About 1 MB of gzip that inflates to 1 GiB of zeros."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(1024)) + packer.flush()


def raw_post(port: int, body: bytes, headers: dict[str, str], *, timeout: float = 30.0) -> tuple[int, float, bytes]:
    """(status, seconds to the answer, response head) of one POST on a fresh connection."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (f"POST {HOOK_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n{head}\r\n").encode() + body
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    took = time.monotonic() - t0
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    return status, took, answer.partition(b"\r\n\r\n")[0]


def update(update_id: int, chat_id: int = 4242) -> bytes:
    return json.dumps({"update_id": update_id, "message": {
        "message_id": update_id % 1_000_000, "date": int(time.time()), "text": "hello",
        "chat": {"id": chat_id, "type": "private", "first_name": "A"},
        "from": {"id": chat_id, "is_bot": False, "first_name": "A"}}}).encode()


def timed_get(port: int, path: str) -> tuple[int, float]:
    import urllib.error
    import urllib.request

    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            status = int(r.status)
    except urllib.error.HTTPError as exc:
        status = int(exc.code)
    return status, time.monotonic() - t0


class HeartbeatWatch:
    """Samples the PID file's heartbeat every 20 ms in a thread; the largest gap between two values."""

    def __init__(self, pid_file: Path) -> None:
        self.pid_file = pid_file
        self.beats: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                beat = float(json.loads(self.pid_file.read_text())["heartbeat"])
            except (OSError, ValueError, KeyError):
                continue
            if not self.beats or beat != self.beats[-1]:
                self.beats.append(beat)

    def __enter__(self) -> HeartbeatWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def max_gap(self) -> float:
        return max((b - a for a, b in zip(self.beats, self.beats[1:], strict=False)), default=0.0)


def webhook_leader(spawn: Spawn, fake: FakeBotAPI, name: str = "hook", *, prefix: list[str] | None = None,
                   **env: str) -> tuple[BotProcess, int]:
    """A leader in webhook mode (SQLite unless *env* says otherwise), the webhook on WEBHOOK_PORT,
    /health on HEALTH_PORT."""
    hook_port = free_port()
    bot = spawn(name, prefix=prefix, BOT_MODE="webhook", WEBHOOK_URL=f"http://127.0.0.1:{hook_port}{HOOK_PATH}",
                WEBHOOK_PORT=str(hook_port), WEBHOOK_HOST="127.0.0.1", **{"DATABASE_URL": "", **env})
    bot.wait_mode("active")
    return bot, hook_port


@pytest.mark.xdist_group("timing")
def test_gzip_bombs_cost_nothing(spawn: Spawn, fake: FakeBotAPI, shared_dirs: dict[str, Path]) -> None:
    """Three 1 MB gzip bodies (1 GiB inflated each) at once, without the secret and then with a
    wrong one, straight to the webhook port and then through nginx: /ready on the operators' port
    and a valid delivery answer within 0.5 s meanwhile, and the lock heartbeat is never more than
    1 s late."""
    bot, hook_port = webhook_leader(spawn, fake)
    bomb = gzip_bomb()
    assert len(bomb) < 1_100_000
    pid_file = shared_dirs["lock"] / f"solobot-{BOT_ID}.pid"
    outcomes: list[int] = []
    answers: list[tuple[str, int, float]] = []
    next_id = iter(range(10_000, 20_000))
    nginx = Nginx(shared_dirs["logs"], [hook_port], HOOK_PATH)  # the README's balancer in front
    rounds = [(hook_port, None), (hook_port, "wrong-" + SECRET[6:]), (nginx.port, None),
              (nginx.port, "wrong-" + SECRET[6:])]
    with HeartbeatWatch(pid_file) as beats:
        for port, secret in rounds:
            headers = {"Content-Encoding": "gzip", **({SECRET_HEADER: secret} if secret else {})}
            threads = [threading.Thread(target=lambda p=port, h=headers: outcomes.append(raw_post(p, bomb, h)[0]))
                       for _ in range(BOMBS)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads) or len(answers) < 6:
                status, took = timed_get(bot.port, "/ready")
                answers.append(("/ready", status, took))
                status, took, _ = raw_post(port, update(next(next_id)), {SECRET_HEADER: SECRET})
                answers.append(("delivery", status, took))
            for t in threads:
                t.join()
        # And with the secret: refused before the body is read or inflated.
        status, _, _ = raw_post(hook_port, bomb, {"Content-Encoding": "gzip", SECRET_HEADER: SECRET})
        assert status == 415
        wait_until(lambda: len(beats.beats) >= 3, 10, message="heartbeats after the bombs")
    print(f"\nanswers during the bombs: {len(answers)}, slowest {max(a[2] for a in answers):.3f} s; "
          f"largest heartbeat gap {beats.max_gap():.2f} s")
    nginx.stop()
    assert outcomes == [401] * (len(rounds) * BOMBS)
    assert all(status == 200 for _, status, _ in answers), answers
    assert max(took for _, _, took in answers) <= ANSWER_BOUND, answers
    assert beats.max_gap() <= HEARTBEAT_INTERVAL + HEARTBEAT_LATE_BOUND, beats.beats
    assert bot.mode() == "active"

    # 500 malformed requests (35 bytes each): aiohttp answers 400; the log gains a line or two.
    lines_before = len(bot.log().splitlines())
    for _ in range(500):
        with socket.create_connection(("127.0.0.1", hook_port), timeout=10) as s:
            s.sendall(b"\x16\x03\x01 NOT HTTP AT ALL \r\n\r\n" + b"x" * 10)
            assert b" 400 Bad Request" in s.recv(100)
    grown = bot.log().splitlines()[lines_before:]
    assert len(grown) <= 3 and "Traceback" not in "\n".join(grown), "\n".join(grown)


@pytest.mark.parametrize("backend", ["file+sqlite", "postgres"])
def test_idle_connections_against_1024_open_files(spawn: Spawn, fake: FakeBotAPI,
                                                  shared_dirs: dict[str, Path], backend: str) -> None:
    """2000 idle connections to the webhook port of a leader limited to 1024 open files: it keeps
    its lease and its database and lock connections, a valid delivery is accepted within 10 s
    (retried as Telegram would), and the log grows by a few lines."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    env = {"LOCK_BACKEND": "postgres", "DATABASE_URL": DATABASE_URL} if backend == "postgres" else {}
    bot, hook_port = webhook_leader(spawn, fake, prefix=["prlimit", "--nofile=1024:1024", "--"], **env)
    epoch = (bot.health() or {})["epoch"]
    lines_before = len(bot.log().splitlines())
    idle: list[socket.socket] = []

    def delivered() -> bool:
        try:
            return raw_post(hook_port, update(777), {SECRET_HEADER: SECRET}, timeout=2)[0] == 200
        except OSError:
            return False

    # The file lock's heartbeat is the PID file's (PostgreSQL's is in the database: no file here).
    with HeartbeatWatch(shared_dirs["lock"] / f"solobot-{BOT_ID}.pid") as beats:
        try:
            for _ in range(2000):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", hook_port))
                idle.append(s)
            # The kernel's accept queue drops SYNs beyond its backlog (the clients retry them after
            # 1 s, 3 s, ...): wait until the flood has filled the cap, then deliver.
            wait_until(lambda: "the cap; refusing new ones" in bot.log(), 30, message="the cap reached")
            t0 = time.monotonic()
            wait_until(delivered, 10, message="a valid delivery accepted", interval=0.5)
            took = time.monotonic() - t0
            health = bot.health() or {}
        finally:
            for s in idle:
                s.close()
    log = bot.log()
    grown = log.splitlines()[lines_before:]
    print(f"\ndelivery accepted {took:.1f} s after 2000 idle connections; log grew by {len(grown)} lines; "
          f"largest heartbeat gap {beats.max_gap():.2f} s")
    assert beats.max_gap() <= HEARTBEAT_INTERVAL + HEARTBEAT_LATE_BOUND, beats.beats
    assert health.get("mode") == "active" and health.get("epoch") == epoch, health
    assert "Too many open files" not in log and "lost" not in "\n".join(grown), log
    assert len(grown) <= 10, "\n".join(grown)
    assert any("the cap; refusing new ones" in line for line in grown), "\n".join(grown)


async def test_public_port_hides_token_and_database_user(in_process: StartDaemon, fake: FakeBotAPI) -> None:  # noqa: F811
    """The webhook on HEALTH_PORT (shared, so public) with the token in WEBHOOK_URL: /health shows
    Telegram's webhook URL masked and no token; during a database outage no database user; no
    Server version."""
    port = free_port()
    leader = await in_process("shared", BOT_MODE="webhook", WEBHOOK_URL=f"http://127.0.0.1:{port}{HOOK_PATH}/{TOKEN}",
                              HEALTH_PORT=str(port), DATABASE_URL="")

    async def webhook_info() -> Any:
        return (((await leader.health()) or {}).get("updates") or {}).get("webhook", {}).get("info")

    info = await wait_for(webhook_info, 60, message="getWebhookInfo in /health")
    assert info["url"] == f"http://127.0.0.1:{port}/***"
    _, body = await leader.get("/health")
    assert TOKEN.partition(":")[2] not in body.decode(), body
    _, _, head = await asyncio.to_thread(raw_post, port, b"{}", {})
    assert f"Server: {SERVER_HEADER}".encode() in head and b"aiohttp" not in head and b"Python" not in head
    assert await leader.stop() == 0  # one in-process daemon at a time: the bot module's router is one

    port = free_port()
    down = await in_process("down", BOT_MODE="webhook", WEBHOOK_URL=f"http://127.0.0.1:{port}{HOOK_PATH}",
                            HEALTH_PORT=str(port), DATABASE_URL="postgresql://postgres@127.0.0.1:1/solobot")
    await wait_for(down.health, 60, message="the replica answers")
    status, _, _ = await asyncio.to_thread(raw_post, port, update(1), {SECRET_HEADER: SECRET})
    assert status == 503
    _, body = await down.get("/health")
    text = body.decode()
    assert "PostgreSQL 127.0.0.1:1/solobot: Connection refused" in text and "(user postgres)" not in text, text
    assert "(user postgres)" in down.log(), "the log (for operators) names the user"


def test_webhook_info_url_masked() -> None:
    from utils.updates.webhook import masked_url

    assert masked_url(f"https://bot.example.com/tg/{TOKEN}") == "https://bot.example.com/***"
    assert masked_url("https://bot.example.com/") == "https://bot.example.com/"
    assert masked_url("") == ""


# -- in-process: the listener's cap and head timeout, the group commit's isolation ------------


def test_connection_cap_fits_the_open_file_limit() -> None:
    assert connection_cap(1024, 1024) == 1024 - RESERVED_FILES
    assert connection_cap(64, 65536) == 64
    assert connection_cap(1024, 100) == MIN_CONNECTIONS


async def test_cap_refuses_cheaply_logs_once_and_idle_heads_time_out(caplog: pytest.LogCaptureFixture) -> None:
    from aiohttp import web

    caplog.set_level(logging.INFO, "solobot.http")
    listener = GuardedListener("TEST_PORT", "127.0.0.1", free_port(), max_connections=MIN_CONNECTIONS)
    listener.guard.header_timeout = 0.5
    app = listener.application()
    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/", hello)
    await listener.start(app)
    try:
        conns = [await asyncio.open_connection("127.0.0.1", listener.port) for _ in range(MIN_CONNECTIONS + 20)]
        # The excess is closed at once; the capped ones at the head timeout: every read ends.
        t0 = time.monotonic()
        ends = await asyncio.gather(*(asyncio.wait_for(r.read(), 5) for r, _ in conns))
        assert ends == [b""] * len(conns) and time.monotonic() - t0 < 3
        assert listener.guard.refused == 20
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 200") and b"Server: solobot\r\n" in answer
        # A request aiohttp answers itself (malformed): no version either.
        bad_reader, bad_writer = await asyncio.open_connection("127.0.0.1", listener.port)
        bad_writer.write(b"\x16\x03\x01 NOT HTTP\r\n\r\n")
        bad = await asyncio.wait_for(bad_reader.read(), 5)
        assert b" 400 " in bad and b"Server: solobot\r\n" in bad and b"aiohttp" not in bad, bad
        bad_writer.close()
        for _, w in [*conns, (reader, writer)]:
            w.close()
    finally:
        await listener.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "solobot.http"]
    assert sum("refusing new ones" in m for m in messages) == 1, messages
    assert sum("below the connection cap again; 20 connection(s) refused" in m for m in messages) == 1, messages


async def test_an_unstorable_item_fails_alone() -> None:
    class RowError(Exception):
        pass

    async def write(items: object) -> list[bool]:
        values = list(items)  # type: ignore[call-overload]
        if "bad" in values:
            raise RowError("value out of range")
        return [True] * len(values)

    commit: GroupCommit[str] = GroupCommit(write, is_item_error=lambda exc: isinstance(exc, RowError))
    results = await asyncio.gather(*(commit.submit(x) for x in ("a", "bad", "c")), return_exceptions=True)
    assert results[0] is True and results[2] is True and isinstance(results[1], RowError)


async def test_a_delivery_that_cannot_be_stored_is_refused_alone(tmp_path: Path) -> None:
    """Deliveries arriving together, one with an update_id and one with a chat id no column can
    hold: those two get 400, the others are stored (200), none gets 503."""
    from aiohttp.test_utils import TestClient, TestServer

    from utils.state.database import DatabaseTarget
    from utils.state.store import StateStore
    from utils.updates.webhook import WebhookReceiver

    store = StateStore.create(DatabaseTarget.parse(None, tmp_path), BOT_ID, "unit")
    await store.open()
    await store.migrate()
    receiver = WebhookReceiver(store, path=HOOK_PATH, secret=SECRET, on_stored=lambda: True)
    listener = GuardedListener("TEST_PORT", "127.0.0.1", 0, max_connections=64)
    app = listener.application()
    app.router.add_routes(receiver.routes())
    bodies = [update(i, chat_id=100 + i) for i in range(1, 6)] + [update(1 << 70), update(9, chat_id=10 ** 60)]
    try:
        async with TestClient(TestServer(app)) as client:
            answers = await asyncio.gather(*(client.post(HOOK_PATH, data=b, headers={SECRET_HEADER: SECRET})
                                             for b in bodies))
            assert [a.status for a in answers] == [200] * 5 + [400, 400]
        assert (await store.inbox.depth())[0] == 5
    finally:
        await store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_out_of_range_rows_are_row_errors(tmp_path: Path, backend: str) -> None:
    """What the group commit retries item by item: the database's refusal of a row's value."""
    from tests.conftest import DATABASE_URL
    from utils.state.database import DatabaseTarget
    from utils.state.inbox import NewUpdate, is_row_error
    from utils.state.store import StateStore

    url = DATABASE_URL if backend == "postgres" else None
    store = StateStore.create(DatabaseTarget.parse(url, tmp_path), BOT_ID, "unit")
    await store.open()
    await store.migrate()
    try:
        with pytest.raises(Exception) as raised:
            await store.inbox.store_batch([NewUpdate(1 << 70, "f", None, "{}")], epoch=None)
        assert is_row_error(raised.value), repr(raised.value)
        assert not is_row_error(ConnectionRefusedError("database down"))
    finally:
        await store.close()


def test_webhook_port_settings() -> None:
    from utils.config import ConfigError, load_settings

    base = {"BOT_TOKEN": TOKEN, "BOT_MODE": "webhook", "WEBHOOK_URL": "https://bot.example.com/hook"}
    s = load_settings({**base, "WEBHOOK_HOST": "0.0.0.0", "WEBHOOK_PORT": "8443"})
    assert (s.webhook_host, s.webhook_port, s.health_host, s.health_port) == ("0.0.0.0", 8443, "127.0.0.1", 8080)
    assert load_settings(base).webhook_port == 0  # shares HEALTH_PORT
    for bad, says in (({"WEBHOOK_PORT": "8080"}, "must differ from HEALTH_PORT"),
                      ({"HEALTH_PORT": "0"}, "required when BOT_MODE=webhook and HEALTH_PORT=0")):
        with pytest.raises(ConfigError, match=says):
            load_settings({**base, **bad})


def test_rate_limit_filter_passes_one_line_per_interval_without_traceback() -> None:
    from utils.ops.logging_setup import RateLimitFilter

    now = [0.0]
    limit = RateLimitFilter(60.0, clock=lambda: now[0])

    def record(msg: str) -> logging.LogRecord:
        try:
            raise ValueError("bad request line")
        except ValueError as exc:
            return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, msg, None,
                                     (ValueError, exc, exc.__traceback__))

    first = record("Error handling request")
    assert limit.filter(first) and first.exc_info is None
    assert first.getMessage() == "Error handling request: ValueError: bad request line"
    assert [limit.filter(record("Error handling request")) for _ in range(99)] == [False] * 99
    now[0] = 61.0
    later = record("Error handling request")
    assert limit.filter(later) and "(and 99 more like it in 60 s, not shown)" in later.getMessage()
