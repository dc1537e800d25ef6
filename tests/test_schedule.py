"""The autoposter's slot arithmetic (utils/autoposter/schedule.py), in-process, in milliseconds.

Results are compared by their ISO text in the schedule's zone ("2024-10-27T02:30:00+02:00"): the
offset shows which side of a DST change a slot is on, and Python's ``==`` between aware datetimes
is unreliable in exactly these cases (wall-clock comparison within one zone; a datetime in a
repeated hour never equals one in another zone).
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from utils.autoposter.schedule import (
    Activation,
    CronSchedule,
    IntervalSchedule,
    Schedule,
    activation,
    is_missed,
    next_slot,
    parse_cron,
    slot_after,
    upcoming,
)
from utils.config import ConfigError
from utils.ops.daemon_settings import load_daemon_settings

UTC = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
TOKYO = ZoneInfo("Asia/Tokyo")
HOUR = dt.timedelta(hours=1)
MINUTE = dt.timedelta(minutes=1)

# Europe/Berlin in 2024: clocks jump 02:00 -> 03:00 on 31 March, fall back 03:00 -> 02:00 on
# 27 October (02:00-03:00 happens twice: first at +02:00, then at +01:00).
DAILY_0230 = CronSchedule.parse("30 2 * * *", BERLIN)


def at(text: str) -> dt.datetime:
    """An aware datetime from ISO text with its offset (fold follows from the offset)."""
    moment = dt.datetime.fromisoformat(text)
    assert moment.tzinfo is not None
    return moment


def iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def isos(moments: list[dt.datetime]) -> list[str]:
    return [m.isoformat() for m in moments]


def cron(expression: str, tz: ZoneInfo = UTC) -> CronSchedule:
    return CronSchedule.parse(expression, tz)


# -- crontab meaning ------------------------------------------------------------------------------


@pytest.mark.parametrize("weekday,expected", [
    ("1", "2024-06-03"),      # Monday: crontab counts from Sunday = 0 (APScheduler 3 says Tuesday)
    ("0", "2024-06-09"),      # Sunday
    ("7", "2024-06-09"),      # Sunday again
    ("mon", "2024-06-03"),
    ("fri-sun", "2024-06-07"),
    ("sat", "2024-06-08"),
])
def test_weekdays_count_from_sunday(weekday: str, expected: str) -> None:
    sunday_noon = at("2024-06-02T12:00:00+00:00")
    slot = next_slot(cron(f"0 9 * * {weekday}"), sunday_noon)
    assert iso(slot) == f"{expected}T09:00:00+00:00"


def test_weekday_range_ending_on_sunday_covers_the_weekend() -> None:
    assert parse_cron("0 9 * * fri-sun").weekdays == {5, 6, 0}
    assert parse_cron("0 9 * * 5-7").weekdays == {5, 6, 0}
    assert parse_cron("0 9 * * *").weekdays == set(range(7))


def test_both_day_fields_restricted_means_either() -> None:
    """crontab(5): '13 * fri' is every 13th and every Friday; '*' in one field means both."""
    schedule = cron("0 0 13 * fri")
    slots = upcoming(schedule, next_slot(schedule, at("2024-09-01T00:00:00+00:00")), 4)
    assert isos(slots) == [
        "2024-09-06T00:00:00+00:00",  # Friday
        "2024-09-13T00:00:00+00:00",  # Friday the 13th
        "2024-09-20T00:00:00+00:00",
        "2024-09-27T00:00:00+00:00",
    ]
    ten_days = cron("0 0 */10 * fri")  # day '*/10' starts with '*': Fridays that are 1/11/21/31
    assert iso(next_slot(ten_days, at("2024-01-01T00:00:00+00:00"))) == "2024-03-01T00:00:00+00:00"


def test_ranges_steps_lists_and_names() -> None:
    schedule = cron("*/20 9-10 * * *")
    first = next_slot(schedule, at("2024-06-01T08:59:59+00:00"))
    assert [s.strftime("%d %H:%M") for s in upcoming(schedule, first, 7)] == [
        "01 09:00", "01 09:20", "01 09:40", "01 10:00", "01 10:20", "01 10:40", "02 09:00",
    ]
    assert parse_cron("5/20 * * * *").minutes == (5, 25, 45)
    assert parse_cron("0 12 1 jan,JUL *").months == {1, 7}
    assert parse_cron("0,30 8,12-13 * * *").hours == (8, 12, 13)


def test_leap_day_is_found_across_a_century_without_one() -> None:
    schedule = cron("0 0 29 2 *")
    assert iso(next_slot(schedule, at("2097-03-01T00:00:00+00:00"))) == "2104-02-29T00:00:00+00:00"


@pytest.mark.parametrize("expression,field", [
    ("* * * *", "5 fields"),
    ("61 * * * *", "minute"),
    ("* 24 * * *", "hour"),
    ("* * 0 * *", "day"),
    ("* * * 13 *", "month"),
    ("* * * * 8", "weekday"),
    ("* * * * mon-sat-sun", "weekday"),
    ("*/0 * * * *", "step"),
    ("5-1 * * * *", "backwards"),
    ("x * * * *", "minute"),
    ("1,,2 * * * *", "minute"),
    ("0 0 30 feb *", "never occurs"),
])
def test_bad_expressions_name_the_field(expression: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        parse_cron(expression)


def test_config_validates_with_the_same_parser() -> None:
    token = "123456:" + "A" * 35
    with pytest.raises(ConfigError, match="never occurs"):
        load_daemon_settings({"BOT_TOKEN": token, "CHANNEL_ID": "@solochan", "POST_CRON": "0 0 31 4 *"})
    settings = load_daemon_settings({"BOT_TOKEN": token, "CHANNEL_ID": "@solochan", "POST_CRON": "0 9 * * fri-sun"})
    assert settings.autoposter.post_cron == "0 9 * * fri-sun"


# -- time zones -----------------------------------------------------------------------------------


def test_cron_runs_on_the_wall_clock_of_its_zone() -> None:
    schedule = cron("0 9 * * *", TOKYO)
    # 01:00 UTC is 10:00 in Tokyo: today's 09:00 has passed.
    assert iso(next_slot(schedule, at("2024-06-01T01:00:00+00:00"))) == "2024-06-02T09:00:00+09:00"
    assert iso(next_slot(schedule, at("2024-05-31T23:59:00+00:00"))) == "2024-06-01T09:00:00+09:00"


def test_now_in_any_zone_gives_the_same_slot() -> None:
    in_utc = next_slot(DAILY_0230, at("2024-06-01T00:00:00+00:00"))
    in_tokyo = next_slot(DAILY_0230, at("2024-06-01T09:00:00+09:00"))
    assert iso(in_utc) == iso(in_tokyo) == "2024-06-01T02:30:00+02:00"  # midnight UTC is 02:00 there


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        next_slot(DAILY_0230, dt.datetime(2024, 6, 1, 12, 0))


# -- DST ------------------------------------------------------------------------------------------


def test_spring_forward_serves_the_missing_0230_once_after_the_jump() -> None:
    slots = upcoming(DAILY_0230, next_slot(DAILY_0230, at("2024-03-29T12:00:00+01:00")), 3)
    assert isos(slots) == [
        "2024-03-30T02:30:00+01:00",
        "2024-03-31T03:30:00+02:00",  # 02:30 does not exist; shifted by the one-hour gap
        "2024-04-01T02:30:00+02:00",
    ]


def test_fall_back_serves_the_repeated_0230_once() -> None:
    """APScheduler 3's CronTrigger fires this one twice (02:30+02:00 and 02:30+01:00)."""
    slots = upcoming(DAILY_0230, next_slot(DAILY_0230, at("2024-10-26T12:00:00+02:00")), 3)
    assert isos(slots) == [
        "2024-10-27T02:30:00+02:00",
        "2024-10-28T02:30:00+01:00",
        "2024-10-29T02:30:00+01:00",
    ]
    # From inside the repeated hour, the second 02:30 is not a slot either.
    assert iso(next_slot(DAILY_0230, at("2024-10-27T02:10:00+01:00"))) == "2024-10-28T02:30:00+01:00"
    served = at("2024-10-27T02:30:00+02:00")
    assert iso(slot_after(DAILY_0230, served, at("2024-10-27T02:30:01+02:00"))) == "2024-10-28T02:30:00+01:00"


