"""ShutdownManager: LIFO, once, bounded, errors collected; signals through a real process."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import pytest

from utils.ops.shutdown import EXIT_FORCED, ShutdownManager


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
    errors = await sd.run()
    assert order == ["last", "broken", "first"]
    assert [name for name, _ in errors] == ["broken", "slow"]
    assert await sd.run() is errors, "runs once"
    assert order == ["last", "broken", "first"]


async def test_overall_deadline() -> None:
    sd = ShutdownManager(deadline=0.3, callback_timeout=5)
    ran: list[str] = []
    sd.register("never", lambda: ran.append("never"))
    sd.register("hog", lambda: asyncio.sleep(5))
    started = time.monotonic()
    errors = await sd.run()
    assert time.monotonic() - started < 1
    assert ran == []
    assert {name for name, _ in errors} == {"hog", "never"}


SCRIPT = r"""
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from utils.ops.shutdown import ShutdownManager
async def main():
    sd = ShutdownManager(deadline=30, callback_timeout=30)
    sd.install_signal_handlers()
    sd.register("a", lambda: print("callback a", flush=True))
    sd.register("slow", lambda: asyncio.sleep(float(sys.argv[2])))
    print("ready", flush=True)
    print("reason:", await sd.wait(), flush=True)
    await sd.run()
    print("done", flush=True)
asyncio.run(main())
"""


def run_script(slow: float) -> subprocess.Popen[str]:
    from pathlib import Path
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(Path(__file__).parent.parent), str(slow)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_runs_callbacks_and_exits_zero(sig: signal.Signals) -> None:
    proc = run_script(0)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert f"reason: received {sig.name}" in out and "callback a" in out and "done" in out


def test_second_signal_forces_exit() -> None:
    proc = run_script(30)
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("reason:")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    assert proc.returncode == EXIT_FORCED
    assert time.monotonic() - started < 5
