"""ShutdownManager: stages LIFO, once, bounded, every error collected; signals through real processes."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType

import pytest

from tests.conftest import ROOT
from utils.base.exit_codes import EXIT_FORCED
from utils.ops.shutdown import LINGERING_THREADS_GRACE, ShutdownManager

# -- stages, in-process ----------------------------------------------------------------------


async def test_lifo_sync_and_async_and_failures_collected() -> None:
    order: list[str] = []
    sd = ShutdownManager(deadline=5, callback_timeout=1)

    async def slow() -> None:
        await asyncio.sleep(10)

    def broken() -> None:
        order.append("broken")
        raise RuntimeError("boom")

    async def first() -> None:
        order.append("first")

    sd.register("first", first)
    sd.register("slow", slow, timeout=0.1)
    sd.register("broken", broken)
    sd.register("last", lambda: order.append("last"))
    assert sd.stages == ["last", "broken", "slow", "first"]
    errors = await sd.run()
    assert order == ["last", "broken", "first"]
    assert [(name, type(exc)) for name, exc in errors] == [("broken", RuntimeError), ("slow", TimeoutError)]
    assert await sd.run() is errors, "runs once"
    assert order == ["last", "broken", "first"]


async def test_enter_registers_the_teardown_only_once_opened() -> None:
    """A start-up that fails at its third resource unwinds the two it made, in reverse, not the third."""
    made: list[str] = []
    sd = ShutdownManager(deadline=5, callback_timeout=1)

    async def open_async() -> None:
        made.append("open b")

    def refuse() -> None:
        raise OSError("in use")

    await sd.enter("close a", lambda: made.append("open a"), lambda: made.append("close a"))
    await sd.enter("close b", open_async, lambda: made.append("close b"))
    with pytest.raises(OSError, match="in use"):
        await sd.enter("close c", refuse, lambda: made.append("close c"))
    assert sd.stages == ["close b", "close a"]
    assert await sd.run() == []
    assert made == ["open a", "open b", "close b", "close a"]


async def test_cancelled_error_in_a_stage_does_not_skip_the_rest() -> None:
    ran: list[str] = []
    sd = ShutdownManager(deadline=5, callback_timeout=1)

    async def cancelled_inside() -> None:
        ran.append("async cancelled")
        raise asyncio.CancelledError

    def cancelled_sync() -> None:
        ran.append("sync cancelled")
        raise asyncio.CancelledError

    class Odd(BaseException):
        pass

    def odd() -> None:
        ran.append("odd")
        raise Odd

    sd.register("first", lambda: ran.append("first"))
    sd.register("odd", odd)
    sd.register("async cancelled", cancelled_inside)
    sd.register("sync cancelled", cancelled_sync)
    errors = await sd.run()
    assert ran == ["sync cancelled", "async cancelled", "odd", "first"]
    assert [(name, type(exc)) for name, exc in errors] == [
        ("sync cancelled", asyncio.CancelledError),
        ("async cancelled", asyncio.CancelledError),
        ("odd", Odd),
    ]


async def test_keyboard_interrupt_and_system_exit_pass_through() -> None:
    for exc_type in (KeyboardInterrupt, SystemExit):
        sd = ShutdownManager()

        def stop(exc_type: type[BaseException] = exc_type) -> None:
            raise exc_type

        sd.register("stop", stop)
        with pytest.raises(exc_type):
            await sd.run()


async def test_cancelling_run_still_runs_every_stage_then_reraises() -> None:
    ran: list[str] = []
    entered = asyncio.Event()
    sd = ShutdownManager(deadline=10, callback_timeout=10)

    async def hang() -> None:
        entered.set()
        await asyncio.sleep(30)

    sd.register("after", lambda: ran.append("after"))
    sd.register("hang", hang)
    runner = asyncio.create_task(sd.run())
    await entered.wait()
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    assert ran == ["after"]
    assert [(name, type(exc)) for name, exc in sd.errors] == [("hang", asyncio.CancelledError)]


async def test_concurrent_run_waits_for_the_first() -> None:
    sd = ShutdownManager()
    entered, release = asyncio.Event(), asyncio.Event()

    async def gate() -> None:
        entered.set()
        await release.wait()
        raise RuntimeError("gate failed")

    sd.register("gate", gate)
    first = asyncio.create_task(sd.run())
    await entered.wait()
    errors_seen_by_second: list[int] = []

    async def second_call() -> list[tuple[str, BaseException]]:
        errors = await sd.run()
        errors_seen_by_second.append(len(errors))
        return errors

    second = asyncio.create_task(second_call())
    release.set()
    assert await first is await second
    assert errors_seen_by_second == [1], "the second call returned only once the first had finished"


async def test_overall_deadline() -> None:
    sd = ShutdownManager(deadline=0.3, callback_timeout=5)
    ran: list[str] = []
    sd.register("never", lambda: ran.append("never"))
    sd.register("hog", lambda: asyncio.sleep(5))
    started = time.monotonic()
    errors = await sd.run()
    assert time.monotonic() - started < 3
    assert ran == []
    assert {name for name, _ in errors} == {"hog", "never"}


async def test_previous_signal_handlers_restored_at_the_end() -> None:
    def previous(_signum: int, _frame: FrameType | None) -> None:
        pass

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, previous)
    try:
        sd = ShutdownManager()
        sd.install_signal_handlers()
        assert signal.getsignal(signal.SIGTERM) is not previous
        await sd.run()
        assert signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGINT) is saved[signal.SIGINT]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# -- signals, through a real process ---------------------------------------------------------

SCRIPT = r"""
import asyncio, logging, signal, sys
sys.path.insert(0, sys.argv[1])
from utils.ops.shutdown import ShutdownManager

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="log %(levelname)s %(message)s")

