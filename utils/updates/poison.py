"""Poison updates, pure: which taken-over update runs how, and which is set aside. No I/O.

A handler that kills its process (a segfault in a C extension, a native abort, the OOM killer)
would otherwise crash-loop the bot: every new leader takes the unfinished update over and dies
with it. The queues people trust answer with a receive count and a dead-letter queue (SQS's
``maxReceiveCount``, Celery's ``reject_on_worker_lost``); counting takeovers alone would set
aside innocent updates that merely waited in the queue, so here only *deaths at which an
update's handler was running* count, and only a death at which it ran *alone* can convict it.

How the evidence is gathered (``utils.updates.recovery`` does the I/O):

* In normal running nothing extra is written (the steady-state cost stays where it is).
* A leader that takes over from a predecessor that died (no clean release) *tracks* the updates
  it recovered: each runs under a durable "started" record written before its handler and
  cleared (the update marked done) right after it returns. At the next takeover after a death,
  an update whose record is still there was running at that death: ``deaths`` + 1, and
  ``alone_deaths`` + 1 if the record said it ran alone.
* An update with ``deaths`` > 0 is a *suspect*: it runs alone (nothing else starts until it is
  over, and it starts only when nothing runs), before anything else of that term.
* It is set aside once ``deaths >= POISON_AFTER`` and at least one of those deaths came while it
  ran alone.

Why an innocent update is never set aside: while it runs alone, no other handler runs in the
process, so a death then was not caused by another update's handler; an innocent handler
returns, the update is marked done before anything else starts, and it is never run again. An
innocent update can collect at most one death with others running (after that it is a suspect
and runs alone), so it never reaches the alone death the verdict needs. What remains are deaths
from outside the handlers while it runs alone (an operator's ``kill -9``, a power loss): it
takes ``POISON_AFTER`` - 1 of them, each in the handler's own short run, to set an update aside.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

#: Deaths an update's handler may be running at before it is set aside (``POISON_AFTER``).
POISON_AFTER_DEFAULT = 3


class Verdict(enum.Enum):
    RUN = "run"  # no evidence against it
    RUN_ALONE = "run alone"  # it was running at a death: a suspect
    SET_ASIDE = "set aside"  # convicted: not run again until an operator says so


def verdict(deaths: int, alone_deaths: int, poison_after: int) -> Verdict:
    """What to do with a taken-over update that was running at *deaths* deaths (*alone_deaths* alone)."""
    if deaths <= 0:
        return Verdict.RUN
    if deaths >= poison_after and alone_deaths >= 1:
        return Verdict.SET_ASIDE
    return Verdict.RUN_ALONE


def update_type(payload: str) -> str:
    """The update's kind (``message``, ``callback_query``, ...) from its stored JSON."""
    try:
        fields = json.loads(payload)
    except ValueError:
        return "unknown"
    if not isinstance(fields, dict):
        return "unknown"
    return next((key for key in fields if key != "update_id"), "unknown")


@dataclass
class RecoveryBook:
    """What one term knows about the updates it took over.

    *died*: the predecessor left without a clean release, so the updates it left are tracked.
    *watermark*: the highest inbox ``seq`` at the takeover; rows at or below it not done are the
    taken-over ones (rows stored later are this term's own, or a replica's new deliveries).
    """

    died: bool
    watermark: int
    suspects: set[int]  # seqs that run alone, not finished yet
    cursor: int = 0  # the backlog is paged in up to here (inclusive)
    loading: bool = True  # the backlog is not all paged in yet
    alone_ended: bool = False  # a suspect ran alone too long: the others run beside it

    def tracks(self, seq: int) -> bool:
        """Does *seq* run under a durable started record?"""
        return seq in self.suspects or (self.died and seq <= self.watermark)

    @property
    def alone_phase(self) -> bool:
        """While a suspect has not finished, one handler at a time (unless that was ended)."""
        return bool(self.suspects) and not self.alone_ended

    def finished(self, seq: int) -> bool:
        """*seq*'s handler is over; True when that ended the alone phase."""
        if seq in self.suspects:
            self.suspects.discard(seq)
            return not self.suspects and not self.alone_ended
        return False

    def will_load(self, seq: int) -> bool:
        """True if the backlog loader has yet to page *seq* in (someone else must not queue it)."""
        return self.loading and self.cursor < seq <= self.watermark

    def paged(self, last_seq: int | None) -> None:
        """A page ended at *last_seq*; None: the backlog is exhausted."""
        if last_seq is None:
            self.loading = False
        else:
            self.cursor = max(self.cursor, last_seq)
