"""/ready tells the truth: Telegram unreachable makes it 503 with the reason, and it recovers (the
whole daemon in-process, tests/daemon.py)."""

from __future__ import annotations

import json
import time

from testbed.fake_bot_api import FakeBotAPI
from tests.daemon import InProcessDaemon, StartDaemon, in_process, wait_for  # noqa: F401
from tests.test_postgres import TcpProxy
from utils.ops.status_snapshot import READY_MARGIN

POLLING_TIMEOUT = 2


async def ready(bot: InProcessDaemon) -> tuple[int, str]:
    code, body = await bot.get("/ready")
    return code, str(json.loads(body or b"{}").get("reason", ""))


async def ready_code(bot: InProcessDaemon, code: int) -> bool:
    return (await ready(bot))[0] == code


async def test_ready_follows_telegram_reachability(fake: FakeBotAPI, in_process: StartDaemon) -> None:  # noqa: F811
    proxy = TcpProxy(target_port=fake.port)
    try:
        a = await in_process("a", TELEGRAM_API_URL=f"http://127.0.0.1:{proxy.port}/a",
                             POLLING_TIMEOUT=str(POLLING_TIMEOUT))
        await a.wait_mode("active")
        await wait_for(lambda: ready_code(a, 200), 10, message="ready once a getUpdates succeeded")
        t_cut = time.monotonic()
        proxy.cut()
        await wait_for(lambda: ready_code(a, 503), POLLING_TIMEOUT + READY_MARGIN + 5, message="503 while unreachable")
        went_503 = time.monotonic() - t_cut
        reason = (await ready(a))[1]
        assert "no successful getUpdates" in reason, reason
        assert went_503 <= POLLING_TIMEOUT + READY_MARGIN + 2, f"{went_503:.1f} s"
        await wait_for(lambda: "getUpdates failed" in a.log(), message="the first WARNING")
        t_back = time.monotonic()
        proxy.restore()
        await wait_for(lambda: ready_code(a, 200), 10, message="ready again")
        recovered = time.monotonic() - t_back
        print(f"\n/ready: 503 {went_503:.1f} s after the cut, 200 again {recovered:.1f} s after the restore")
        assert recovered <= 5.0
        log = a.log()
        assert log.count("getUpdates failed") == 1 and "works again" in log, log
    finally:
        proxy.stop()


async def test_ready_is_503_before_any_getupdates_succeeded(in_process: StartDaemon) -> None:  # noqa: F811
    from tests.conftest import free_port

    a = await in_process("a", TELEGRAM_API_URL=f"http://127.0.0.1:{free_port()}/nobody")
    await a.wait_mode("active")
    code, reason = await ready(a)
    assert code == 503 and "no getUpdates has succeeded" in reason, reason
    await wait_for(lambda: "getUpdates failed" in a.log(), message="a WARNING with the error's text")
    assert "Connect" in a.log() or "refused" in a.log().lower()
