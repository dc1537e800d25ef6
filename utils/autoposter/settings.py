"""The autoposter's settings (CHANNEL_ID, POST_*), read and checked by the autoposter's own rules.

Why here and not in :mod:`utils.config`: the core settings are the daemon's (token, lock, state,
modes); the schedule is the autoposter's, checked with its own cron parser
(:mod:`utils.autoposter.schedule`), so the core never imports the autoposter. The daemon's
settings (:mod:`utils.ops.daemon_settings`) read both with one
:class:`~utils.base.env_reader.EnvReader`: every problem of either is still reported at once, with
exit 78, before the heavy imports. Light: the standard library and the pure schedule module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from utils.autoposter.schedule import parse_cron
from utils.base.env_reader import EnvReader

#: ``@channelname`` or a numeric chat id (``-100...`` for a channel).
CHANNEL_RE = re.compile(r"^(@[A-Za-z][A-Za-z0-9_]{3,31}|-100\d{5,15}|-?\d{1,20})$")
CRON_FIELDS = 5
DEFAULT_TIMEZONE = "UTC"
DEFAULT_MISFIRE_GRACE = 3600.0


@dataclass(frozen=True)
class AutoposterSettings:
    """Where and when to post; no ``channel_id``: the autoposter is off."""

    channel_id: str | None = None
    post_cron: str | None = None
    post_interval: float | None = None
    post_timezone: str = DEFAULT_TIMEZONE
    post_misfire_grace: float = DEFAULT_MISFIRE_GRACE


def cron_problem(expr: str) -> str | None:
    """What is wrong with a 5-field cron expression (the autoposter's own parser), or None."""
    if len(expr.split()) != CRON_FIELDS:
        return f"expected 5 fields (minute hour day month weekday), got {expr!r}"
    try:
        parse_cron(expr)
    except ValueError as exc:
        return f"{exc} in {expr!r}"
    return None


def read_autoposter_settings(r: EnvReader) -> AutoposterSettings:
    """CHANNEL_ID and POST_*; problems go to *r* with the others."""
    channel_id = r.text("CHANNEL_ID")
    if channel_id and not CHANNEL_RE.match(channel_id):
        r.problems.append(f"CHANNEL_ID: expected @channelname or a -100... chat id, got {channel_id!r}")
    post_cron = r.text("POST_CRON")
    post_interval: float | None = None
    if r.text("POST_INTERVAL") is not None:
        post_interval = r.seconds("POST_INTERVAL", 0.0, low=0.5, high=366 * 86400.0)
    if post_cron and post_interval is not None:
        r.problems.append("POST_CRON and POST_INTERVAL: set one of them, not both")
    if post_cron:
        problem = cron_problem(post_cron)
        if problem:
            r.problems.append(f"POST_CRON: {problem}")
    post_timezone = r.text("POST_TIMEZONE", DEFAULT_TIMEZONE) or DEFAULT_TIMEZONE
    try:
        ZoneInfo(post_timezone)
    except (ZoneInfoNotFoundError, ValueError):
        r.problems.append(f"POST_TIMEZONE: unknown time zone {post_timezone!r}")
    misfire = r.seconds("POST_MISFIRE_GRACE", DEFAULT_MISFIRE_GRACE, low=1.0, high=30 * 86400.0)
    if channel_id and not post_cron and post_interval is None:
        r.problems.append("CHANNEL_ID: set POST_CRON or POST_INTERVAL to say when to post")
    return AutoposterSettings(channel_id=channel_id, post_cron=post_cron, post_interval=post_interval,
                              post_timezone=post_timezone, post_misfire_grace=misfire)
