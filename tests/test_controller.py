"""The leadership controller in-process: a fake lock mechanism over a real SQLite state store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import utils.locking.controller as controller_module
from utils.base.lease import Lease, LeaseLost
from utils.locking.backend import Claim, Grant, HolderInfo, LockBackend, LockMechanism
from utils.locking.controller import LeadershipController, Mode
from utils.state.database import DatabaseTarget
from utils.state.store import StateStore


class FakeMechanism(LockMechanism):
    name = "fake"

    def __init__(self) -> None:
        self.free = asyncio.Event()
        self.held = False
        self.ok = True
        self.releases: list[bool] = []  # the clean flag of each release (see RecordingBackend)

    async def acquire(self, claim: Claim) -> Grant:
        await self.free.wait()
        self.held = True
        await claim.locked()
        return Grant(await claim.take_epoch())

    async def heartbeat(self, epoch: int) -> bool:
        return self.held and self.ok

    async def release(self) -> None:
        self.held = False

    async def holder(self, *, probe: bool = False) -> HolderInfo | None:
        return None

    async def fence(self, holder: HolderInfo) -> str | None:
        return "not in this test"


class RecordingBackend(LockBackend):
    """The real policy; each release's clean flag is recorded on the fake mechanism."""

    def __init__(self, mechanism: FakeMechanism, store: StateStore) -> None:
        super().__init__(mechanism, store, instance_id="me", stale_seconds=3.0, takeover=True)
        self.fake = mechanism

    async def release(self, *, clean: bool) -> None:
        self.fake.releases.append(clean)
        await super().release(clean=clean)


class Role:
    def __init__(self, name: str, events: list[str], *, fail: bool = False) -> None:
        self.name = name
        self.events = events
        self.fail = fail
        self.lease: Lease | None = None
        self.gate_open_at_stop: bool | None = None
        self.controller: LeadershipController | None = None
        self.step_down_on_start = False

    async def start(self, lease: Lease) -> None:
        self.events.append(f"start {self.name}")
        self.lease = lease
        if self.fail:
            raise RuntimeError("role cannot start")
        if self.step_down_on_start and self.controller is not None:
            self.controller.step_down("found the lease gone while starting")

    async def stop(self, *, voluntary: bool) -> None:
        self.events.append(f"stop {self.name} voluntary={voluntary}")
        assert self.controller is not None
        try:
            await self.controller.gate.check()
            self.gate_open_at_stop = True
        except LeaseLost:
            self.gate_open_at_stop = False


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    s = StateStore.create(DatabaseTarget.parse(None, tmp_path), 1, "me")
    await s.open()
    yield s
    await s.close()


@pytest.fixture(autouse=True)
def no_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(controller_module, "PAUSE_AFTER_LOSS", 0.01)
    monkeypatch.setattr(controller_module, "ANNOUNCE_AFTER", 0.01)


def make(store: StateStore, *roles: Role) -> tuple[LeadershipController, FakeMechanism]:
    mechanism = FakeMechanism()
    controller = LeadershipController(RecordingBackend(mechanism, store), list(roles), instance_id="me",
                                      role_stop_timeout=5)
    for role in roles:
        role.controller = controller
    return controller, mechanism


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


async def test_stop_while_acquiring_starts_nothing(store: StateStore) -> None:
    events: list[str] = []
    controller, backend = make(store, Role("polling", events))
    task = asyncio.create_task(controller.run())
    await wait_for(lambda: "waiting" in controller.passive_reason or "lock" in controller.passive_reason)
    controller.request_stop()
    await asyncio.wait_for(task, 5)
    assert events == [] and controller.mode is Mode.STOPPING and not backend.held


async def test_roles_start_in_order_stop_in_reverse_with_the_gate_still_open(store: StateStore) -> None:
    events: list[str] = []
    polling, poster = Role("polling", events), Role("autoposter", events)
    controller, backend = make(store, polling, poster)
    backend.free.set()
    task = asyncio.create_task(controller.run())
    await wait_for(lambda: controller.is_active)
    assert controller.gate.lease is polling.lease and polling.lease is not None
    assert polling.lease.epoch == 1
    controller.request_stop()
    await asyncio.wait_for(task, 5)
    assert events == ["start polling", "start autoposter", "stop autoposter voluntary=True",
                      "stop polling voluntary=True"]
    assert polling.gate_open_at_stop is True, "draining work can still call Telegram"
    assert controller.gate.lease is None and polling.lease.ended
    assert backend.releases == [True]


async def test_role_start_failure_steps_down_releases_and_contends_again(store: StateStore) -> None:
    events: list[str] = []
    broken = Role("polling", events, fail=True)
    controller, backend = make(store, broken)
    backend.free.set()
    task = asyncio.create_task(controller.run())
    await wait_for(lambda: events.count("start polling") >= 2)  # it tried again after stepping down
    assert backend.releases[0] is False, "an unclean release: the next leader must not trust it"
    # The second failure's step-down says so once its release is done (a few awaits after the start).
    await wait_for(lambda: "start failed" in controller.passive_reason)
    controller.request_stop()
    await asyncio.wait_for(task, 5)


async def test_step_down_during_start_is_honoured(store: StateStore) -> None:
    events: list[str] = []
    role = Role("polling", events)
    role.step_down_on_start = True
    controller, backend = make(store, role)
    backend.free.set()
    task = asyncio.create_task(controller.run())
    await wait_for(lambda: "stop polling voluntary=False" in events)
    await wait_for(lambda: "found the lease gone" in controller.passive_reason)
    controller.request_stop()
    await asyncio.wait_for(task, 5)


async def test_lost_lease_stops_roles_involuntarily_and_closes_the_gate(store: StateStore) -> None:
    events: list[str] = []
    role = Role("polling", events)
    controller, backend = make(store, role)
    backend.free.set()
    task = asyncio.create_task(controller.run())
    await wait_for(lambda: controller.is_active)
    assert role.lease is not None
    backend.ok = False  # the next heartbeat finds the lock or the epoch gone
    await wait_for(lambda: "stop polling voluntary=False" in events)
    assert role.gate_open_at_stop is False, "a lost lease lets nothing through"
    assert role.lease.lost is not None
    backend.ok = True
    controller.request_stop()
    await asyncio.wait_for(task, 5)
    assert backend.releases[0] is False


async def test_handovers_count_takeovers_not_the_first_term(store: StateStore) -> None:
    """A bot's very first activation hands nothing over (/health "handovers": 0); the next does."""
    events: list[str] = []
    first, first_backend = make(store, Role("polling", events))
    first_backend.free.set()
    task = asyncio.create_task(first.run())
    await wait_for(lambda: first.is_active)
    assert first.snapshot()["handovers"] == 0 and first.epoch == 1
    first.request_stop()
    await asyncio.wait_for(task, 5)
    second, second_backend = make(store, Role("polling", events))
    second_backend.free.set()
    task = asyncio.create_task(second.run())
    await wait_for(lambda: second.is_active)
    assert second.snapshot()["handovers"] == 1 and second.epoch == 2
    second.request_stop()
    await asyncio.wait_for(task, 5)
