"""Webhook throughput: one burst of /ping delivered through nginx to two replicas, aiogram's own
webhook handler vs solobot's webhook mode, same run.

For every round and every case, in an order that rotates each round:

1. a fresh fake Bot API delivering webhooks as telegram-bot-api's ``WebhookActor`` does (one
   update in flight per chat, chats in parallel up to ``max_connections``, 40), a fresh bot id,
   Debian's nginx on a free port (testbed/balancer.py) in front of two fresh replicas:
   * aiogram ``SimpleRequestHandler`` with ``handle_in_background=True`` (bench/aiogram_webhook.py):
     200 at once, the handler afterwards, in whichever replica got the delivery (no leader);
     also with one replica, which is what one process does (solobot handles on its leader only);
   * solobot ``BOT_MODE=webhook``, file lock + SQLite or PostgreSQL: each replica stores the
     delivery in the shared inbox and answers 200 after the commit; the leader handles;
2. wait until both replicas are up and the webhook is registered (solobot: one active, one passive);
3. queue the whole burst at once (N updates over C chats, one call into the fake);
4. measure from the first delivery to the last reply the fake recorded: updates/s, reply latency
   (queued -> reply recorded) p50/p99, deliveries that were not answered 2xx (retried by the fake);
5. SIGTERM both replicas and wait for their exits (nothing more can come), then check that every
   update was answered exactly once. CPU: both replicas together, per update.

The aiogram baseline logs at WARNING (no line per update); solobot at INFO, as it ships.

    .venv/bin/python bench/webhook_throughput.py [--updates 3000] [--chats 50] [--rounds 3]
        [--postgres postgresql://postgres@127.0.0.1:5432/test | --no-postgres]
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

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (
    ROOT,
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
from testbed.balancer import Nginx
from testbed.fake_bot_api import FakeBotAPI
from testbed.waiting import free_port, listening
from utils.config import derive_webhook_secret

AIOGRAM = "aiogram SimpleRequestHandler (background), 2 replicas"
#: The same with one replica: what one process does (solobot handles on the leader only).
AIOGRAM_ONE = "aiogram SimpleRequestHandler (background), 1 replica"
SOLOBOT_FILE = "solobot webhook, file+SQLite, 2 replicas"
SOLOBOT_PG = "solobot webhook, PostgreSQL, 2 replicas"
HOOK_PATH = "/tg/hook"
#: First chat (and user) id of a burst; chats are CHAT_BASE .. CHAT_BASE + C - 1.
CHAT_BASE = 30_000
#: Replicas start (aiogram's imports take seconds) and stop within these.
START_TIMEOUT = 60.0
EXIT_TIMEOUT = 60.0


@dataclass
class Result:
    rate: float  # updates per second
    p50_ms: float
    p99_ms: float
    refused: int  # deliveries not answered 2xx (the fake retried them)
    answer_p50_ms: float  # a delivery's round trip: the fake's POST to the replica's answer
    answer_p99_ms: float
    lost: int
    doubled: int
    out_of_order: int  # chats whose replies came in another order than their messages
    exit_codes: tuple[int | None, ...]
    cpu_ms_per_update: float  # both replicas together
    fake_cpu_share: float  # this process (the fake Bot API, mostly) over the wall time
    nginx_cpu_share: float


@dataclass
class Row:
    candidate: str
    results: list[Result] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def start_replicas(groups: ProcessGroups, candidate: str, fake: FakeBotAPI, bot_id: int, work: Path, tag: str,
                   nginx: Nginx, ports: list[int], postgres: str | None, log_level: str) -> list[BotProc]:
    procs = []
    for n, port in enumerate(ports):
        name = f"{tag}-{n}"
        if candidate in (AIOGRAM, AIOGRAM_ONE):
            env = base_env()
            env.update({"BOT_TOKEN": token_for(bot_id), "TELEGRAM_API_URL": fake.url(name),
                        "WEBHOOK_URL": nginx.url, "WEBHOOK_SECRET": derive_webhook_secret(token_for(bot_id)),
                        "PORT": str(port), "LOG_LEVEL": "WARNING"})
            procs.append(groups.start(name, [sys.executable, str(ROOT / "bench" / "aiogram_webhook.py")], env))
        else:
            env = solobot_env(fake, name, bot_id, work, postgres if candidate == SOLOBOT_PG else None,
                              BOT_MODE="webhook", WEBHOOK_URL=nginx.url, HEALTH_PORT=str(port), LOG_LEVEL=log_level)
            procs.append(groups.start(name, solobot_argv(), env))
    if candidate in (AIOGRAM, AIOGRAM_ONE):
        wait_until(lambda: all(listening(p) for p in ports), START_TIMEOUT, f"{tag}: both replicas listen")
    else:
        wait_until(lambda: sorted(str(p.mode()) for p in procs) == ["active", "passive"], START_TIMEOUT,
                   f"{tag}: one replica active, one passive")
    wait_until(lambda: fake.webhook(bot_id) == nginx.url, START_TIMEOUT, f"{tag}: the webhook registered")
    return procs


def run_once(groups: ProcessGroups, candidate: str, n: int, chats: int, postgres: str | None, tag: str,
             work_root: Path, log_level: str = "INFO") -> Result:
    fake = FakeBotAPI(deliver_webhooks=True).start_in_thread()
    bot_id = unique_bot_id()
    try:
        with tempfile.TemporaryDirectory(prefix="solobot-webhook-bench-", dir=work_root) as tmp:
            work = Path(tmp)
            ports = [free_port()] if candidate == AIOGRAM_ONE else [free_port(), free_port()]
            nginx = Nginx(work, ports, HOOK_PATH, access_log=False)
            procs: list[BotProc] = []
            try:
                procs = start_replicas(groups, candidate, fake, bot_id, work, tag, nginx, ports, postgres, log_level)
                items = burst_items(n, chats, CHAT_BASE)
                replicas = [psutil.Process(proc.pid) for proc in procs]
                cpu0 = cpu_seconds(replicas)
                me = psutil.Process()
                balancer = [psutil.Process(nginx.proc.pid), *psutil.Process(nginx.proc.pid).children()]
                me0, nginx0 = cpu_seconds([me]), cpu_seconds(balancer)
                queued_at = time.time()
                message_ids = fake.send_burst(bot_id, items)
                wait_all_answered(fake, message_ids, candidate)
                cpu = cpu_seconds(replicas) - cpu0
                wall = time.time() - queued_at
                fake_share = (cpu_seconds([me]) - me0) / wall
                nginx_share = (cpu_seconds(balancer) - nginx0) / wall
                for proc in procs:
                    proc.signal(signal.SIGTERM)
                exit_codes: list[int | None] = []
                for proc in procs:
                    try:
                        exit_codes.append(proc.wait_exit(EXIT_TIMEOUT))
                    except Exception:  # noqa: BLE001 - a hung stop is a result too; killed below
                        exit_codes.append(None)
            finally:
                for proc in procs:
                    proc.kill_group()
                nginx.stop()
        count = count_replies(fake, message_ids)
        replies = count.replies
        deliveries = [d for d in fake.snapshot_deliveries() if d.started >= queued_at or d.at >= queued_at]
        first = min((d.started or d.at for d in deliveries), default=queued_at)
        last_reply = max((s.at for s in replies), default=first)
        latencies = [(s.at - queued_at) * 1000 for s in replies]
        answers = [(d.at - d.started) * 1000 for d in deliveries if d.started]
        return Result(
            rate=count.answered / max(last_reply - first, 1e-6),
            p50_ms=percentile(latencies, 50), p99_ms=percentile(latencies, 99),
            refused=sum(1 for d in deliveries if not 200 <= d.status < 300),
            answer_p50_ms=percentile(answers, 50), answer_p99_ms=percentile(answers, 99),
            lost=count.lost, doubled=count.doubled,
            out_of_order=chats_out_of_order(replies, items, message_ids),
            exit_codes=tuple(exit_codes),
            cpu_ms_per_update=cpu * 1000 / n,
            fake_cpu_share=fake_share, nginx_cpu_share=nginx_share,
        )
    finally:
        fake.stop_thread()


def render(rows: list[Row]) -> str:
    headers = ["case (behind nginx)", "updates/s (median, min-max)", "x aiogram (2 replicas)", "p50 ms", "p99 ms",
               "delivery answered p50/p99 ms", "deliveries retried", "CPU ms/update (both replicas)",
               "fake CPU share", "nginx CPU share", "chats out of order", "each answered once"]
    lines = []
    for row in rows:
        rs = row.results
        if not rs:
            continue
        lines.append([
            row.candidate,
            rate_cell([r.rate for r in rs]),
            ratio_cell(row.ratios, anchor=row.candidate == AIOGRAM),
            f"{statistics.median(r.p50_ms for r in rs):.0f}",
            f"{statistics.median(r.p99_ms for r in rs):.0f}",
            f"{statistics.median(r.answer_p50_ms for r in rs):.0f} / "
            f"{statistics.median(r.answer_p99_ms for r in rs):.0f}",
            f"{sum(r.refused for r in rs)}",
            f"{statistics.median(r.cpu_ms_per_update for r in rs):.2f}",
            f"{statistics.median(r.fake_cpu_share for r in rs):.0%}",
            f"{statistics.median(r.nginx_cpu_share for r in rs):.0%}",
            f"{max(r.out_of_order for r in rs)}",
            once_cell(sum(r.lost for r in rs), sum(r.doubled for r in rs),
                      (code for r in rs for code in r.exit_codes)),
        ])
    return markdown_table(headers, lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_burst_arguments(parser)
    parser.add_argument("--only", choices=["aiogram", "aiogram-one", "file", "postgres"], action="append",
                        help="run only these candidates (repeatable)")
    parser.add_argument("--log-level", default="INFO", help="solobot's LOG_LEVEL (DEBUG: where the time goes)")
    parser.add_argument("--keep-logs", type=Path, help="keep every bot's log in this directory")
    args = parser.parse_args()
    candidates = [AIOGRAM, AIOGRAM_ONE, SOLOBOT_FILE] + ([] if args.no_postgres else [SOLOBOT_PG])
    if args.only:
        names = {"aiogram": AIOGRAM, "aiogram-one": AIOGRAM_ONE, "file": SOLOBOT_FILE, "postgres": SOLOBOT_PG}
        candidates = [c for c in candidates if any(names[o] == c for o in args.only)]
    rows = {c: Row(c) for c in candidates}
    started = time.strftime("%Y-%m-%d %H:%M")
    if args.keep_logs:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="solobot-webhook-bench-") as tmp, \
            ProcessGroups(args.keep_logs or Path(tmp)) as groups, scratch_database(args.postgres) as postgres:
        run = 0
        for round_no in range(args.rounds):
            shift = round_no % len(candidates)
            order = candidates[shift:] + candidates[:shift]  # rotate: no case always runs first or last
            this_round: dict[str, Result] = {}
            for candidate in order:
                run += 1
                result = run_once(groups, candidate, args.updates, args.chats, postgres, f"w{run}", Path(tmp),
                                  args.log_level)
                this_round[candidate] = result
                rows[candidate].results.append(result)
                print(f"round {round_no + 1}/{args.rounds} {candidate}: {result.rate:.0f} updates/s, "
                      f"p99 {result.p99_ms:.0f} ms, retried {result.refused}, lost {result.lost}, "
                      f"doubled {result.doubled}", file=sys.stderr, flush=True)
            base = this_round.get(AIOGRAM)
            for candidate, result in this_round.items():
                if base is not None and base.rate > 0:
                    rows[candidate].ratios.append(result.rate / base.rate)
    print(f"\n{args.updates} x /ping queued at once, delivered as webhooks through nginx; "
          f"{args.chats} chats; {args.rounds} rounds, alternating; started {started}\n")
    print(render(list(rows.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
