"""Throughput: one burst of /ping against the fake Bot API, plain aiogram vs solobot, same run.

For every round and every case (candidate x chat spread), in an order that rotates each round:

1. a fresh fake Bot API (in this process, its own thread) and a fresh bot process (its own
   process group; solobot with a unique bot id and fresh state, a scratch PostgreSQL database);
2. wait until the bot is idle in a long poll (solobot: also /health says active);
3. queue the whole burst at once (N updates over C chats, one loop call into the fake) WHILE
   the bot runs: its pending getUpdates answers at once with the first 100;
4. measure from that first answered getUpdates to the last reply the fake recorded:
   updates/s, the getUpdates calls, reply latency (queued -> reply recorded) p50/p99;
5. SIGTERM the bot and wait for its exit, so that nothing more can come, then check that every
   update was answered exactly once; peak RSS is the process's high-water mark (psutil samples
   and /proc VmHWM). CPU: the bot's CPU per update, and this process's CPU share of the wall
   time (the fake, mostly): near 100 % would mean the fake, not the bot, sets the pace.

The aiogram baseline logs at WARNING (no line per update): the strictest baseline.

The ratio compares a case with aiogram's in the same round and chat spread (median over rounds).

    .venv/bin/python bench/throughput.py [--updates 3000] [--chats 50] [--rounds 3]
        [--postgres postgresql://postgres@127.0.0.1:5432/test | --no-postgres] [--no-single-chat]
        [--workload ping | conversation]

``--workload conversation``: every update reads and writes FSM state (one get_state, one
set_state; ``bench/conversation_bot.py``), in both candidates: solobot's durable storage
(committed with the done marks) against aiogram's MemoryStorage.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    ROOT,
    RSS_SAMPLE_INTERVAL,
    BotProc,
    ProcessGroups,
    add_burst_arguments,
    base_env,
    burst_items,
    chats_out_of_order,
    count_replies,
    cpu_seconds,
    markdown_table,
    once_cell,
    pending_poll,
    percentile,
    rate_cell,
    ratio_cell,
    scratch_database,
    solobot_argv,
    solobot_env,
    token_for,
    unique_bot_id,
    wait_all_answered,
    wait_until,
)
from testbed.fake_bot_api import FakeBotAPI

AIOGRAM = "aiogram start_polling"
SOLOBOT_FILE = "solobot file+SQLite"
SOLOBOT_PG = "solobot PostgreSQL"
#: First chat (and user) id of a burst; chats are CHAT_BASE .. CHAT_BASE + C - 1.
CHAT_BASE = 10_000
#: ``--workload``: the bot module each candidate runs (None: aiogram_ping.py's /ping, bot.py's).
WORKLOADS: dict[str, str | None] = {"ping": None, "conversation": "bench.conversation_bot"}
#: A stopping bot drains and exits within this.
EXIT_TIMEOUT = 60.0


@dataclass
class Case:
    candidate: str
    chats: int

    @property
    def label(self) -> str:
        return f"{self.candidate}, {self.chats} chat{'s' if self.chats > 1 else ''}"


@dataclass
class Result:
    rate: float  # updates per second
    seconds: float
    polls: int
    p50_ms: float
    p99_ms: float
    rss_mb: float
    lost: int
    doubled: int
    out_of_order: int  # chats whose replies came in another order than their messages
    exit_code: int | None
    bot_cpu: float  # CPU seconds the bot used from the burst to its last reply
    fake_cpu: float  # and this process (the fake Bot API, mostly): near the wall time = the fake is the limit


@dataclass
class Row:
    case: Case
    results: list[Result] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


class RssSampler:
    """Samples a process's RSS in the background until stopped."""

    def __init__(self, proc: BotProc) -> None:
        self.proc = proc
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_INTERVAL):
            self.proc.sample_rss()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.proc.sample_rss()


class CpuMeter:
    """CPU seconds used by the bot process and by this one (the fake) since construction."""

    def __init__(self, proc: BotProc) -> None:
        self._bot = psutil.Process(proc.pid)
        self._me = psutil.Process()
        self._bot0 = cpu_seconds([self._bot])
        self._me0 = cpu_seconds([self._me])

    def used(self) -> tuple[float, float]:
        return cpu_seconds([self._bot]) - self._bot0, cpu_seconds([self._me]) - self._me0


def start_bot(groups: ProcessGroups, case: Case, fake: FakeBotAPI, bot_id: int, work: Path, tag: str,
              postgres: str | None, module: str | None) -> BotProc:
    workload = {"BOT_MODULE": module} if module else {}
    if case.candidate == AIOGRAM:
        env = base_env()
        env.update({"BOT_TOKEN": token_for(bot_id), "TELEGRAM_API_URL": fake.url(tag), "POLLING_TIMEOUT": "10",
                    "LOG_LEVEL": "WARNING", **workload})
        return groups.start(tag, [sys.executable, str(ROOT / "bench" / "aiogram_ping.py")], env)
    env = solobot_env(fake, tag, bot_id, work, postgres if case.candidate == SOLOBOT_PG else None, **workload)
    proc = groups.start(tag, solobot_argv(), env)
    proc.wait_mode("active")
    return proc


