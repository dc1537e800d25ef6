"""Stand-ins for the parts a :class:`StatusReporter` reads, for in-process tests of the status
snapshot, /health's JSON, /ready and /metrics (tests/test_status_snapshot.py, tests/test_metrics.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from utils.base.lookup import HEALTH_LOOKUP_TIMEOUT
from utils.locking.backend import HolderInfo
from utils.locking.controller import Mode
from utils.ops.status_report import StatusReporter
from utils.sending.flood import SendLimits
from utils.sending.limiter import FloodLimiter
from utils.updates.outage import OutageLog
from utils.updates.stats import UpdateStats
from utils.updates.webhook import ReceiverStats

#: The bound of the database lookups in these tests: the daemon's.
LOOKUP_TIMEOUT = HEALTH_LOOKUP_TIMEOUT
HOLDER = HolderInfo(instance_id="abc123", host="box", pid=4242, epoch=7, since=1_700_000_000.0,
                    heartbeat_age=0.5)


@dataclass
class FakeController:
    """The controller's snapshot as ``LeadershipController.snapshot()`` gives it, and its holder."""

    mode: Mode = Mode.PASSIVE
    epoch: int = 0
    handovers: int = 0
    passive_reason: str = "starting"
    holder_info: HolderInfo | None = None

    def snapshot(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "instance_id": "abc123", "pid": 4242, "host": "box", "uptime_s": 90.0,
                "mode_since": 1_700_000_000.0, "epoch": self.epoch, "handovers": self.handovers,
                "passive_reason": None if self.mode is Mode.ACTIVE else self.passive_reason}

    async def holder(self, *, probe: bool = False) -> HolderInfo | None:
        return self.holder_info


@dataclass
class FakeBackend:
    name: str = "file"
    fenced_holders: int = 0


@dataclass
class FakeAutoposter:
    posts_sent: int = 0
    state: str = "running"
    paused: bool | None = False  # None: the database does not answer

    async def is_paused(self) -> bool:
        if self.paused is None:
            await asyncio.Event().wait()
        assert self.paused is not None
        return self.paused


@dataclass
class FakePolling:
    outage: OutageLog = field(default_factory=lambda: OutageLog("getUpdates"))


@dataclass
class FakeWebhookRole:
    info: dict[str, Any] | None = None


@dataclass
class FakeReceiver:
    stats: ReceiverStats = field(default_factory=ReceiverStats)

    def ready(self) -> tuple[bool, str]:
        if self.stats.inbox_error is not None:
            return False, f"webhook: the inbox cannot be written ({self.stats.inbox_error})"
        return True, "accepting webhook deliveries"


class FakeInbox:
    """The store's lookups: *depth* None hangs (a stopped database), an exception is raised."""

    def __init__(self, depth: tuple[int, float | None] | Exception | None = (0, None),
                 set_aside: int | Exception | None = 0) -> None:
        self._depth = depth
        self._set_aside = set_aside

    async def depth(self) -> tuple[int, float | None]:
        answer = self._depth
        if answer is None:
            await asyncio.Event().wait()  # hangs, as a stopped database's connect can
        if isinstance(answer, Exception):
            raise answer
        assert answer is not None
        return answer

    async def set_aside(self) -> int:
        answer = self._set_aside
        if answer is None:
            await asyncio.Event().wait()
        if isinstance(answer, Exception):
            raise answer
        assert answer is not None
        return answer


def busy_stats() -> UpdateStats:
    stats = UpdateStats(polling=True, conflicts=2, fetched=10, handled=9, handler_errors=1,
                        duplicates=3, redelivered=1, inbox_waiting=1)
    stats.count_error("conflict")
    stats.count_error("network")
    stats.count_error("network")
    for seconds in (0.005, 0.2, 0.2, 3.0, 100.0):
        stats.handler_seconds.observe(seconds)
    return stats


def make_reporter(
    *,
    controller: FakeController | None = None,
    backend: FakeBackend | None = None,
    stats: UpdateStats | None = None,
    inbox: FakeInbox | None = None,
    polling: FakePolling | None = None,
    sends: FloodLimiter | None = None,
    autoposter: FakeAutoposter | None = None,
    webhook: FakeWebhookRole | None = None,
    receiver: FakeReceiver | None = None,
    polling_timeout: float = 25.0,
) -> StatusReporter:
    inbox = inbox or FakeInbox()
    return StatusReporter(
        controller=controller or FakeController(), backend=backend or FakeBackend(),
        stats=stats if stats is not None else UpdateStats(),
        inbox_depth=inbox.depth, set_aside=inbox.set_aside, polling=polling or FakePolling(),
        sends=sends or FloodLimiter(SendLimits()), polling_timeout=polling_timeout,
        autoposter=autoposter, webhook=webhook, receiver=receiver, lookup_timeout=LOOKUP_TIMEOUT,
    )
