"""Send limits: the issue's burst against a fake Bot API that enforces Telegram's limits.

316 x /ping at once (150 private chats x 2, two groups x 8; testbed/fake_bot_api.py ``flood_burst``)
to a fake that refuses, as Telegram does, what goes past 30 messages/s overall (burst 30), 1/s in a
private chat (burst 3) or 20/min in a group (burst 5): 429 with ``retry_after``, not delivered.
Candidates, each in a fresh fake and a fresh process, in an order that rotates each round:

* plain aiogram ``start_polling`` (bench/aiogram_ping.py): no limiter at all;
* python-telegram-bot with ``AIORateLimiter(max_retries=5)`` (bench/ptb_ping.py);
* solobot (file lock + SQLite, and PostgreSQL), Telegram's limits being its defaults.

Per run: replies delivered (to distinct messages), 429s the fake answered, chats whose replies
came in another order than their messages, and the time from the burst to the last reply against
what the limits allow (``limits_allow``: 316 / 30 = 10.5 s; the slowest group needs 9 s). A
candidate that stops replying is given QUIET_SECONDS of silence before its run ends.

    .venv/bin/python bench/flood.py [--rounds 2] [--postgres URL | --no-postgres]
        [--only aiogram|ptb|file|postgres ...]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    DEFAULT_POSTGRES,
    ROOT,
    BotProc,
    ProcessGroups,
    base_env,
    chats_out_of_order,
    count_replies,
    markdown_table,
    pending_poll,
    scratch_database,
    solobot_argv,
    solobot_env,
    token_for,
    unique_bot_id,
    wait_until,
)
from testbed.fake_bot_api import FakeBotAPI, SendLimits, flood_burst, limits_allow

AIOGRAM = "aiogram start_polling (no limiter)"
PTB = "python-telegram-bot AIORateLimiter(max_retries=5)"
SOLOBOT_FILE = "solobot file+SQLite"
SOLOBOT_PG = "solobot PostgreSQL"
#: Telegram's limits for solobot (the harness turns them off for the throughput benches).
TELEGRAM_LIMITS = {"SEND_OVERALL_PER_SECOND": "30", "SEND_PRIVATE_PER_SECOND": "1",
                   "SEND_GROUP_PER_MINUTE": "20"}
#: A run ends when every message has its reply, or after this long without a reply or a 429.
QUIET_SECONDS = 6.0
#: ... and in any case after this long.
RUN_LIMIT = 90.0
EXIT_TIMEOUT = 30.0


@dataclass
class Result:
    delivered: int
    lost: int
    doubled: int
    refused: int  # 429s
    out_of_order: int
    seconds: float  # burst -> last reply


@dataclass
class Row:
    candidate: str
    results: list[Result] = field(default_factory=list)


def start(groups: ProcessGroups, candidate: str, fake: FakeBotAPI, bot_id: int, work: Path, tag: str,
          postgres: str | None) -> BotProc:
    if candidate in (AIOGRAM, PTB):
        env = base_env()
        env.update({"BOT_TOKEN": token_for(bot_id), "TELEGRAM_API_URL": fake.url(tag), "POLLING_TIMEOUT": "10",
                    "LOG_LEVEL": "WARNING"})
        script = "aiogram_ping.py" if candidate == AIOGRAM else "ptb_ping.py"
        return groups.start(tag, [sys.executable, str(ROOT / "bench" / script)], env)
    env = solobot_env(fake, tag, bot_id, work, postgres if candidate == SOLOBOT_PG else None, **TELEGRAM_LIMITS)
    proc = groups.start(tag, solobot_argv(), env)
    proc.wait_mode("active")
    return proc


def wait_done(fake: FakeBotAPI, ids: list[int]) -> None:
    """Until every message has a reply, or nothing happened for QUIET_SECONDS."""
    wanted = set(ids)
    deadline = time.monotonic() + RUN_LIMIT
    last_activity, seen = time.monotonic(), -1
    while time.monotonic() < deadline:
        sent = fake.snapshot_sent()
        if wanted <= {s.reply_to for s in sent}:
            return
        activity = len(sent) + len(fake.snapshot_refused())
        if activity != seen:
            seen, last_activity = activity, time.monotonic()
        elif time.monotonic() - last_activity > QUIET_SECONDS:
            return
        time.sleep(0.05)


def run_once(groups: ProcessGroups, candidate: str, postgres: str | None, tag: str) -> Result:
    fake = FakeBotAPI(send_limits=SendLimits()).start_in_thread()
    bot_id = unique_bot_id()
    try:
        with tempfile.TemporaryDirectory(prefix="solobot-bench-") as tmp:
            proc = start(groups, candidate, fake, bot_id, Path(tmp), tag, postgres)
            wait_until(lambda: pending_poll(fake, tag), 60, f"{tag} idle in a long poll")
            items = flood_burst()
            queued_at = time.time()
            ids = fake.send_burst(bot_id, items)
            wait_done(fake, ids)
            proc.signal(signal.SIGTERM)
            try:
                proc.wait_exit(EXIT_TIMEOUT)
            except Exception:  # noqa: BLE001 - the group is killed below
                pass
            proc.kill_group()
        count = count_replies(fake, ids)
        last = max((s.at for s in count.replies), default=queued_at)
        return Result(delivered=count.answered, lost=count.lost, doubled=count.doubled,
                      refused=len(fake.snapshot_refused()),
                      out_of_order=chats_out_of_order(count.replies, items, ids), seconds=last - queued_at)
    finally:
        fake.stop_thread()


def render(rows: list[Row], allowed: float, messages: int) -> str:
    headers = ["candidate", "replies delivered", "lost", "429s received", "chats out of order",
               "seconds to the last reply", "x what the limits allow"]
    lines = []
    for row in rows:
        rs = row.results
        if not rs:
            continue
        seconds = statistics.median(r.seconds for r in rs)
        lines.append([
            row.candidate,
            " / ".join(f"{r.delivered} of {messages}" for r in rs),
            " / ".join(f"{r.lost}" + (f" ({r.doubled} twice)" if r.doubled else "") for r in rs),
            " / ".join(str(r.refused) for r in rs),
            " / ".join(str(r.out_of_order) for r in rs),
            f"{seconds:.1f} ({min(r.seconds for r in rs):.1f}-{max(r.seconds for r in rs):.1f})",
            f"{seconds / allowed:.2f}x" if not any(r.lost for r in rs) else "- (replies lost)",
        ])
    return markdown_table(headers, lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--only", choices=["aiogram", "ptb", "file", "postgres"], action="append")
    args = parser.parse_args()
    names = {"aiogram": AIOGRAM, "ptb": PTB, "file": SOLOBOT_FILE, "postgres": SOLOBOT_PG}
    candidates = [AIOGRAM, PTB, SOLOBOT_FILE] + ([] if args.no_postgres else [SOLOBOT_PG])
    if args.only:
        candidates = [c for c in candidates if any(names[o] == c for o in args.only)]
    rows = {c: Row(c) for c in candidates}
    items = flood_burst()
    allowed = limits_allow(items, SendLimits())
    started = time.strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory(prefix="solobot-bench-logs-") as logs, \
            ProcessGroups(Path(logs)) as groups, scratch_database(args.postgres) as postgres:
        run = 0
        for round_no in range(args.rounds):
            shift = round_no % len(candidates)
            for candidate in candidates[shift:] + candidates[:shift]:
                run += 1
                result = run_once(groups, candidate, postgres, f"f{run}")
                rows[candidate].results.append(result)
                print(f"round {round_no + 1}/{args.rounds} {candidate}: {result.delivered} delivered, "
                      f"{result.refused} 429s, {result.out_of_order} chats out of order, {result.seconds:.1f} s",
                      file=sys.stderr, flush=True)
    print(f"\n{len(items)} x /ping at once (150 private chats x 2, 2 groups x 8) against Telegram's limits "
          f"(limits allow {allowed:.1f} s); {args.rounds} rounds (one figure per round), started {started}\n")
    print(render(list(rows.values()), allowed, len(items)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