class RepeatsSeen(logging.Handler):
    # Positive marker: the manager has seen (and logged) the wanted number of repeated signals.
    def __init__(self, wanted):
        super().__init__()
        self.wanted, self.seen = wanted, 0
        self.event = asyncio.Event()
    def emit(self, record):
        if "again while stopping" in record.getMessage():
            self.seen += 1
            if self.seen == self.wanted:
                self.event.set()

async def main():
    repeats = int(sys.argv[2])  # the drain runs until this many repeated signals (0: forever)
    seen = RepeatsSeen(repeats)
    logging.getLogger("solobot.shutdown").setLevel(logging.DEBUG)
    logging.getLogger("solobot.shutdown").addHandler(seen)
    sd = ShutdownManager(deadline=60, callback_timeout=60)
    sd.install_signal_handlers()
    sd.register("a", lambda: print("callback a", flush=True))

    async def drain():
        print("drain started", flush=True)
        if repeats:
            await seen.event.wait()  # a drain still running when the repeated signals arrive
        else:
            await asyncio.sleep(60)
        print("drain finished", flush=True)

    sd.register("drain", drain)
    print("ready", flush=True)
    print("reason:", await sd.wait(), flush=True)
    errors = await sd.run()
    print("handlers restored:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
    print("done, errors:", len(errors), flush=True)

asyncio.run(main())
"""


class Script:
    """The script above as a process; its output lines are read by a thread so waits are bounded."""

    def __init__(self, drain: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(ROOT), drain],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.expect("ready")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def expect(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} in {timeout} s: {self.lines}") from None
            if line is None:
                raise AssertionError(f"exited before a line with {text!r}: {self.lines}")
            self.lines.append(line)
            if text in line:
                return line

    def finish(self, timeout: float = 20.0) -> int:
        code = self.proc.wait(timeout)
        while (line := self._queue.get(timeout=timeout)) is not None:
            self.lines.append(line)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def script() -> Iterator[list[Script]]:
    started: list[Script] = []
    yield started
    for s in started:
        s.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_runs_stages_restores_handlers_and_exits_zero(script: list[Script], sig: signal.Signals) -> None:
    s = Script("1")
    script.append(s)
    s.proc.send_signal(sig)
    s.expect("drain started")
    s.proc.send_signal(signal.SIGTERM)  # the repeat lets the drain finish
    assert s.finish() == 0
    text = "\n".join(s.lines)
    assert f"reason: received {sig.name}" in text
    assert text.index("drain finished") < text.index("callback a") < text.index("done, errors: 0")
    assert "handlers restored: True" in text


def test_second_sigterm_does_not_skip_the_drain(script: list[Script]) -> None:
    s = Script("2")
    script.append(s)
    s.proc.send_signal(signal.SIGTERM)
    s.expect("drain started")
    s.proc.send_signal(signal.SIGTERM)
    s.expect("received SIGTERM again while stopping")
    s.proc.send_signal(signal.SIGTERM)
    s.expect("drain finished")
    assert s.finish() == 0
    text = "\n".join(s.lines)
    assert text.index("drain finished") < text.index("callback a") < text.index("done, errors: 0")
    repeats = [line for line in s.lines if "received SIGTERM again while stopping" in line]
    assert [line.split()[1] for line in repeats] == ["WARNING", "DEBUG"], "logged once, then quietly"


def test_repeated_sigint_forces_exit(script: list[Script]) -> None:
    s = Script("0")
    script.append(s)
    s.proc.send_signal(signal.SIGTERM)
    s.expect("drain started")
    s.proc.send_signal(signal.SIGINT)  # the first SIGINT, after a SIGTERM: still graceful
    s.expect("received SIGINT again while stopping; ignored")
    started = time.monotonic()
    s.proc.send_signal(signal.SIGINT)  # repeated: forced
    assert s.finish() == EXIT_FORCED
    assert time.monotonic() - started < 10
    assert "drain finished" not in "\n".join(s.lines)


#: A thread the exit would wait for: stuck (the first) or about to end (the second).
LINGERING_SCRIPT = """
import sys, threading, time
from utils.ops.shutdown import exit_after_stop
stuck = sys.argv[1] == "stuck"
threading.Thread(target=threading.Event().wait if stuck else lambda: time.sleep(0.2),
                 name="sqlite-worker").start()
exit_after_stop(3)
"""


@pytest.mark.parametrize("case", ["stuck", "ending"])
def test_exit_after_stop_does_not_wait_for_a_stuck_thread(case: str) -> None:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", LINGERING_SCRIPT, case], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    took = time.monotonic() - started
    assert done.returncode == 3, done.stderr
    if case == "stuck":  # named, and the exit comes after the grace, not never
        assert "exiting without waiting for 1 thread(s) still running after the stop: sqlite-worker" in done.stderr
        assert took >= LINGERING_THREADS_GRACE
    else:  # a thread that ends within the grace is waited for, quietly
        assert done.stderr == ""