def test_hourly_cron_across_both_changes() -> None:
    hourly = cron("30 * * * *", BERLIN)
    spring = upcoming(hourly, next_slot(hourly, at("2024-03-31T01:00:00+01:00")), 3)
    assert isos(spring) == [
        "2024-03-31T01:30:00+01:00",
        "2024-03-31T03:30:00+02:00",  # the shifted 02:30 and the real 03:30 are one slot
        "2024-03-31T04:30:00+02:00",
    ]
    autumn = upcoming(hourly, next_slot(hourly, at("2024-10-27T01:00:00+02:00")), 3)
    assert isos(autumn) == [
        "2024-10-27T01:30:00+02:00",
        "2024-10-27T02:30:00+02:00",  # the wall clock's 02:30 once
        "2024-10-27T03:30:00+01:00",
    ]


def test_after_the_jump_but_before_the_shifted_slot() -> None:
    """03:10+02:00 on 31 March: the missing 02:30 is served at 03:30+02:00, still ahead."""
    assert iso(next_slot(DAILY_0230, at("2024-03-31T03:10:00+02:00"))) == "2024-03-31T03:30:00+02:00"
    assert iso(next_slot(DAILY_0230, at("2024-03-31T03:30:00+02:00"))) == "2024-04-01T02:30:00+02:00"


