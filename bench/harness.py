"""What the benchmarks share: bot processes in their own process groups, the fake Bot API, a
scratch PostgreSQL database, percentiles and a markdown table.

Every process is started in a new session (its own process group) and registered in a
:class:`ProcessGroups`, whose ``close()`` kills every group it started, whatever happened.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import signal
import statistics
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from testbed.fake_bot_api import UNLIMITED_SENDS_ENV, FakeBotAPI, Poll, Sent  # noqa: E402
from testbed.waiting import free_port, get_health  # noqa: E402
from testbed.waiting import wait_until as shared_wait_until  # noqa: E402

#: The secret half of every bench token (the fake accepts any of 30+ characters).
TOKEN_SECRET = "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
#: How often a process's RSS is sampled (its kernel high-water mark is read at the end too).
RSS_SAMPLE_INTERVAL = 0.05


def token_for(bot_id: int) -> str:
    return f"{bot_id}:{TOKEN_SECRET}"


def unique_bot_id() -> int:
    """A bot id no other run used: state and locks are per bot, so runs never see each other's."""
    return 500_000_000 + uuid.uuid4().int % 400_000_000


#: The shared wait, raising TimeoutError (a bench reports a timeout, it is not a test failure).
wait_until = functools.partial(shared_wait_until, error=TimeoutError)


def first_good_poll_after(fake: FakeBotAPI, tag: str, t0: float) -> Poll | None:
    """*tag*'s first getUpdates that the server took (answered or long-polling) at or after *t0*."""
    return next((p for p in fake.snapshot_polls()
                 if p.tag == tag and p.started >= t0 and p.outcome in ("ok", "pending")), None)


def pending_poll(fake: FakeBotAPI, tag: str) -> bool:
    return any(p.tag == tag and p.outcome == "pending" for p in fake.snapshot_polls())


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0-100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


#: A burst's replies must all be in within this many seconds per 100 updates (plus a fixed allowance).
SECONDS_PER_100 = 5.0
REPLY_ALLOWANCE = 30.0


def burst_items(n: int, chats: int, first_chat: int) -> list[tuple[str, int, int]]:
    """N ``/ping`` as ``(text, user_id, chat_id)``, round-robin over *chats* chats (user = chat)."""
    return [("/ping", first_chat + i % chats, first_chat + i % chats) for i in range(n)]


