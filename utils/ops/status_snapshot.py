"""The daemon's status as one typed value, and the pure functions that present it.

What ``/health``, ``/ready``, ``/metrics``, the ``/status`` command and ``python main.py status``
say is one :class:`StatusSnapshot` (made by :class:`utils.ops.status_report.StatusReporter`), so
they cannot disagree, and each reads typed attributes rather than the keys of a dict. The
snapshot shows what fits the mode: :class:`PollingFacts` in polling mode, :class:`WebhookFacts`
(the receiver's counters, getWebhookInfo as last fetched) in webhook mode.

Pure and light: no I/O, no aiogram (``python main.py status`` renders its holder line here too),
so every rendering is tested in milliseconds from a hand-made snapshot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from utils.base.histogram import DurationHistogram
from utils.locking.backend import HolderInfo
from utils.locking.controller import Mode
from utils.updates.stats import Count, Section

if TYPE_CHECKING:
    from utils.updates.webhook import ReceiverStats

#: /ready in polling mode: a successful getUpdates within POLLING_TIMEOUT plus this, or not ready.
READY_MARGIN = 5.0
#: What /health's ``autoposter.state`` says without CHANNEL_ID.
AUTOPOSTER_OFF = "off (no CHANNEL_ID)"


@dataclass(frozen=True)
class Unknown:
    """A fact the database did not give in time (or at all): why, in a word (the error's type)."""

    reason: str


@dataclass(frozen=True)
class Term:
    """This instance and its leadership term (the controller's snapshot)."""

    mode: Mode
    instance_id: str
    pid: int
    host: str
    uptime_s: float
    mode_since: float  # wall clock
    epoch: int
    handovers: int  # times this instance took over from an earlier leader
    passive_reason: str | None  # None while active

    @classmethod
    def from_controller(cls, snapshot: Mapping[str, Any]) -> Term:
        return cls(**{**snapshot, "mode": Mode(snapshot["mode"])})


@dataclass(frozen=True)
class LockFacts:
    backend: str
    holder: HolderInfo | None  # the backend's view (cached if it cannot answer now)
    fenced_holders: int


@dataclass(frozen=True)
class Histogram:
    """A fixed-bucket histogram as read: cumulative ``(upper bound, count)`` pairs, sum, count."""

    buckets: tuple[tuple[float, int], ...]
    total: float
    count: int

    @classmethod
    def of(cls, live: DurationHistogram) -> Histogram:
        return cls(tuple(live.cumulative()), live.total, live.count)


@dataclass(frozen=True)
class PollingFacts:
    """Polling mode: the getUpdates loop."""

    active: bool  # a getUpdates loop runs in this instance now
    seconds_since_ok: float | None  # since the last successful getUpdates
    last_ok_at: float | None  # the same, as Unix time
    errors: tuple[tuple[str, int], ...]  # failed getUpdates by kind
    failed_attempts: int | None  # of the outage going on now, None when getUpdates works


@dataclass(frozen=True)
class WebhookFacts:
    """Webhook mode: this replica's receiver, and on the leader Telegram's view of the webhook."""

    received: ReceiverStats  # a copy: deliveries answered by outcome, and the inbox error if any
    info: Mapping[str, Any] | None  # getWebhookInfo as last fetched (the leader's; None elsewhere)
    ready: tuple[bool, str]  # the receiver's answer: can it store deliveries?


Delivery = PollingFacts | WebhookFacts


@dataclass(frozen=True)
class UpdateCounts:
    """The pipeline's counters (declared once: :data:`utils.updates.stats.COUNTS`) and its histogram."""

    counts: tuple[tuple[Count, int], ...]
    handler_seconds: Histogram

    def __getitem__(self, count: Count) -> int:
        return dict(self.counts)[count]

    def section(self, section: Section) -> dict[str, int]:
        """The counts /health shows in *section*, by their /health keys."""
        return {count.health: value for count, value in self.counts if count.section == section}


@dataclass(frozen=True)
class InboxDepth:
    waiting: int  # rows not yet done, stored by any replica
    oldest_age_s: float | None  # None when none waits


@dataclass(frozen=True)
class InboxFacts:
    """The shared inbox, looked up (bounded) when the snapshot was taken."""

    depth: InboxDepth | Unknown
    set_aside: int | Unknown  # poison updates held now (python main.py inbox)


@dataclass(frozen=True)
class AutoposterFacts:
    state: str  # running | standby
    paused: bool | Unknown  # the pause flag, from the database
    posts_sent: int

    def describe(self) -> str:
        if self.paused is True:
            return "paused"
        if isinstance(self.paused, Unknown):
            return f"{self.state} (pause flag unknown: {self.paused.reason})"
        return self.state


@dataclass(frozen=True)
class SendFacts:
    """Sends into chats under Telegram's flood limits (utils/sending)."""

    waiting: int
    rate_limited: int  # 429s received
    waited: Histogram


@dataclass(frozen=True)
class StatusSnapshot:
    term: Term
    lock: LockFacts
    delivery: Delivery
    updates: UpdateCounts
    inbox: InboxFacts
    autoposter: AutoposterFacts | None  # None: off (no CHANNEL_ID)
    sends: SendFacts


# -- presenting ------------------------------------------------------------------------------


def holder_json(holder: HolderInfo | None) -> dict[str, object] | None:
    """The holder as /health's ``lock.holder`` and ``python main.py status`` print it."""
    return holder.as_dict() if holder is not None else None


def readiness(term: Term, delivery: Delivery, polling_timeout: float) -> tuple[bool, str]:
    """/ready: in polling mode, ready only while active with a successful getUpdates within
    *polling_timeout* + :data:`READY_MARGIN`.

    Webhook mode: ready on every replica that can store deliveries (passive ones too: a balancer
    should send updates to any of them)."""
    if isinstance(delivery, WebhookFacts):
        return delivery.ready
    if term.mode is not Mode.ACTIVE:
        return False, f"{term.mode.value}: {term.passive_reason}"
    since = delivery.seconds_since_ok
    if not delivery.active:
        return False, "active but not polling"
    if since is None:
        return False, "active, but no getUpdates has succeeded yet"
    if since > polling_timeout + READY_MARGIN:
        why = f" ({delivery.failed_attempts} failed attempts)" if delivery.failed_attempts else ""
        return False, f"active, but no successful getUpdates for {since:.0f} s{why}"
    return True, "active and polling"


def health_json(snapshot: StatusSnapshot) -> dict[str, Any]:
    """The /health body (keys described in docs/operations.md). ``polling`` only in polling mode,
    ``updates.webhook`` only in webhook mode."""
    term = dataclasses.asdict(snapshot.term) | {"mode": snapshot.term.mode.value}
    delivery = snapshot.delivery
    counts = snapshot.updates
    polling: dict[str, Any] = {}
    webhook: dict[str, Any] = {}
    if isinstance(delivery, PollingFacts):
        polling = {"polling": {"active": delivery.active, "seconds_since_ok": delivery.seconds_since_ok,
                               **counts.section("polling"), "errors": dict(delivery.errors)}}
    else:
        webhook = {"webhook": {**dataclasses.asdict(delivery.received),
                               "info": dict(delivery.info) if delivery.info is not None else None}}
    depth, set_aside = snapshot.inbox.depth, snapshot.inbox.set_aside
    return {
        "status": "ok",
        **term,
        "lock": {
            "backend": snapshot.lock.backend,
            "holder": holder_json(snapshot.lock.holder),
            "fenced_holders": snapshot.lock.fenced_holders,
        },
        **polling,
        "updates": {
            **counts.section("updates"),
            "delivery": "polling" if isinstance(delivery, PollingFacts) else "webhook",
            "inbox_waiting": depth.waiting if isinstance(depth, InboxDepth) else None,
            "inbox_oldest_age_s": depth.oldest_age_s if isinstance(depth, InboxDepth) else None,
            **({"inbox_error": depth.reason} if isinstance(depth, Unknown) else {}),
            "set_aside": set_aside.reason if isinstance(set_aside, Unknown) else set_aside,
            **webhook,
        },
        "autoposter": {"state": snapshot.autoposter.describe() if snapshot.autoposter else AUTOPOSTER_OFF},
        "sends": {"waiting": snapshot.sends.waiting, "rate_limited": snapshot.sends.rate_limited},
    }