@pytest.mark.parametrize("expression", ["30 2 * * *", "*/20 * * * *", "0,45 1-3 * * *", "59 2 * * *"])
@pytest.mark.parametrize("day", ["2024-03-30", "2024-10-26"])
def test_next_slot_agrees_with_a_minute_by_minute_reference(expression: str, day: str) -> None:
    """Around each change, from every 7th minute: the earliest instant any matching wall minute
    maps to (fold=0, so a skipped wall time is shifted by the gap and a repeated one counts once)."""
    schedule = cron(expression, BERLIN)
    start = dt.datetime.fromisoformat(day)
    instants = sorted({
        (start + i * MINUTE).replace(tzinfo=BERLIN).astimezone(UTC)
        for i in range(3 * 24 * 60)
        if schedule.fields.matches_day((start + i * MINUTE).date())
        and (start + i * MINUTE).hour in schedule.fields.hours
        and (start + i * MINUTE).minute in schedule.fields.minutes
    })
    after = start.replace(tzinfo=BERLIN).astimezone(UTC)
    while after < instants[-1]:
        expected = next(i for i in instants if i > after)
        assert iso(next_slot(schedule, after)) == expected.astimezone(BERLIN).isoformat(), after
        after += 7 * MINUTE


@pytest.mark.parametrize("start,seconds,expected", [
    ("2024-03-31T01:30:00+01:00", 3600, "2024-03-31T03:30:00+02:00"),   # one real hour, not 02:30
    ("2024-03-30T12:00:00+01:00", 86400, "2024-03-31T13:00:00+02:00"),  # 24 h, not the wall's 12:00
    ("2024-10-27T02:30:00+02:00", 3600, "2024-10-27T02:30:00+01:00"),   # the repeated hour
    ("2024-10-26T12:00:00+02:00", 86400, "2024-10-27T11:00:00+01:00"),
])
def test_interval_counts_elapsed_time_across_dst(start: str, seconds: int, expected: str) -> None:
    assert iso(next_slot(IntervalSchedule(seconds, BERLIN), at(start))) == expected


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        IntervalSchedule(0, UTC)


# -- handover: the missed-slot rule ---------------------------------------------------------------


def plan(schedule: Schedule, now: str, last: str | None, grace: dt.timedelta) -> tuple[str | None, str | None]:
    result = activation(schedule, now=at(now), last_served=at(last) if last else None, grace=grace)
    assert isinstance(result, Activation)
    return iso(result.first), iso(result.catch_up_for)


EVERY_MINUTE = IntervalSchedule(60, UTC)
T0 = "2024-06-01T12:00:00+00:00"


@pytest.mark.parametrize("now,last,grace,expected", [
    # Never served: the first slot is one interval from now.
    ("2024-06-01T12:00:00+00:00", None, HOUR, ("2024-06-01T12:01:00+00:00", None)),
    # Nothing missed: the cadence goes on (last + interval), no catch-up.
    ("2024-06-01T12:00:30+00:00", T0, HOUR, ("2024-06-01T12:01:00+00:00", None)),
    # One slot missed, within the grace: one catch-up now.
    ("2024-06-01T12:01:30+00:00", T0, HOUR, ("2024-06-01T12:01:30+00:00", "2024-06-01T12:01:00+00:00")),
    # Exactly on the slot counts as missed (it is due).
    ("2024-06-01T12:01:00+00:00", T0, HOUR, ("2024-06-01T12:01:00+00:00", "2024-06-01T12:01:00+00:00")),
    # Several missed: still one catch-up, for the latest (12:05 passed 30 s ago).
    ("2024-06-01T12:05:30+00:00", T0, 45 * dt.timedelta(seconds=1),
     ("2024-06-01T12:05:30+00:00", "2024-06-01T12:05:00+00:00")),
    # The latest missed slot passed longer ago than the grace: back on schedule from now.
    ("2024-06-01T12:05:30+00:00", T0, 20 * dt.timedelta(seconds=1), ("2024-06-01T12:06:30+00:00", None)),
])
def test_interval_handover(now: str, last: str | None, grace: dt.timedelta,
                           expected: tuple[str | None, str | None]) -> None:
    assert plan(EVERY_MINUTE, now, last, grace) == expected


DAILY_0900 = cron("0 9 * * *")


def test_cron_handover_catch_up_within_grace_then_back_on_schedule() -> None:
    last, now = "2024-06-01T09:00:00+00:00", "2024-06-02T09:20:00+00:00"
    first, catch_up_for = plan(DAILY_0900, now, last, HOUR)
    assert (first, catch_up_for) == (now, "2024-06-02T09:00:00+00:00")
    # The catch-up is served at `now`; the slot after it is tomorrow's, not another one now.
    assert iso(slot_after(DAILY_0900, at(now), at(now))) == "2024-06-03T09:00:00+00:00"


