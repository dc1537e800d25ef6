"""/ready tells the truth: Telegram unreachable makes it 503 with the reason, and it recovers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from testbed.fake_bot_api import FakeBotAPI
from tests.conftest import BotProcess, wait_until
from tests.test_postgres import TcpProxy
from utils.ops.status_snapshot import READY_MARGIN

Spawn = Callable[..., BotProcess]
POLLING_TIMEOUT = 2


def ready(bot: BotProcess) -> tuple[int, str]:
    code, body = bot.get("/ready")
    return code, str(json.loads(body or b"{}").get("reason", ""))


def test_ready_follows_telegram_reachability(fake: FakeBotAPI, spawn: Spawn) -> None:
    proxy = TcpProxy(target_port=fake.port)
    try:
        a = spawn("a", TELEGRAM_API_URL=f"http://127.0.0.1:{proxy.port}/a", POLLING_TIMEOUT=str(POLLING_TIMEOUT))
        a.wait_mode("active")
        wait_until(lambda: ready(a)[0] == 200, 10, message="ready once a getUpdates succeeded")
        t_cut = time.monotonic()
        proxy.cut()
        wait_until(lambda: ready(a)[0] == 503, POLLING_TIMEOUT + READY_MARGIN + 5, message="503 while unreachable")
        went_503 = time.monotonic() - t_cut
        reason = ready(a)[1]
        assert "no successful getUpdates" in reason, reason
        assert went_503 <= POLLING_TIMEOUT + READY_MARGIN + 2, f"{went_503:.1f} s"
        wait_until(lambda: "getUpdates failed" in a.log(), message="the first WARNING")
        t_back = time.monotonic()
        proxy.restore()
        wait_until(lambda: ready(a)[0] == 200, 10, message="ready again")
        recovered = time.monotonic() - t_back
        print(f"\n/ready: 503 {went_503:.1f} s after the cut, 200 again {recovered:.1f} s after the restore")
        assert recovered <= 5.0
        log = a.log()
        assert log.count("getUpdates failed") == 1 and "works again" in log, log
    finally:
        proxy.stop()


def test_ready_is_503_before_any_getupdates_succeeded(spawn: Spawn) -> None:
    from tests.conftest import free_port

    a = spawn("a", TELEGRAM_API_URL=f"http://127.0.0.1:{free_port()}/nobody")
    a.wait_mode("active")
    code, reason = ready(a)
    assert code == 503 and "no getUpdates has succeeded" in reason, reason
    wait_until(lambda: "getUpdates failed" in a.log(), message="a WARNING with the error's text")
    assert "Connect" in a.log() or "refused" in a.log().lower()
