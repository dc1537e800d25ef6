"""Counters of the update pipeline, read at scrape time by /health and /metrics.

Every counter is declared once, as a :class:`Count` on :class:`UpdateStats`: its attribute name
(what the pipeline increments), its Prometheus name, help text and kind, and its ``/health`` key.
The status snapshot (``utils/ops/status_report.py``), the ``/health`` JSON and the Prometheus
collector (``utils/ops/metrics.py``) iterate :data:`COUNTS`; none lists the counters again, so
adding one is one line here.

Everything here is bounded: counters and a fixed-bucket histogram, never a list that only a
scrape would empty (with ``HEALTH_PORT=0`` nothing ever scrapes).
"""

from __future__ import annotations

import time
from typing import Any, Literal, overload

from utils.base.histogram import DurationHistogram

HANDLER_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


#: Where a count shows in ``/health``: the ``updates`` section, or ``polling`` (getUpdates only,
#: so left out in webhook mode with the rest of that section).
Section = Literal["updates", "polling"]


class Count:
    """One counter (or gauge) of :class:`UpdateStats`, declared once with everything its readers need.

    On the class, ``UpdateStats.fetched`` is this declaration; on an instance, an ``int`` from 0.
    A non-data descriptor: it answers only until the first write, which puts a plain ``int`` in the
    instance, so ``stats.fetched += 1`` on the pipeline's path costs what an attribute costs.
    """

    def __init__(self, metric: str, help_text: str, *, health: str, section: Section = "updates",
                 kind: Literal["counter", "gauge"] = "counter") -> None:
        self.metric = metric  # Prometheus name without the ``solobot_`` prefix
        self.help = help_text
        self.health = health  # the key in /health's *section*
        self.section: Section = section
        self.kind = kind
        self.name = ""  # the attribute, set when the class is made

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type) -> Count: ...

    @overload
    def __get__(self, instance: object, owner: type) -> int: ...

    def __get__(self, instance: object | None, owner: type) -> Count | int:
        return self if instance is None else 0  # not written yet (else the instance's value answers)

    def __repr__(self) -> str:
        return f"Count({self.name})"


class UpdateStats:
    """What the pipeline has done since the process started (all instances of it, every term)."""

    conflicts = Count("getupdates_conflicts_total", "409 Conflict answers to getUpdates",
                      health="conflicts", section="polling")
    fetched = Count("updates_fetched_total", "Updates received from Telegram", health="fetched")
    handled = Count("updates_handled_total", "Updates whose handler finished (returned or raised)",
                    health="handled")
    handler_errors = Count("handler_errors_total", "Handlers that raised", health="handler_errors")
    duplicates = Count("updates_duplicate_total", "Updates skipped because the inbox already had them",
                       health="duplicates_skipped")
    redelivered = Count("updates_redelivered_total", "Updates handled again after an earlier attempt",
                        health="redelivered")
    inbox_waiting = Count("inbox_waiting_updates", "Updates this leader holds that are not yet done",
                          health="waiting", kind="gauge")
    set_aside = Count("updates_set_aside_total", "Poison updates this instance set aside (handler running "
                      "at POISON_AFTER deaths)", health="set_aside_total")  # utils/updates/poison.py

    def __init__(self, *, polling: bool = False, last_ok: float | None = None, **counts: int) -> None:
        self.polling = polling  # a fetch loop is running now
        self.last_ok = last_ok  # monotonic time of the last successful getUpdates
        self.errors: dict[str, int] = {}  # getUpdates failures by kind
        self.handler_seconds = DurationHistogram(HANDLER_BUCKETS)
        for name, value in counts.items():
            if not isinstance(getattr(type(self), name, None), Count):
                raise TypeError(f"UpdateStats has no count {name!r}")
            setattr(self, name, value)

    def seconds_since_ok(self) -> float | None:
        return None if self.last_ok is None else round(time.monotonic() - self.last_ok, 3)

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def counts(self) -> tuple[tuple[Count, int], ...]:
        """Every declared count with its value now, in declaration order."""
        values: dict[str, int] = vars(self)
        return tuple((count, values.get(count.name, 0)) for count in COUNTS)

    def __repr__(self) -> str:
        values: dict[str, Any] = {count.name: value for count, value in self.counts()}
        return f"UpdateStats(polling={self.polling}, last_ok={self.last_ok}, {values})"


#: The declared counts, in declaration order: what /health and /metrics iterate.
COUNTS: tuple[Count, ...] = tuple(v for v in vars(UpdateStats).values() if isinstance(v, Count))
