"""A fixed-bucket histogram: bounded memory however many observations (no list a scrape empties).

In the bottom layer because two packages time things this way: the pipeline its handlers
(:mod:`utils.updates.stats`) and the send limiter the waits it imposes (:mod:`utils.sending.limiter`);
neither should import the other for it. ``/metrics`` renders it.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class DurationHistogram:
    """Cumulative-ready histogram: per-bucket counts (last bucket is +Inf), sum and count."""

    buckets: tuple[float, ...]  # upper bounds, ascending (a last +Inf bucket is implied)
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``[(upper_bound, count <= bound), ..., (inf, count)]`` as Prometheus wants it."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out
