"""Counters of the update pipeline, read at scrape time by /health and /metrics.

Everything here is bounded: counters and a fixed-bucket histogram, never a list that only a
scrape would empty (with ``HEALTH_PORT=0`` nothing ever scrapes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from utils.base.histogram import DurationHistogram

HANDLER_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class UpdateStats:
    """What the pipeline has done since the process started (all instances of it, every term)."""

    polling: bool = False  # a fetch loop is running now
    last_ok: float | None = None  # monotonic time of the last successful getUpdates
    conflicts: int = 0  # 409s seen by getUpdates
    fetched: int = 0  # updates received from Telegram
    handled: int = 0  # handlers finished (whatever they returned or raised)
    handler_errors: int = 0  # handlers that raised
    duplicates: int = 0  # updates skipped because the inbox already had them
    redelivered: int = 0  # updates handled with attempt > 1
    set_aside: int = 0  # poison updates this instance set aside (utils/updates/poison.py)
    inbox_waiting: int = 0  # updates held by this leader, not yet done
    errors: dict[str, int] = field(default_factory=dict)  # getUpdates failures by kind
    handler_seconds: DurationHistogram = field(default_factory=lambda: DurationHistogram(HANDLER_BUCKETS))

    def seconds_since_ok(self) -> float | None:
        return None if self.last_ok is None else round(time.monotonic() - self.last_ok, 3)

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