def run_once(groups: ProcessGroups, case: Case, n: int, postgres: str | None, tag: str,
             module: str | None = None) -> Result:
    fake = FakeBotAPI().start_in_thread()
    bot_id = unique_bot_id()
    try:
        with tempfile.TemporaryDirectory(prefix="solobot-bench-") as tmp:
            proc = start_bot(groups, case, fake, bot_id, Path(tmp), tag, postgres, module)
            sampler = RssSampler(proc)
            try:
                wait_until(lambda: pending_poll(fake, tag), 60, f"{tag} idle in a long poll")
                items = burst_items(n, case.chats, CHAT_BASE)
                cpu = CpuMeter(proc)
                queued_at = time.time()
                message_ids = fake.send_burst(bot_id, items)
                wait_all_answered(fake, message_ids, case.label)
                bot_cpu, fake_cpu = cpu.used()
            finally:
                sampler.stop()
            proc.signal(signal.SIGTERM)
            try:
                exit_code: int | None = proc.wait_exit(EXIT_TIMEOUT)
            except Exception:  # noqa: BLE001 - a hung stop is a result too; the group is killed below
                exit_code = None
            proc.kill_group()
        count = count_replies(fake, message_ids)
        replies = count.replies
        polls = [p for p in fake.snapshot_polls() if p.tag == tag and p.ended is not None and p.ended >= queued_at]
        first_answer = min((p.ended for p in polls if p.count > 0 and p.ended is not None), default=queued_at)
        last_reply = max((s.at for s in replies), default=first_answer)
        seconds = max(last_reply - first_answer, 1e-6)
        answered = count.answered
        latencies = [(s.at - queued_at) * 1000 for s in replies]
        return Result(
            rate=answered / seconds, seconds=seconds,
            polls=sum(1 for p in polls if p.started <= last_reply),
            p50_ms=percentile(latencies, 50), p99_ms=percentile(latencies, 99),
            rss_mb=proc.peak_rss / 2**20,
            lost=count.lost, doubled=count.doubled,
            out_of_order=chats_out_of_order(replies, items, message_ids),
            exit_code=exit_code,
            bot_cpu=bot_cpu, fake_cpu=fake_cpu,
        )
    finally:
        fake.stop_thread()


def render(rows: list[Row], n: int) -> str:
    headers = ["case", "updates/s (median, min-max)", "x aiogram", "getUpdates calls", "p50 ms", "p99 ms",
               "peak RSS MB", "bot CPU ms/update", "fake CPU share", "chats out of order", "each answered once"]
    lines = []
    for row in rows:
        rs = row.results
        if not rs:
            continue
        lines.append([
            row.case.label,
            rate_cell([r.rate for r in rs]),
            ratio_cell(row.ratios, anchor=row.case.candidate == AIOGRAM),
            f"{statistics.median(r.polls for r in rs):.0f}",
            f"{statistics.median(r.p50_ms for r in rs):.0f}",
            f"{statistics.median(r.p99_ms for r in rs):.0f}",
            f"{max(r.rss_mb for r in rs):.0f}",
            f"{statistics.median(r.bot_cpu * 1000 / n for r in rs):.2f}",
            f"{statistics.median(r.fake_cpu / r.seconds for r in rs):.0%}",
            f"{max(r.out_of_order for r in rs)} of {row.case.chats}",
            once_cell(sum(r.lost for r in rs), sum(r.doubled for r in rs), (r.exit_code for r in rs)),
        ])
    return markdown_table(headers, lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_burst_arguments(parser)
    parser.add_argument("--no-single-chat", action="store_true", help="skip the one-chat rows")
    parser.add_argument("--only", choices=["aiogram", "file", "postgres"], action="append",
                        help="run only these candidates (repeatable)")
    parser.add_argument("--workload", choices=list(WORKLOADS), default="ping",
                        help="conversation: each update one get_state + one set_state (FSM storage)")
    args = parser.parse_args()

    candidates = [AIOGRAM, SOLOBOT_FILE] + ([] if args.no_postgres else [SOLOBOT_PG])
    if args.only:
        names = {"aiogram": AIOGRAM, "file": SOLOBOT_FILE, "postgres": SOLOBOT_PG}
        candidates = [c for c in candidates if any(names[o] == c for o in args.only)]
    spreads = [args.chats] + ([] if args.no_single_chat or args.chats == 1 else [1])
    rows = {(c, s): Row(Case(c, s)) for s in spreads for c in candidates}
    started = time.strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory(prefix="solobot-bench-logs-") as logs, \
            ProcessGroups(Path(logs)) as groups, \
            scratch_database(args.postgres) as postgres:
        run = 0
        for round_no in range(args.rounds):
            order = list(rows)
            shift = round_no % len(order)
            order = order[shift:] + order[:shift]  # rotate: no case always runs first or last
            this_round: dict[tuple[str, int], Result] = {}
            for key in order:
                run += 1
                case = rows[key].case
                result = run_once(groups, case, args.updates, postgres, f"r{run}", WORKLOADS[args.workload])
                this_round[key] = result
                rows[key].results.append(result)
                print(f"round {round_no + 1}/{args.rounds} {case.label}: {result.rate:.0f} updates/s, "
                      f"{result.polls} getUpdates, p99 {result.p99_ms:.0f} ms, lost {result.lost}, "
                      f"doubled {result.doubled}", file=sys.stderr, flush=True)
            for (candidate, spread), result in this_round.items():
                base = this_round.get((AIOGRAM, spread))
                if base is not None and base.rate > 0:
                    rows[(candidate, spread)].ratios.append(result.rate / base.rate)
    what = "/ping" if args.workload == "ping" else ("/ping (one get_state + one set_state each; aiogram's "
                                                    "state in MemoryStorage, solobot's in its store)")
    print(f"\n{args.updates} x {what} queued at once while the bot idles in a long poll; {args.chats} chats "
          f"(and 1); {args.rounds} rounds, alternating; started {started}\n")
    print(render(list(rows.values()), args.updates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