def test_cron_handover_beyond_grace_waits_for_the_next_slot() -> None:
    assert plan(DAILY_0900, "2024-06-02T10:30:00+00:00", "2024-06-01T09:00:00+00:00", HOUR) == (
        "2024-06-03T09:00:00+00:00", None)


def test_cron_handover_after_a_long_outage_serves_todays_slot() -> None:
    """Days missed: the first missed slot is long past, but today's is within the grace."""
    assert plan(DAILY_0900, "2024-06-05T09:20:00+00:00", "2024-06-01T09:00:00+00:00", HOUR) == (
        "2024-06-05T09:20:00+00:00", "2024-06-05T09:00:00+00:00")


def test_cron_handover_with_nothing_missed() -> None:
    assert plan(DAILY_0900, "2024-06-01T12:00:00+00:00", "2024-06-01T09:00:00+00:00", HOUR) == (
        "2024-06-02T09:00:00+00:00", None)


def test_grace_boundary() -> None:
    last = "2024-06-01T09:00:00+00:00"
    assert plan(DAILY_0900, "2024-06-02T10:00:00+00:00", last, HOUR)[1] == "2024-06-02T09:00:00+00:00"
    late = at("2024-06-02T10:00:00+00:00") + dt.timedelta(microseconds=1)
    assert plan(DAILY_0900, late.isoformat(), last, HOUR) == ("2024-06-03T09:00:00+00:00", None)


def test_minutely_cron_after_a_month_away_is_quick_and_serves_one() -> None:
    minutely = cron("* * * * *")
    first, catch_up_for = plan(minutely, "2024-07-01T00:00:30+00:00", "2024-06-01T00:00:00+00:00",
                               dt.timedelta(days=30))
    assert (first, catch_up_for) == ("2024-07-01T00:00:30+00:00", "2024-07-01T00:00:00+00:00")


def test_handover_at_the_spring_gap() -> None:
    """Served 02:30 on the 30th; 31 March's slot is 03:30+02:00 (shifted)."""
    last = "2024-03-30T02:30:00+01:00"
    assert plan(DAILY_0230, "2024-03-31T04:00:00+02:00", last, HOUR) == (
        "2024-03-31T04:00:00+02:00", "2024-03-31T03:30:00+02:00")
    assert plan(DAILY_0230, "2024-03-31T04:00:00+02:00", last, 10 * MINUTE) == (
        "2024-04-01T02:30:00+02:00", None)


def test_handover_in_the_repeated_hour_does_not_post_twice() -> None:
    """Served 02:30+02:00; an hour later it is 02:30 again on the wall, but not a slot."""
    assert plan(DAILY_0230, "2024-10-27T02:35:00+01:00", "2024-10-27T02:30:00+02:00", 2 * HOUR) == (
        "2024-10-28T02:30:00+01:00", None)


def test_interval_handover_keeps_elapsed_time_across_dst() -> None:
    hourly = IntervalSchedule(3600, BERLIN)
    assert plan(hourly, "2024-03-31T03:00:00+02:00", "2024-03-31T01:30:00+01:00", HOUR) == (
        "2024-03-31T03:30:00+02:00", None)


# -- while leading: late and slow slots -------------------------------------------------------------


def test_is_missed_only_beyond_the_grace() -> None:
    slot = at("2024-06-01T09:00:00+00:00")
    assert not is_missed(slot, slot + HOUR, HOUR)
    assert is_missed(slot, slot + HOUR + dt.timedelta(microseconds=1), HOUR)
    assert not is_missed(slot, slot - MINUTE, HOUR), "a slot ahead is not missed"


def test_slot_after_a_slow_send_skips_what_passed_and_keeps_the_grid() -> None:
    served = at(T0)
    assert iso(slot_after(EVERY_MINUTE, served, served)) == "2024-06-01T12:01:00+00:00"
    assert iso(slot_after(EVERY_MINUTE, served, served + 150 * dt.timedelta(seconds=1))) == (
        "2024-06-01T12:03:00+00:00")
    assert iso(slot_after(EVERY_MINUTE, served, served + 2 * MINUTE)) == "2024-06-01T12:03:00+00:00"
    hourly = cron("0 * * * *")
    assert iso(slot_after(hourly, at("2024-06-01T09:00:00+00:00"), at("2024-06-01T11:10:00+00:00"))) == (
        "2024-06-01T12:00:00+00:00")


def test_upcoming_from_nothing_is_empty() -> None:
    assert upcoming(DAILY_0900, None, 3) == []
    assert len(upcoming(EVERY_MINUTE, at(T0), 0)) == 0
