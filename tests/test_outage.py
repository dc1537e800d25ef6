"""How an outage of Telegram is reported: first failure, reminders at growing intervals, recovery."""

from __future__ import annotations

from utils.updates.outage import OutageLog


def test_first_failure_reminders_and_recovery() -> None:
    log = OutageLog("getUpdates")
    lines: list[tuple[float, str]] = []
    t = 0.0
    first = log.failure(t, "ConnectError: refused")
    assert first is not None and "refused" in first
    while t < 2 * 3600 + 900:
        t += 3.0
        line = log.failure(t, "ConnectError: refused")
        if line:
            lines.append((t, line))
    moments = [round(at) for at, _ in lines]
    assert moments[:3] == [60, 300, 900], moments
    assert moments[3:] == [4500, 8100], "then hourly"
    assert "attempts" in lines[0][1] and "60 s" in lines[0][1]
    recovered = log.success(t + 1)
    assert recovered is not None and "works again" in recovered
    assert log.success(t + 2) is None, "one INFO, once"


def test_no_outage_no_lines() -> None:
    log = OutageLog("getUpdates")
    assert log.success(1.0) is None
