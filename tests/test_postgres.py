"""Across hosts: the PostgreSQL backend against the machine's real PostgreSQL, and hung holders."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from testbed.fake_bot_api import FakeBotAPI, Poll
from tests.conftest import (
    BOT_ID,
    DATABASE_URL,
    HANDOVER_BOUND,
    ROOT,
    START_WAIT,
    TOKEN,
    BotProcess,
    first_poll_after,
    free_port,
    sigkill_mid_handlers,
    start_pair,
    wait_until,
)
from tests.daemon import InProcessDaemon, StartDaemon, in_process, wait_for  # noqa: F401

Spawn = Callable[..., BotProcess]
TABLES = ("solobot_posts", "solobot_flags", "solobot_inbox", "solobot_processed", "solobot_offset",
          "solobot_leader", "solobot_schema", "solobot_fsm")


def drop_tables(url: str) -> None:
    """solobot's tables dropped from *url*'s database, so a test starts from nothing."""
    with psycopg.connect(url, autocommit=True) as conn:
        for table in TABLES:
            conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE")


@pytest.fixture
def pg(worker_database: str) -> Iterator[str]:
    """The real PostgreSQL (this xdist worker's own database), solobot's tables dropped so each test starts clean."""
    assert worker_database == DATABASE_URL
    drop_tables(DATABASE_URL)
    yield DATABASE_URL


def pg_env(url: str, **extra: str) -> dict[str, str]:
    return {"LOCK_BACKEND": "postgres", "DATABASE_URL": url, **extra}


def polls_of(fake: FakeBotAPI, tag: str, after: float = 0.0) -> list[Poll]:
    return [p for p in fake.snapshot_polls() if p.tag == tag and p.started >= after]


def overlaps(fake: FakeBotAPI, a: str, b: str) -> list[tuple[Poll, Poll]]:
    """Pairs of getUpdates from *a* and *b* that were in progress at the same moment."""
    now = time.time()
    pa, pb = polls_of(fake, a), polls_of(fake, b)
    return [(x, y) for x in pa for y in pb
            if x.started < (y.ended or now) and y.started < (x.ended or now)]


def test_pg_kill9_gap_and_nothing_lost(fake: FakeBotAPI, spawn: Spawn, pg: str) -> None:
    a, b = start_pair(spawn, **pg_env(pg))
    assert b.log().count("standby: lock held by pid") == 1
    gap, _ = sigkill_mid_handlers(fake, a, "b", pings=6)
    print(f"\npostgres kill -9: standby's first getUpdates {gap * 1000:.0f} ms after SIGKILL")
    assert gap <= HANDOVER_BOUND
    assert fake.conflicts() == 0
    health = b.health()
    assert health is not None and health["epoch"] == 2 and health["lock"]["backend"] == "postgres"


SIGSTOP_ROUNDS = int(os.environ.get("SOLOBOT_SIGSTOP_ROUNDS", "2"))


@pytest.mark.parametrize("backend", ["postgres", "file"])
def test_sigstop_holder_is_fenced_and_never_acts_again(
    fake: FakeBotAPI, spawn: Spawn, pg: str, backend: str
) -> None:
    """A paused holder (SIGSTOP) is fenced; resumed, it sends nothing; the new leader sees no 409.

    Each round starts the standby at a random moment, before or after the stop, under a stream of
    /ping. ``SOLOBOT_SIGSTOP_ROUNDS`` runs more rounds (the issue's check asks for 5 per backend).
    """
    env = pg_env(pg, LOCK_STALE_SECONDS="3") if backend == "postgres" else {"LOCK_STALE_SECONDS": "3"}
    rng = random.Random()
    for round_no in range(SIGSTOP_ROUNDS):
        sigstop_round(fake, spawn, env, backend, round_no, rng)


def sigstop_round(fake: FakeBotAPI, spawn: Spawn, env: dict[str, str], backend: str, round_no: int,
                  rng: random.Random) -> None:
    a_tag, b_tag = f"a{round_no}", f"b{round_no}"
    a = spawn(a_tag, **env)
    a.wait_mode("active")
    order = os.environ.get("SOLOBOT_SIGSTOP_STANDBY", "random")
    standby_first = rng.random() < 0.5 if order == "random" else order == "before"
    b = spawn(b_tag, **env) if standby_first else None
    if b is not None:
        b.wait_mode("passive")
    stream = PingStream(fake)
    stream.start()
    wait_until(lambda: len(stream.sent) > 10, message="pings before the stop")
    t_stop = time.time()
    a.signal(signal.SIGSTOP)
    if b is None:
        time.sleep(rng.uniform(0.0, 1.5))  # a random moment after the stop, not synchronisation
        b = spawn(b_tag, **env)
    standby = b
    first = wait_until(lambda: first_poll_after(fake, b_tag, t_stop), 20, message="the standby takes over")
    # A standby started after the stop cannot act before it runs: on a loaded machine its imports
    # alone take seconds. Count from the later of the stop and its first line as a standby.
    waiting_since = max(t_stop, logged_at(standby.log(), "mode passive"))
    takeover = first - waiting_since
    print(f"\n{backend} round {round_no} (standby {'before' if standby_first else 'after'} the stop): "
          f"takeover {takeover:.2f} s after it could act, {first - t_stop:.2f} s after the stop")
    assert takeover <= 5.0, standby.log()
    assert "fencing hung holder" in standby.log()
    t_cont = time.time()
    a.signal(signal.SIGCONT)
    # The positive marker: the resumed holder steps down (postgres) or was killed (file).
    if backend == "postgres":
        wait_until(lambda: "stepped down" in a.log(), 10, message="a steps down")
    else:
        assert a.wait_exit(10) == -signal.SIGKILL, "the file backend fences by killing the recorded process"
    stream.stop()
    wait_until(lambda: all(fake.replies_to(m) for m in stream.sent), 20, message="every ping answered")
    assert polls_of(fake, a_tag, t_cont) == [], "the resumed process never polls again"
    assert [s for s in fake.snapshot_sent() if s.tag == a_tag and s.at >= t_cont] == [], "nor sends"
    assert [p for p in polls_of(fake, b_tag) if p.outcome == "conflict"] == [], "the new leader saw a 409"
    standby.signal(signal.SIGTERM)
    assert standby.wait_exit() == 0
    a.stop()


def logged_at(log: str, text: str) -> float:
    """The wall-clock time of the first log line containing *text* (text log format)."""
    line = next(line for line in log.splitlines() if text in line)
    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


class PingStream:
    """/ping every 20 ms from a few chats, in a thread, until stopped."""

    def __init__(self, fake: FakeBotAPI, chats: int = 5) -> None:
        self.fake = fake
        self.chats = chats
        self.sent: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            chat = 1 + i % self.chats
            self.sent.append(self.fake.send_user_message(BOT_ID, "/ping", user_id=chat, chat_id=chat))
            i += 1
            self._stop.wait(0.02)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class TcpProxy:
    """A TCP proxy to PostgreSQL that a test can cut (every connection closed, new ones refused)
    or freeze (a silent server: connections stay open, nothing passes, new ones hang)."""

    def __init__(self, target_port: int = 5432) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.cut_now = False
        self.frozen = asyncio.Event()  # set: nothing passes
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._started.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._started.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_now:
            writer.close()
            return
        self._writers.add(writer)
        if self.frozen.is_set():
            await asyncio.Event().wait()  # accepted, never answered (closed at stop())
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if self.frozen.is_set():
                        await asyncio.Event().wait()  # swallowed: a silent server
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        def do() -> None:
            self.cut_now = True
            for w in list(self._writers):
                transport = w.transport
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    except OSError:
                        pass
                transport.abort()

        self._loop.call_soon_threadsafe(do)

    def freeze(self) -> None:
        self._loop.call_soon_threadsafe(self.frozen.set)

    def restore(self) -> None:
        self.cut_now = False

    def stop(self) -> None:
        async def close_all() -> None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(close_all(), self._loop)
        self._thread.join(5)
        assert not self._thread.is_alive(), "the proxy's thread did not stop"
        self._loop.close()


def test_partition_from_database_never_two_pollers(fake: FakeBotAPI, spawn: Spawn, pg: str) -> None:
    proxy = TcpProxy()
    try:
        via_proxy = pg.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        assert via_proxy != pg
        a = spawn("a", **pg_env(via_proxy), LOG_LEVEL="DEBUG")
        a.wait_mode("active")
        b = spawn("b", **pg_env(pg))
        b.wait_mode("passive")
        ping = fake.send_user_message(BOT_ID, "/ping")
        wait_until(lambda: fake.replies_to(ping), message="a answers")
        # Cut while a's long poll is pending: the hard case (a must cancel it in time).
        wait_until(lambda: any(p.outcome == "pending" for p in polls_of(fake, "a")), message="a long-polling")
        t_cut = time.time()
        proxy.cut()
        first = wait_until(lambda: first_poll_after(fake, "b", t_cut), 10, message="b takes over")
        wait_until(lambda: a.mode() == "passive", 10, message="a stops polling and goes passive")
        last_a = max((p.ended or time.time()) for p in polls_of(fake, "a"))
        print(f"\npartition: a's last getUpdates ended {(last_a - t_cut) * 1000:.0f} ms after the cut, "
              f"b's first began {(first - t_cut) * 1000:.0f} ms after it")
        ping2 = fake.send_user_message(BOT_ID, "/ping")
        wait_until(lambda: fake.replies_to(ping2), message="b answers")
        assert overlaps(fake, "a", "b") == [], "two pollers at once"
        # The positive marker: several failed reconnects of a (DEBUG lines); they stay quiet.
        wait_until(lambda: a.log().count("lock acquisition retry") >= 2, 20, message="a retries")
        warnings = [line for line in a.log().splitlines() if "WARNING" in line and "cannot acquire" in line]
        assert len(warnings) <= 1, warnings
        assert fake.conflicts() == 0
        assert last_a <= first
    finally:
        proxy.stop()


def test_status_command_ready_and_metrics(fake: FakeBotAPI, spawn: Spawn, pg: str, tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "BOT_TOKEN": TOKEN, **pg_env(pg),
           "STATE_DIR": str(tmp_path / "s")}

    def status() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(ROOT / "main.py"), "status"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=20)

    none = status()
    assert none.returncode == 3, none.stdout + none.stderr
    assert "no active holder" in none.stdout
    a, b = start_pair(spawn, **pg_env(pg))
    held = status()
    assert held.returncode == 0, held.stderr
    info = json.loads(held.stdout)
    assert info["pid"] == a.pid and info["epoch"] == 1 and info["heartbeat_age_s"] < 3
    assert a.get("/ready")[0] == 200
    code, body = b.get("/ready")
    assert code == 503 and b"passive" in body
    code, metrics = a.get("/metrics")
    assert code == 200
    text = metrics.decode()
    assert 'solobot_mode{mode="active"} 1.0' in text and "solobot_epoch 1.0" in text
    assert "solobot_handler_duration_seconds_bucket" in text
    with psycopg.connect(pg, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid "
                           "WHERE l.locktype = 'advisory' AND l.granted AND s.datname = current_database() "
                           "AND s.application_name LIKE %s", (f"solobot-{BOT_ID}-%-lock",)).fetchone()
    assert row is not None and row[0] == 1, "the runbook's pg_locks query finds exactly one holder"
    a.signal(signal.SIGTERM)
    assert a.wait_exit() == 0
    b.wait_mode("active")
    assert json.loads(status().stdout)["pid"] == b.pid


async def test_health_answers_quickly_while_the_database_is_unreachable(
        fake: FakeBotAPI, in_process: StartDaemon, pg: str) -> None:  # noqa: F811
    """/health within 0.5 s whatever the database does: here it stops answering under an active bot."""
    proxy = TcpProxy()
    try:
        a = await in_process("a", **pg_env(pg.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")))
        await a.wait_mode("active")
        proxy.cut()
        await wait_for(lambda: _is_mode(a, "passive"), START_WAIT, message="a loses the database")
        timings = []
        for _ in range(5):
            started = time.monotonic()
            assert await a.health() is not None
            timings.append(time.monotonic() - started)
        print(f"\n/health with the database unreachable: max {max(timings) * 1000:.0f} ms")
        assert max(timings) < 0.5, timings
    finally:
        proxy.stop()


#: A leader whose database went silent is passive within this many seconds of the freeze (about 6
#: here, loaded or not: 3 s to fail the lease, 1 s for the backlog loader, 2 s for the release;
#: 12 s quiet and over a minute loaded when the stop waited for psycopg's cancellations).
SILENT_STEP_DOWN_BOUND = 10.0


async def _is_mode(daemon: InProcessDaemon, mode: str) -> bool:
    return await daemon.mode() == mode


async def test_health_answers_quickly_while_the_database_is_silent(
        fake: FakeBotAPI, in_process: StartDaemon, pg: str) -> None:  # noqa: F811
    """A silent server (a frozen VM, a black-holed network) is worse than a refusing one: a query
    cancelled on it waits seconds for the server to confirm. /health still answers within 0.5 s,
    and the leader steps down once its lease cannot be verified."""
    proxy = TcpProxy()
    try:
        a = await in_process("a", **pg_env(pg.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")))
        await a.wait_mode("active")
        proxy.freeze()
        frozen = time.monotonic()
        timings = []
        for _ in range(5):
            started = time.monotonic()
            assert await a.health() is not None
            timings.append(time.monotonic() - started)
        await wait_for(lambda: _is_mode(a, "passive"), START_WAIT, message="a steps down")
        stepped_down = time.monotonic() - frozen
        print(f"\n/health with the database silent: max {max(timings) * 1000:.0f} ms; "
              f"stepped down {stepped_down:.1f} s after the freeze")
        assert max(timings) < 0.5, timings
        # The lease fails its verification within ~3 s; every step of the stop is then hard-bounded
        # (a query cancelled on a silent server is not waited for: that took 12 s to minutes).
        assert stepped_down < SILENT_STEP_DOWN_BOUND, stepped_down
        assert "lease verification: no answer within 2 s" in a.log()
    finally:
        proxy.stop()


async def test_database_down_at_start_stays_passive_and_says_why(fake: FakeBotAPI, in_process: StartDaemon,  # noqa: F811
                                                                 pg: str) -> None:
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    a = await in_process("a", **pg_env(dead))

    async def reason() -> bool:
        return "cannot acquire the postgres lock" in str(((await a.health()) or {}).get("passive_reason"))

    await wait_for(reason, START_WAIT, message="reason in /health")
    assert await a.mode() == "passive"
    assert fake.snapshot_polls() == []
    assert await a.stop() == 0  # SIGTERM's path


def test_autoposter_across_hosts_and_reactivation_in_the_same_process(
    fake: FakeBotAPI, spawn: Spawn, pg: str
) -> None:
    """Posts in PostgreSQL: a partitioned leader hands the queue over; later the same process leads again."""
    from tests.test_autoposter import CHANNEL, admin_says, channel_posts

    poster = {"CHANNEL_ID": CHANNEL, "POST_INTERVAL": "1"}
    proxy = TcpProxy()
    try:
        a = spawn("a", **pg_env(pg.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")), **poster)
        a.wait_mode("active")
        b = spawn("b", **pg_env(pg), **poster)
        b.wait_mode("passive")
        admin_says(fake, "/pause", expect="Paused")
        for i in range(1, 10):
            admin_says(fake, f"/post post {i}", expect="Queued post")
        admin_says(fake, "/resume", expect="Resumed")
        wait_until(lambda: len(channel_posts(fake)) >= 2, 15, message="a posts")
        proxy.cut()
        wait_until(lambda: a.mode() == "passive" and b.mode() == "active", START_WAIT, message="b leads")
        wait_until(lambda: any(p.tag == "b" for p in channel_posts(fake)), 15, message="b posts")
        proxy.restore()
        b.signal(signal.SIGTERM)
        assert b.wait_exit() == 0
        wait_until(lambda: a.mode() == "active", 60, message="the same process a leads again")
        wait_until(lambda: len(channel_posts(fake)) >= 9, 30, message="all nine posts")

        def statuses() -> list[str]:
            with psycopg.connect(pg) as conn:
                return [r[0] for r in conn.execute("SELECT status FROM solobot_posts ORDER BY id")]

        # The positive marker: no post left to claim, so no further (duplicate) post can go out.
        wait_until(lambda: "sending" not in statuses() and "queued" not in statuses(), message="all settled")
        posts = channel_posts(fake)
        texts = [p.text for p in posts]
        assert sorted(texts, key=lambda t: int(str(t).split()[1])) == [f"post {i}" for i in range(1, 10)], texts
        tags = [p.tag for p in posts]
        assert tags[0] == "a" and "b" in tags and tags[-1] == "a", tags
        assert a.log().count("autoposter running") == 2
        # The cut may fall between a's send and its mark: that post is 'uncertain' (sent once,
        # admins told), never re-sent. Everything else is 'sent'. (b's SIGTERM mid-send is
        # covered deterministically by test_sigterm_mid_send_finishes_and_marks_the_post.)
        final = statuses()
        assert final.count("sent") >= 8 and set(final) <= {"sent", "uncertain"}, final
        if "uncertain" in final:
            assert any(s.text and "may or may not" in s.text for s in fake.snapshot_sent())
        ping = fake.send_user_message(BOT_ID, "/ping")
        wait_until(lambda: [s.tag for s in fake.replies_to(ping)] == ["a"], message="a polls again")
    finally:
        proxy.stop()
