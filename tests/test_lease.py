"""The lease in-process: a paused clock, verification failing, the deadline passing between check and act."""

from __future__ import annotations

import asyncio

import pytest

from utils.base.lease import Lease, LeaseGate, LeaseLost


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Verifier:
    def __init__(self, answers: list[bool | Exception]) -> None:
        self.answers = answers
        self.calls = 0

    async def __call__(self) -> bool:
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else True
        if isinstance(answer, Exception):
            raise answer
        await asyncio.sleep(0)
        return answer


def make(answers: list[bool | Exception], deadline: float = 1.5) -> tuple[Lease, Clock, Verifier, list[str]]:
    clock, verify = Clock(), Verifier(answers)
    lost: list[str] = []
    lease = Lease(7, verify=verify, renew_deadline=deadline, on_lost=lost.append, clock=clock)
    return lease, clock, verify, lost


async def test_fresh_lease_acts_without_asking() -> None:
    lease, clock, verify, _ = make([])
    clock.now += 1.0
    await lease.ensure()
    assert verify.calls == 0


async def test_after_a_pause_it_verifies_before_acting() -> None:
    lease, clock, verify, _ = make([True])
    clock.now += 60.0  # SIGSTOP, a frozen VM: the clock jumped
    await lease.ensure()
    assert verify.calls == 1 and lease.fresh()


async def test_after_a_pause_a_failed_verification_steps_down() -> None:
    lease, clock, verify, lost = make([False])
    clock.now += 60.0
    with pytest.raises(LeaseLost):
        await lease.ensure()
    assert lost == ["fenced: a newer leader holds the lock"]
    with pytest.raises(LeaseLost):
        await lease.ensure()
    assert verify.calls == 1, "a lost lease never verifies again"


async def test_verification_error_loses_the_lease() -> None:
    lease, clock, _, lost = make([ConnectionError("server closed the connection")])
    clock.now += 5
    with pytest.raises(LeaseLost):
        await lease.ensure()
    assert "ConnectionError" in lost[0]


async def test_deadline_passing_during_verification_is_not_a_proof() -> None:
    clock = Clock()

    async def slow_verify() -> bool:
        clock.now += 2.0  # the answer came after the deadline: it proves nothing for now
        return True

    lease = Lease(1, verify=slow_verify, renew_deadline=1.5, clock=clock)
    clock.now += 10
    with pytest.raises(LeaseLost):
        await lease.ensure()


async def test_concurrent_callers_share_one_verification() -> None:
    lease, clock, verify, _ = make([True])
    clock.now += 10
    await asyncio.gather(*(lease.ensure() for _ in range(20)))
    assert verify.calls == 1


async def test_ended_term_refuses_everything() -> None:
    lease, _, verify, lost = make([])
    lease.end()
    with pytest.raises(LeaseLost):
        await lease.ensure()
    assert verify.calls == 0 and lost == []


async def test_gate_refuses_without_a_lease_and_passes_with_one() -> None:
    gate = LeaseGate()
    sent: list[str] = []

    async def send(method: str) -> None:
        await gate.check()  # what the session middleware and the pre-write hook do
        sent.append(method)

    with pytest.raises(LeaseLost):
        await send("getUpdates")
    lease, clock, _, _ = make([False])
    gate.lease = lease
    await send("getUpdates")
    clock.now += 30  # paused between the last check and this request
    with pytest.raises(LeaseLost):
        await send("getUpdates")
    assert sent == ["getUpdates"]
