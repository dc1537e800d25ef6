"""How loudly to report that Telegram cannot be reached: pure, so the schedule is unit-tested.

The first failure is a WARNING with the error's text; while it lasts, a reminder after 1, 5 and
15 minutes, then every hour, each with how long and how many attempts; one INFO when it recovers.
Everything in between is DEBUG: an outage must not flood the log, nor go unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass

REMINDERS_AFTER = (60.0, 300.0, 900.0)
REMINDER_EVERY = 3600.0


@dataclass
class Outage:
    started: float
    failures: int = 1
    reminders: int = 0  # reminders already given

    def next_reminder(self) -> float:
        if self.reminders < len(REMINDERS_AFTER):
            return self.started + REMINDERS_AFTER[self.reminders]
        extra = self.reminders - len(REMINDERS_AFTER) + 1
        return self.started + REMINDERS_AFTER[-1] + extra * REMINDER_EVERY


class OutageLog:
    """Feed it every failure and success of a call; it says what to log at WARNING or INFO."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.outage: Outage | None = None

    def failure(self, now: float, error: str) -> str | None:
        """A WARNING line to log now, or None (log at DEBUG)."""
        if self.outage is None:
            self.outage = Outage(started=now)
            return f"{self.what} failed ({error}); retrying"
        outage = self.outage
        outage.failures += 1
        if now >= outage.next_reminder():
            outage.reminders += 1
            return (f"{self.what} still failing after {now - outage.started:.0f} s "
                    f"({outage.failures} attempts; last error: {error})")
        return None

    def success(self, now: float) -> str | None:
        """An INFO line if an outage just ended."""
        outage, self.outage = self.outage, None
        if outage is None:
            return None
        return f"{self.what} works again after {now - outage.started:.0f} s ({outage.failures} failed attempts)"
