"""When the autoposter posts: the slot arithmetic, as pure functions.

Nothing here reads the clock or does I/O. Every function takes ``now`` and the last served slot
explicitly and returns datetimes, so the rules below are tested in milliseconds
(``tests/test_schedule.py``) and the role (:mod:`utils.autoposter.role`) only *fires* what these
functions compute (with APScheduler).

The rules:

* **Interval** (``POST_INTERVAL``): slots are that many elapsed seconds apart, counted in absolute
  time, so a DST change neither shortens nor lengthens a gap.
* **Cron** (``POST_CRON``): five fields with their classic crontab meaning (0 and 7 are Sunday;
  when both day fields are restricted, a day matching *either* is a slot). Slots are wall-clock
  times in ``POST_TIMEZONE``:

  - a wall time that does not exist (02:30 on the night clocks jump from 02:00 to 03:00) is served
    after the jump, shifted by the length of the gap (03:30), and merges with a slot already there;
  - a wall time that occurs twice (02:30 on the night clocks go back from 03:00 to 02:00) is served
    once, at its first occurrence.

  APScheduler 3's own ``CronTrigger.from_crontab`` does neither: it numbers weekdays from Monday
  (``* * * * 1`` fires on Tuesdays) and fires a repeated wall time twice.
* **Handover** (:func:`activation`): a new leader serves at most one catch-up post, and only if a
  slot it missed (one after the last served slot) passed no more than ``POST_MISFIRE_GRACE`` ago;
  then it goes back on schedule (never a burst). The slot judged is the *latest* missed one: after
  an outage of two days, today's 09:00 post still goes out at 09:20 with a grace of an hour, as
  the README promises ("how late a missed slot may still be served"); when one slot was missed,
  that is simply the first slot after the last served one. An interval schedule keeps its
  cadence: with nothing missed, its next slot is the last slot + the interval.
* **While leading** (:func:`slot_after`, :func:`is_missed`): a slot that fires more than the grace
  late (the host slept) is skipped, and slots that passed while one was being served are skipped
  too.

Python compares and subtracts two datetimes that share a ``tzinfo`` by their wall clock, ignoring
the UTC offset, which is wrong across a DST change; every computation here is therefore done in UTC
and only results are converted to the schedule's zone.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo

__all__ = [
    "Activation",
    "CronFields",
    "CronSchedule",
    "IntervalSchedule",
    "Schedule",
    "activation",
    "is_missed",
    "next_slot",
    "parse_cron",
    "slot_after",
    "upcoming",
]

UTC = dt.UTC
ONE_MINUTE = dt.timedelta(minutes=1)
#: The smallest step of a datetime: "strictly after *x* - RESOLUTION" is "at or after *x*".
RESOLUTION = dt.timedelta(microseconds=1)
#: The Gregorian calendar repeats every 400 years, so a day pattern that matches nothing in that
#: span never matches; :func:`parse_cron` rejects those, so the search never runs out in practice.
CRON_SEARCH_DAYS = 146_097
#: Clock jumps are looked for this far back; a zone has skipped at most a whole day (Samoa, 2011).
JUMP_LOOKBACK = dt.timedelta(days=1)
#: The longest each month can be (February in a leap year).
MONTH_MAX_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
MONTH_NAMES = {name: i for i, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), start=1)}
WEEKDAY_NAMES = {name: i for i, name in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
#: crontab accepts 7 as a second name for Sunday.
SUNDAY, SUNDAY_ALIAS = 0, 7


# -- cron expressions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CronFields:
    """A parsed 5-field crontab expression: the allowed values of each field."""

    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    #: Both day fields restricted: a day matching either is a slot (crontab(5); otherwise both).
    either_day: bool

    def matches_day(self, day: dt.date) -> bool:
        if day.month not in self.months:
            return False
        by_date = day.day in self.days
        by_weekday = day.isoweekday() % 7 in self.weekdays
        return (by_date or by_weekday) if self.either_day else (by_date and by_weekday)

    def next_wall_time(self, after: dt.datetime) -> dt.datetime | None:
        """The first naive wall-clock minute strictly after naive *after* that matches."""
        start = after.replace(second=0, microsecond=0) + ONE_MINUTE
        day = start.date()
        for _ in range(CRON_SEARCH_DAYS):
            if self.matches_day(day):
                first_day = day == start.date()
                for hour in self.hours:
                    if first_day and hour < start.hour:
                        continue
                    for minute in self.minutes:
                        if first_day and hour == start.hour and minute < start.minute:
                            continue
                        return dt.datetime.combine(day, dt.time(hour, minute))
            day += dt.timedelta(days=1)
        return None


def _field_value(text: str, field: str, low: int, high: int, names: dict[str, int]) -> int:
    value = names.get(text.lower()) if names else None
    if value is None:
        if not text.isdigit():
            raise ValueError(f"{field}: {text!r} is not a number" + (" or a name" if names else ""))
        value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{field}: {value} is outside {low}-{high}")
    return value


def _parse_field(text: str, field: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    """One field: ``*``, ``a``, ``a-b``, each optionally ``/step``, comma-separated."""
    values: set[int] = set()
    for item in text.split(","):
        body, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"{field}: step {step_text!r} in {item!r} is not a positive number")
            step = int(step_text)
        if body == "*":
            first, last = low, high
        elif "-" in body:
            first_text, _, last_text = body.partition("-")
            first = _field_value(first_text, field, low, high, names)
            last = _field_value(last_text, field, low, high, names)
            if names is WEEKDAY_NAMES and last == SUNDAY and first > SUNDAY:
                last = SUNDAY_ALIAS  # "fri-sun" ends on the Sunday after
            if first > last:
                raise ValueError(f"{field}: range {body!r} runs backwards")
        else:
            first = _field_value(body, field, low, high, names)
            last = high if slash else first  # "5/15" means 5-max/15, as in cronie and APScheduler
        values.update(range(first, last + 1, step))
    return frozenset(values)


def parse_cron(expression: str) -> CronFields:
    """Parse a 5-field crontab expression; ValueError names the field that is wrong."""
    parts = expression.split()
    if len(parts) != 5:
        raise ValueError(f"expected 5 fields (minute hour day month weekday), got {len(parts)}")
    minute, hour, day, month, weekday = parts
    weekdays = _parse_field(weekday, "weekday", SUNDAY, SUNDAY_ALIAS, WEEKDAY_NAMES)
    if SUNDAY_ALIAS in weekdays:
        weekdays = (weekdays - {SUNDAY_ALIAS}) | {SUNDAY}
    fields = CronFields(
        minutes=tuple(sorted(_parse_field(minute, "minute", 0, 59, {}))),
        hours=tuple(sorted(_parse_field(hour, "hour", 0, 23, {}))),
        days=_parse_field(day, "day", 1, 31, {}),
        months=_parse_field(month, "month", 1, 12, MONTH_NAMES),
        weekdays=weekdays,
        either_day=not day.startswith("*") and not weekday.startswith("*"),
    )
    if not fields.either_day and not any(
        d <= MONTH_MAX_DAYS[m - 1] for m in fields.months for d in fields.days
    ):
        raise ValueError(f"day {day!r} never occurs in month {month!r}")
    return fields


# -- schedules ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntervalSchedule:
    """A slot every *seconds* of elapsed time; *tz* is the zone results are shown in."""

    seconds: float
    tz: ZoneInfo

    def __post_init__(self) -> None:
        if self.seconds <= 0:
            raise ValueError(f"the interval must be positive, got {self.seconds:g} s")

    @property
    def step(self) -> dt.timedelta:
        return dt.timedelta(seconds=self.seconds)

    def describe(self) -> str:
        return f"every {self.seconds:g} s"


@dataclass(frozen=True)
class CronSchedule:
    """Wall-clock slots in *tz* matching a crontab expression."""

    expression: str
    tz: ZoneInfo
    fields: CronFields

    @classmethod
    def parse(cls, expression: str, tz: ZoneInfo) -> CronSchedule:
        return cls(expression, tz, parse_cron(expression))

    def describe(self) -> str:
        return f"cron '{self.expression}'"


Schedule = IntervalSchedule | CronSchedule


@dataclass(frozen=True)
class Activation:
    """What a new leader does first."""

    #: When its first slot fires (``now`` for a catch-up); None if the schedule never fires again.
    first: dt.datetime | None
    #: The missed slot that first one makes up for, or None when it is a regular slot.
    catch_up_for: dt.datetime | None = None


def _utc(moment: dt.datetime) -> dt.datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"a naive datetime ({moment.isoformat()}) has no place on a schedule")
    return moment.astimezone(UTC)


def _spring_jump_behind(tz: ZoneInfo, moment: dt.datetime) -> dt.timedelta:
    """How far the clock jumped forward in the day before *moment* (usually zero).

    Wall times skipped by that jump are served up to that much later than their wall time, so a
    search for the next slot must start that much earlier on the wall clock.
    """
    now_offset = moment.astimezone(tz).utcoffset() or dt.timedelta(0)
    before_offset = (moment - JUMP_LOOKBACK).astimezone(tz).utcoffset() or dt.timedelta(0)
    return max(dt.timedelta(0), now_offset - before_offset)


def _next_cron_slot(schedule: CronSchedule, after: dt.datetime) -> dt.datetime | None:
    after_utc = _utc(after)
    wall = after_utc.astimezone(schedule.tz).replace(tzinfo=None, fold=0)
    wall -= _spring_jump_behind(schedule.tz, after_utc)
    # Walk the matching wall times upwards and keep the earliest instant after *after*. A wall
    # time maps to an instant with fold=0: the first of a repeated wall time and, for one inside
    # a gap, the offset from before the jump, which shifts it forward by the gap. Shifted ones
    # are why the first match is not necessarily the earliest: the walk goes on until the wall
    # clock reaches the best instant found. Wall times only increase and map to instants at
    # most a day's jump apart from them, so the walk ends.
    best: dt.datetime | None = None
    best_wall: dt.datetime | None = None
    while True:
        next_wall = schedule.fields.next_wall_time(wall)
        if next_wall is None or (best_wall is not None and next_wall >= best_wall):
            return None if best is None else best.astimezone(schedule.tz)
        slot = next_wall.replace(tzinfo=schedule.tz).astimezone(UTC)
        if slot > after_utc and (best is None or slot < best):
            best = slot
            best_wall = slot.astimezone(schedule.tz).replace(tzinfo=None, fold=0)
        wall = next_wall


def next_slot(schedule: Schedule, after: dt.datetime) -> dt.datetime | None:
    """The first slot strictly after *after* (for an interval: *after* + the interval)."""
    if isinstance(schedule, IntervalSchedule):
        return (_utc(after) + schedule.step).astimezone(schedule.tz)
    return _next_cron_slot(schedule, after)


def slot_after(schedule: Schedule, served: dt.datetime, now: dt.datetime) -> dt.datetime | None:
    """The slot to fire once *served* was served, now: the first one after it still ahead of *now*.

    Slots that passed while *served* was late or slow to publish are skipped, never fired in a
    burst; an interval schedule stays on its grid (*served* + k * interval).
    """
    served_utc, now_utc = _utc(served), _utc(now)
    if isinstance(schedule, IntervalSchedule):
        behind = max(0.0, (now_utc - served_utc).total_seconds())
        steps = int(behind // schedule.seconds) + 1
        slot = served_utc + schedule.step * steps
        while slot <= now_utc:  # float rounding at an exact multiple
            slot += schedule.step
        return slot.astimezone(schedule.tz)
    return _next_cron_slot(schedule, max(served_utc, now_utc))


def is_missed(slot: dt.datetime, now: dt.datetime, grace: dt.timedelta) -> bool:
    """True if *slot* passed more than *grace* before *now* (too late to serve it)."""
    return _utc(now) - _utc(slot) > grace


def _latest_cron_slot(schedule: CronSchedule, since: dt.datetime, now: dt.datetime) -> dt.datetime | None:
    """The latest slot in [*since*, *now*] (UTC datetimes), or None.

    Probes back from *now* over doubling spans rather than walking forward from *since*: a grace
    of 30 days under a minutely cron would otherwise mean 43,200 steps. Once a span holds a slot,
    its later half held none, so the walk forward to the latest one stays short.
    """
    span = ONE_MINUTE
    while True:
        start = max(since, now - span)
        slot = _next_cron_slot(schedule, start - RESOLUTION)
        if slot is not None and _utc(slot) <= now:
            break
        if start == since:
            return None
        span *= 2
    while (following := _next_cron_slot(schedule, slot)) is not None and _utc(following) <= now:
        slot = following
    return slot


def _latest_missed(
    schedule: Schedule, first_missed: dt.datetime, now: dt.datetime, grace: dt.timedelta
) -> dt.datetime | None:
    """The latest slot from *first_missed* (<= *now*) to *now* if it passed within *grace*."""
    first_utc, now_utc = _utc(first_missed), _utc(now)
    latest: dt.datetime | None
    if isinstance(schedule, IntervalSchedule):
        # first_missed + k * interval on the grid; int() of a float may land one step too far.
        steps = int((now_utc - first_utc).total_seconds() // schedule.seconds)
        latest = first_utc + schedule.step * steps
        if latest > now_utc:
            latest -= schedule.step
        latest = latest.astimezone(schedule.tz)
    else:
        latest = _latest_cron_slot(schedule, max(first_utc, now_utc - grace), now_utc)
    if latest is None or is_missed(latest, now, grace):
        return None
    return latest


def activation(
    schedule: Schedule, *, now: dt.datetime, last_served: dt.datetime | None, grace: dt.timedelta
) -> Activation:
    """A new leader's first slot, given the last slot any leader served (None: never)."""
    if last_served is None:
        return Activation(first=next_slot(schedule, now))
    first_missed = next_slot(schedule, last_served)
    if first_missed is None:
        return Activation(first=None)
    if _utc(first_missed) > _utc(now):
        # Nothing missed: the schedule goes on as if nobody had handed over (for an interval, its
        # cadence: the last slot + the interval).
        return Activation(first=first_missed)
    latest = _latest_missed(schedule, first_missed, now, grace)
    if latest is not None:
        return Activation(first=_utc(now).astimezone(schedule.tz), catch_up_for=latest)
    return Activation(first=next_slot(schedule, now))


def upcoming(schedule: Schedule, first: dt.datetime | None, count: int) -> list[dt.datetime]:
    """*count* slots from *first* on (first included): what ``/queue`` and ``/schedule`` show."""
    slots: list[dt.datetime] = []
    slot = first.astimezone(schedule.tz) if first is not None else None
    while slot is not None and len(slots) < count:
        slots.append(slot)
        slot = next_slot(schedule, slot)
    return slots
