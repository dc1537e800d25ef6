"""Handover latency: how long Telegram goes unpolled when the active instance stops or dies.

Real ``python main.py`` processes against the fake Bot API (tests/fake_bot_api.py). The gap is
from the signal to the standby's first getUpdates as the server saw it. Run:

    .venv/bin/python bench/handover.py [--trials 5] [--postgres postgresql://postgres@127.0.0.1/test]

and compare with the anchors from the designs we started from (shared/seeds): a passive instance
that retries the lock every 60-90 s, a 5 x 3 s retry loop, and a 120 s stale-lock threshold.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import ADMIN_ID, TOKEN, BotProcess, free_port, wait_until
from tests.fake_bot_api import FakeBotAPI

ANCHORS = [
    ("seed 000: passive retry every 60-90 s", "60 000-90 000 ms"),
    ("seed 002: 5 retries x 3 s", "up to 15 000 ms"),
    ("seed 004: stale-lock takeover", "120 000 ms"),
]


def trial(fake: FakeBotAPI, work: Path, sig: int, extra: dict[str, str], n: int) -> float:
    env = {**os.environ, "BOT_TOKEN": TOKEN, "LOCK_DIR": str(work / "lock"), "STATE_DIR": str(work / "state"),
           "ADMIN_IDS": str(ADMIN_ID), "POLLING_TIMEOUT": "10", **extra}
    a = BotProcess(f"a{n}", {**env, "TELEGRAM_API_URL": fake.url(f"a{n}"), "HEALTH_PORT": str(free_port())}, work)
    try:
        a.wait_mode("active")
        b = BotProcess(f"b{n}", {**env, "TELEGRAM_API_URL": fake.url(f"b{n}"), "HEALTH_PORT": str(free_port())}, work)
        try:
            b.wait_mode("passive")
            wait_until(lambda: "standby: lock held" in b.log(), message="b waiting")
            t0 = time.time()
            a.signal(sig)

            def first() -> float | None:
                return next((p.started for p in fake.snapshot_polls() if p.tag == f"b{n}" and p.started >= t0), None)

            return float(wait_until(first, 10, 0.002)) - t0
        finally:
            b.signal(signal.SIGTERM)
            b.wait_exit()
            b.stop()
    finally:
        a.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--postgres", default=os.environ.get("DATABASE_URL"))
    args = parser.parse_args()
    fake = FakeBotAPI().start_in_thread()
    cases: list[tuple[str, int, dict[str, str]]] = [
        ("file lock, SIGTERM of the active", signal.SIGTERM, {}),
        ("file lock, SIGKILL of the active", signal.SIGKILL, {}),
    ]
    if args.postgres:
        pg = {"LOCK_BACKEND": "postgres", "DATABASE_URL": args.postgres}
        cases += [("postgres, SIGTERM of the active", signal.SIGTERM, pg),
                  ("postgres, kill -9 of the active", signal.SIGKILL, pg)]
    rows = []
    n = 0
    for name, sig, extra in cases:
        gaps = []
        for _ in range(args.trials):
            n += 1
            with tempfile.TemporaryDirectory() as tmp:
                gaps.append(trial(fake, Path(tmp), sig, extra, n) * 1000)
        rows.append((name, f"{statistics.median(gaps):.0f} ms (min {min(gaps):.0f}, max {max(gaps):.0f})"))
    fake.stop_thread()
    width = max(len(r[0]) for r in rows + ANCHORS)
    print(f"\n{'case':<{width}}  gap from signal to the standby's first getUpdates ({args.trials} trials)")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"\n{'anchor (what we beat)':<{width}}  gap")
    for name, value in ANCHORS:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
