"""Handover under load: how long Telegram goes unpolled when the active instance stops or dies,
and whether any /ping is lost or answered twice.

Real ``python main.py`` processes (each in its own process group, all killed at the end)
against the fake Bot API (testbed/fake_bot_api.py, in this process). Per case (backend x signal):

* one active instance, then ROUNDS rounds of: start a fresh standby, wait until it waits for the
  lock, signal the active one while handlers are running, and measure the gap from the signal
  to the standby's first successful getUpdates as the server saw it. The standby is the active
  one of the next round, so the state grows over the rounds as it does in production;
* all the while a /ping stream: one every INTERVAL (20 ms), round-robin over several chats,
  and every reply takes HANDLER_DELAY (the fake's send_delay: slow handlers);
* at the end the stream stops, every ping gets time to be answered, the last active instance is
  stopped (so nothing more can come), and each round's pings (those sent from its standby's
  start until the next one's) are checked: lost = no reply, doubled = more than one.

    .venv/bin/python bench/handover.py [--rounds 20] [--handler-delay 0.15] [--chats 10]
        [--postgres postgresql://postgres@127.0.0.1:5432/test | --no-postgres]

The backlog case (``--backlog 9000``, with ``--case file-backlog`` / ``pg-backlog``): a takeover
by kill -9 while the inbox holds that many waiting updates (INBOX_MAX 10000, so fetching is not
paused), against one with an empty inbox, alternating, a fresh state per round: the gap to the
new leader's first getUpdates, its peak RSS (VmHWM) until the backlog is drained, and the time
to drain it. The issue's bar: the backlog gap within 2x the empty one.

Compare with the anchors from the designs we started from (shared/seeds): a passive instance
that retries the lock every 60-90 s, a 5 x 3 s retry loop, and a 120 s stale-lock threshold.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    DEFAULT_POSTGRES,
    BotProc,
    ProcessGroups,
    burst_items,
    first_good_poll_after,
    markdown_table,
    percentile,
    scratch_database,
    solobot_argv,
    solobot_env,
    unique_bot_id,
    wait_until,
)
from testbed.fake_bot_api import FakeBotAPI

ANCHORS = [
    ("seed 000: passive retry every 60-90 s", "60 000-90 000 ms"),
    ("seed 002: 5 retries x 3 s", "up to 15 000 ms"),
    ("seed 004: stale-lock takeover", "120 000 ms"),
]
CHAT_BASE = 20_000
#: The standby announces that it waits (``standby: lock held by pid ...``); if the wording
#: changes, the bench goes on once /health says passive and this long has passed.
STANDBY_LINE = "standby:"
STANDBY_LINE_TIMEOUT = 10.0
#: A standby must take over within this, an old active must be gone within this.
TAKEOVER_TIMEOUT = 60.0
EXIT_TIMEOUT = 60.0
#: After the stream stops, every ping must be answered within this.
SETTLE_TIMEOUT = 60.0


@dataclass
class Case:
    backend: str  # file | postgres
    sig: signal.Signals

    @property
    def label(self) -> str:
        verb = "SIGTERM" if self.sig == signal.SIGTERM else "kill -9"
        name = "file lock + SQLite" if self.backend == "file" else "PostgreSQL"
        return f"{name}, {verb} of the active"


@dataclass
class CaseResult:
    case: Case
    gaps_ms: list[float] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)  # per round
    doubled: list[int] = field(default_factory=list)  # per round
    old_exit_codes: list[int | None] = field(default_factory=list)


class PingStream:
    """/ping every *interval* seconds, round-robin over *chats* chats, in a thread."""

    def __init__(self, fake: FakeBotAPI, bot_id: int, chats: int, interval: float) -> None:
        self.fake, self.bot_id, self.chats, self.interval = fake, bot_id, chats, interval
        self.sent: list[tuple[float, int]] = []  # (time sent, message id), in sending order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ping-stream", daemon=True)

    def start(self) -> PingStream:
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        start = time.monotonic()
        while not self._stop.is_set():
            chat = CHAT_BASE + n % self.chats
            at = time.time()
            self.sent.append((at, self.fake.send_user_message(self.bot_id, "/ping", user_id=chat, chat_id=chat)))
            n += 1
            # A load generator's pace, not synchronisation: the next ping is due at start + n * interval.
            self._stop.wait(max(0.0, start + n * self.interval - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def start_instance(groups: ProcessGroups, fake: FakeBotAPI, tag: str, bot_id: int, work: Path,
                   postgres: str | None, log_level: str = "INFO") -> BotProc:
    return groups.start(tag, solobot_argv(), solobot_env(fake, tag, bot_id, work, postgres, LOG_LEVEL=log_level))


def wait_standby(proc: BotProc) -> None:
    proc.wait_mode("passive")
    try:
        wait_until(lambda: STANDBY_LINE in proc.log(), STANDBY_LINE_TIMEOUT, f"{proc.name} announces its standby",
                   0.02)
    except TimeoutError:
        print(f"({proc.name}: no '{STANDBY_LINE}' line; going on)", file=sys.stderr)


def run_case(groups: ProcessGroups, case: Case, n_case: int, args: argparse.Namespace, postgres: str) -> CaseResult:
    result = CaseResult(case)
    fake = FakeBotAPI().start_in_thread()
    fake.send_delay = args.handler_delay
    bot_id = unique_bot_id()
    pg = postgres if case.backend == "postgres" else None
    try:
        with tempfile.TemporaryDirectory(prefix="solobot-handover-") as tmp:
            work = Path(tmp)
            active = start_instance(groups, fake, f"c{n_case}-0", bot_id, work, pg, args.log_level)
            active.wait_mode("active")
            stream = PingStream(fake, bot_id, args.chats, args.interval).start()
            round_starts: list[float] = []
            try:
                wait_until(lambda: any(s.tag == active.name for s in fake.snapshot_sent()), 30,
                           "the first reply")
                for r in range(1, args.rounds + 1):
                    round_starts.append(time.time())
                    standby = start_instance(groups, fake, f"c{n_case}-{r}", bot_id, work, pg, args.log_level)
                    wait_standby(standby)
                    wait_until(lambda: fake.sending_now > 0, 30, "handlers in flight")
                    t_signal = time.time()
                    active.signal(case.sig)
                    first = wait_until(lambda s=standby, t=t_signal: first_good_poll_after(fake, s.name, t),
                                       TAKEOVER_TIMEOUT, f"{standby.name}'s first getUpdates", 0.002)
                    gap_ms = (first.started - t_signal) * 1000
                    try:
                        code: int | None = active.wait_exit(EXIT_TIMEOUT)
                    except Exception:  # noqa: BLE001 - a hung old instance is a result; its group dies below
                        code = None
                    active.kill_group()
                    result.gaps_ms.append(gap_ms)
                    result.old_exit_codes.append(code)
                    print(f"{case.label} round {r}/{args.rounds}: gap {gap_ms:.0f} ms, old exit {code}, "
                          f"signal at {time.strftime('%H:%M:%S', time.localtime(t_signal))}"
                          f".{int(t_signal * 1000) % 1000:03d}",
                          file=sys.stderr, flush=True)
                    active = standby
            finally:
                stream.stop()
            sent_ids = [m for _, m in stream.sent]
            try:
                wait_until(lambda: set(sent_ids) <= {s.reply_to for s in fake.snapshot_sent()}, SETTLE_TIMEOUT,
                           "every ping answered", 0.05)
            except TimeoutError as exc:
                print(f"{case.label}: {exc}", file=sys.stderr)
            active.signal(signal.SIGTERM)
            try:
                active.wait_exit(EXIT_TIMEOUT)
            finally:
                active.kill_group()
        replies = Counter(s.reply_to for s in fake.snapshot_sent())
        times = [t for t, _ in stream.sent]
        bounds = [bisect.bisect_left(times, start) for start in round_starts] + [len(times)]
        for lo, hi in itertools.pairwise(bounds):
            ids = sent_ids[lo:hi]
            result.lost.append(sum(1 for m in ids if replies[m] == 0))
            result.doubled.append(sum(1 for m in ids if replies[m] > 1))
        before = sent_ids[: bounds[0]] if bounds else sent_ids
        warmup_bad = sum(1 for m in before if replies[m] != 1)
        if warmup_bad:
            print(f"{case.label}: {warmup_bad} pings before the first round not answered exactly once",
                  file=sys.stderr)
        return result
    finally:
        fake.stop_thread()


#: The backlog case: the dying leader's handlers take this long (the backlog piles up)...
BACKLOG_HANDLER_DELAY = 60.0
#: ... over this many chats; the new leader's handlers answer at once.
BACKLOG_CHATS = 100
BACKLOG_DRAIN_TIMEOUT = 300.0


@dataclass
class BacklogRound:
    waiting: int  # updates in the inbox at the kill
    gap_ms: float
    peak_rss_mb: float
    drained_s: float | None


def run_backlog_round(groups: ProcessGroups, backend: str, waiting: int, tag: str,
                      args: argparse.Namespace, postgres: str) -> BacklogRound:
    """One kill -9 takeover with *waiting* updates (0: an empty inbox) left by the dead leader."""
    fake = FakeBotAPI().start_in_thread()
    fake.send_delay = BACKLOG_HANDLER_DELAY
    bot_id = unique_bot_id()
    pg = postgres if backend == "postgres" else None
    try:
        with tempfile.TemporaryDirectory(prefix="solobot-backlog-") as tmp:
            work = Path(tmp)
            active = start_instance(groups, fake, f"{tag}-old", bot_id, work, pg, args.log_level)
            active.wait_mode("active")
            if waiting:
                ids = fake.send_burst(bot_id, burst_items(waiting, BACKLOG_CHATS, CHAT_BASE))
                wait_until(lambda: ((active.health() or {}).get("updates", {}).get("inbox_waiting") or 0) >= waiting,
                           120, f"{waiting} updates in the inbox", 0.05)
            else:
                ids = []
            standby = start_instance(groups, fake, f"{tag}-new", bot_id, work, pg, args.log_level)
            wait_standby(standby)
            standby.sample_rss()
            fake.send_delay = 0.0  # the new leader's handlers answer at once
            t_signal = time.time()
            active.signal(signal.SIGKILL)
            first = wait_until(lambda: first_good_poll_after(fake, standby.name, t_signal),
                               TAKEOVER_TIMEOUT, f"{standby.name}'s first getUpdates", 0.002)
            active.kill_group()
            drained: float | None = None
            wanted = set(ids)
            deadline = time.monotonic() + BACKLOG_DRAIN_TIMEOUT
            while time.monotonic() < deadline:
                standby.sample_rss()
                if wanted <= {s.reply_to for s in fake.snapshot_sent()}:
                    drained = time.time() - t_signal
                    break
                time.sleep(0.05)  # the RSS sampling rate; VmHWM keeps the peak between samples
            standby.sample_rss()
            standby.signal(signal.SIGTERM)
            try:
                standby.wait_exit(EXIT_TIMEOUT)
            finally:
                standby.kill_group()
        result = BacklogRound(waiting, (first.started - t_signal) * 1000, standby.peak_rss / 2**20, drained)
        print(f"backlog {backend} {waiting}: gap {result.gap_ms:.0f} ms, peak RSS {result.peak_rss_mb:.0f} MB, "
              f"drained in {drained if drained is None else round(drained, 1)} s", file=sys.stderr, flush=True)
        return result
    finally:
        fake.stop_thread()


def run_backlog_case(groups: ProcessGroups, backend: str, args: argparse.Namespace, postgres: str) -> str:
    rounds: dict[int, list[BacklogRound]] = {0: [], args.backlog: []}
    for r in range(args.backlog_rounds):
        for waiting in (0, args.backlog):  # alternating: both see the same machine load
            rounds[waiting].append(run_backlog_round(groups, backend, waiting, f"b{backend[0]}{r}-{waiting}",
                                                     args, postgres))
    name = "file lock + SQLite" if backend == "file" else "PostgreSQL"
    rows = []
    for waiting, results in rounds.items():
        gaps = [x.gap_ms for x in results]
        drains = [x.drained_s for x in results if x.drained_s is not None]
        rows.append([f"{name}, kill -9, {waiting} waiting", str(len(results)),
                     f"{percentile(gaps, 50):.0f}", f"{max(gaps, default=float('nan')):.0f}",
                     f"{max((x.peak_rss_mb for x in results), default=float('nan')):.0f}",
                     f"{percentile(drains, 50):.1f}" if drains else "-",
                     f"{len(results) - len(drains)}"])
    empty = percentile([x.gap_ms for x in rounds[0]], 50)
    full = percentile([x.gap_ms for x in rounds[args.backlog]], 50)
    table = markdown_table(["case", "rounds", "gap p50 ms", "gap max ms", "peak RSS MB (max)",
                            "drained p50 s", "rounds not drained"], rows)
    return f"{table}\n\nbacklog gap / empty gap (p50): {full / empty:.2f} (the bar: 2.00)"


def render(results: list[CaseResult], args: argparse.Namespace) -> str:
    headers = ["case", "rounds", "gap p50 ms", "gap p95 ms", "gap max ms", "lost (total, worst round)",
               "doubled (total, worst round)"]
    rows = []
    for res in results:
        g = res.gaps_ms
        rows.append([
            res.case.label, str(len(g)),
            f"{percentile(g, 50):.0f}", f"{percentile(g, 95):.0f}", f"{max(g, default=float('nan')):.0f}",
            f"{sum(res.lost)}, {max(res.lost, default=0)}",
            f"{sum(res.doubled)}, {max(res.doubled, default=0)}",
        ])
    return markdown_table(headers, rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="handovers per case (a fresh standby each)")
    parser.add_argument("--handler-delay", type=float, default=0.15, help="seconds every reply takes")
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between two pings")
    parser.add_argument("--chats", type=int, default=10, help="chats the pings come from, round-robin")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--log-level", default="INFO", help="the bots' LOG_LEVEL (DEBUG: where the time goes)")
    parser.add_argument("--keep-logs", type=Path, help="keep every bot's log in this directory")
    parser.add_argument("--case", action="append",
                        choices=["file-term", "file-kill", "pg-term", "pg-kill", "file-backlog", "pg-backlog"],
                        help="run only these cases (repeatable; the backlog cases only when named)")
    parser.add_argument("--backlog", type=int, default=9000, help="updates waiting at a backlog takeover")
    parser.add_argument("--backlog-rounds", type=int, default=3, help="rounds of each (empty, backlog)")
    args = parser.parse_args()
    backlogs = [backend for name, backend in (("file-backlog", "file"), ("pg-backlog", "postgres"))
                if name in (args.case or [])]
    cases = [Case("file", signal.SIGTERM), Case("file", signal.SIGKILL)]
    if not args.no_postgres:
        cases += [Case("postgres", signal.SIGTERM), Case("postgres", signal.SIGKILL)]
    if args.case:
        names = {"file-term": ("file", signal.SIGTERM), "file-kill": ("file", signal.SIGKILL),
                 "pg-term": ("postgres", signal.SIGTERM), "pg-kill": ("postgres", signal.SIGKILL)}
        wanted = {names[c] for c in args.case if c in names}
        cases = [c for c in cases if (c.backend, c.sig) in wanted]
    started = time.strftime("%Y-%m-%d %H:%M")
    results = []
    if args.keep_logs:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="solobot-handover-logs-") as tmp_logs, \
            ProcessGroups(args.keep_logs or Path(tmp_logs)) as groups, scratch_database(args.postgres) as postgres:
        for n, case in enumerate(cases, 1):
            results.append(run_case(groups, case, n, args, postgres))
        backlog_tables = [run_backlog_case(groups, b, args, postgres) for b in backlogs]
    for table in backlog_tables:
        print(f"\nTakeover by kill -9 with {args.backlog} updates waiting (INBOX_MAX 10000) against an empty "
              f"inbox; {args.backlog_rounds} rounds each, alternating; started {started}\n")
        print(table)
    if not results:
        return 0
    print(f"\nGap from the signal to the standby's first successful getUpdates; /ping every "
          f"{args.interval * 1000:.0f} ms from {args.chats} chats, every reply taking "
          f"{args.handler_delay * 1000:.0f} ms; {args.rounds} rounds per case; started {started}\n")
    print(render(results, args))
    width = max(len(a) for a, _ in ANCHORS)
    print(f"\n{'anchor (what we beat)':<{width}}  gap")
    for name, value in ANCHORS:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