def wait_all_answered(fake: FakeBotAPI, message_ids: Sequence[int], label: str) -> None:
    """Wait until the fake recorded a reply to each of *message_ids*; on timeout say so and go on
    (the caller counts what came: lost ones show in its table)."""
    wanted = set(message_ids)
    n = len(wanted)

    def all_answered() -> bool:
        sent = fake.snapshot_sent()
        return len(sent) >= n and wanted <= {s.reply_to for s in sent}

    try:
        wait_until(all_answered, REPLY_ALLOWANCE + SECONDS_PER_100 * n / 100, f"{n} replies ({label})", 0.02)
    except TimeoutError as exc:
        print(f"{label}: {exc}; counting what came", file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class ReplyCount:
    """The replies to a burst: what came, how many messages got one, none, more than one."""

    replies: list[Sent]
    answered: int
    lost: int
    doubled: int


def count_replies(fake: FakeBotAPI, message_ids: Sequence[int]) -> ReplyCount:
    wanted = set(message_ids)
    replies = [s for s in fake.snapshot_sent() if s.reply_to in wanted]
    per_message = Counter(s.reply_to for s in replies)
    return ReplyCount(replies=replies, answered=len(per_message),
                      lost=sum(1 for m in message_ids if per_message[m] == 0),
                      doubled=sum(1 for m in message_ids if per_message[m] > 1))


def chats_out_of_order(replies: Sequence[Sent], items: Sequence[tuple[str, int, int]],
                       message_ids: Sequence[int]) -> int:
    """How many chats got their first replies in another order than their messages were sent."""
    sent_order: dict[int, list[int]] = {}
    for (_, _, chat), message_id in zip(items, message_ids, strict=True):
        sent_order.setdefault(chat, []).append(message_id)
    first_reply: dict[int, float] = {}
    for reply in replies:
        if reply.reply_to is not None:
            first_reply[reply.reply_to] = min(reply.at, first_reply.get(reply.reply_to, reply.at))
    out = 0
    for ids in sent_order.values():
        answered = [m for m in ids if m in first_reply]
        if sorted(answered, key=lambda m: first_reply[m]) != answered:
            out += 1
    return out


def cpu_seconds(procs: Iterable[psutil.Process]) -> float:
    """User + system CPU seconds used so far by *procs* (one that has gone counts nothing)."""
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def rate_cell(rates: Sequence[float]) -> str:
    """``median (min-max)`` of per-round rates."""
    return f"{statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f})"


def ratio_cell(ratios: Sequence[float], *, anchor: bool) -> str:
    """The median ratio to the anchor of the same rounds, with its range (``-`` for none)."""
    if not ratios:
        return "-"
    text = f"{statistics.median(ratios):.2f}x"
    return text if anchor else f"{text} ({min(ratios):.2f}-{max(ratios):.2f})"


def once_cell(lost: int, doubled: int, exit_codes: Iterable[int | None]) -> str:
    """``yes`` when every update was answered exactly once and every process exited 0."""
    text = "yes" if lost == doubled == 0 else f"NO: {lost} lost, {doubled} doubled"
    exits = set(exit_codes)
    if exits != {0}:
        text += f"; exit codes {sorted(exits, key=str)}"
    return text


def add_burst_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every throughput bench takes: the burst, the rounds, the PostgreSQL server."""
    parser.add_argument("--updates", type=int, default=3000, help="updates per burst (N)")
    parser.add_argument("--chats", type=int, default=50, help="chats the burst is spread over (C)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="server for the PostgreSQL case")
    parser.add_argument("--no-postgres", action="store_true")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def base_env() -> dict[str, str]:
    """The bench's environment without anything that would make a bot talk to systemd."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class BotProc:
    """A bot process in its own process group, its output in *log_dir*/<name>.log."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.health_port = int(env.get("HEALTH_PORT", "0"))
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.peak_rss = 0
        self._ps: psutil.Process | None = None
        with contextlib.suppress(psutil.Error):
            self._ps = psutil.Process(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def sample_rss(self) -> None:
        """Fold the current RSS and the kernel's high-water mark (VmHWM) into :attr:`peak_rss`."""
        if self._ps is None or not self.alive():
            return
        with contextlib.suppress(psutil.Error):
            self.peak_rss = max(self.peak_rss, self._ps.memory_info().rss)
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)

    def health(self) -> dict[str, Any] | None:
        return get_health(self.health_port)

    def mode(self) -> str | None:
        h = self.health()
        return None if h is None else str(h.get("mode"))

    def wait_mode(self, mode: str, timeout: float = 60.0) -> None:
        def reached() -> bool:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return self.mode() == mode

        wait_until(reached, timeout, f"{self.name} to be {mode}", 0.02)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill_group(self) -> None:
        """SIGKILL the whole process group (the bot and anything it started)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._log.close()


class ProcessGroups:
    """Every bot process a bench started; ``close()`` kills all their groups (also on errors)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[BotProc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> BotProc:
        proc = BotProc(name, argv, env, self.log_dir)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.kill_group()

    def __enter__(self) -> ProcessGroups:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def solobot_env(fake: FakeBotAPI, tag: str, bot_id: int, work: Path, postgres_url: str | None,
                **extra: str) -> dict[str, str]:
    """``python main.py``'s environment: file lock + SQLite in *work*, or PostgreSQL for both."""
    env = base_env()
    env.update({
        "BOT_TOKEN": token_for(bot_id),
        "TELEGRAM_API_URL": fake.url(tag),
        "LOCK_DIR": str(work / "lock"),
        "STATE_DIR": str(work / "state"),
        "HEALTH_PORT": str(free_port()),
        "POLLING_TIMEOUT": "10",
        "LOG_LEVEL": "INFO",
        **UNLIMITED_SENDS_ENV,  # throughput benches measure the bot, not Telegram's limits
    })
    env.pop("DATABASE_URL", None)
    env.pop("LOCK_BACKEND", None)
    if postgres_url:
        env.update({"LOCK_BACKEND": "postgres", "DATABASE_URL": postgres_url})
    env.update(extra)
    return env


def solobot_argv() -> list[str]:
    return [sys.executable, str(ROOT / "main.py")]


@contextlib.contextmanager
def scratch_database(url: str) -> Iterator[str]:
    """A fresh database on *url*'s server for one bench run, dropped afterwards.

    Falls back to *url* itself when the database cannot be created (the unique bot id per run
    still keeps runs apart).
    """
    import psycopg

    parts = urllib.parse.urlsplit(url)
    name = f"solobot_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        print(f"(could not create a scratch database, using {parts.path.lstrip('/')}: {exc})", file=sys.stderr)
        yield url
        return
    try:
        yield urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with contextlib.suppress(psycopg.Error), psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
