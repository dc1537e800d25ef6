"""One WARNING per failure episode: the first failure says what broke, the recovery says it ended.

Why a helper: a retry loop that logs every failure floods the journal (a database down for an hour
is thousands of identical lines), and one that logs none is silent about an outage. The rule the
daemon keeps everywhere (docs/operations.md) is one WARNING when a failure episode starts, quiet
(or DEBUG) while it lasts, one INFO when it ends; hand-written as a flag or a counter in every
loop, it was spelled five ways. Pure (no clock, no logging): the caller
logs, this says when.
"""

from __future__ import annotations


class FailureEpisode:
    """The failures since the last success: ``if episode.failed(): log.warning(...)``, and
    ``if episode.recovered(): log.info(...)`` once it works again."""

    def __init__(self) -> None:
        self.failures = 0

    @property
    def ongoing(self) -> bool:
        """A failure happened and no success since."""
        return self.failures > 0

    def failed(self) -> bool:
        """Count a failure; True when it is the first of an episode (the one to warn about)."""
        self.failures += 1
        return self.failures == 1

    def recovered(self) -> int:
        """End the episode; the failures it had (0 when there was none: nothing to say)."""
        failures, self.failures = self.failures, 0
        return failures
