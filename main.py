"""solobot: a Telegram bot daemon that is never two.

    python main.py            run the bot (active if it gets the lock, else a quiet standby)
    python main.py status     print who is active for the configured backend; exit 0 if an
                              active holder exists, 3 if none, 4 if it cannot tell (the
                              database is unreachable or does not answer; one line says why)
    python main.py --help     this text
    python main.py inbox      list the updates set aside as poison (their handler was running
                              at POISON_AFTER deaths of the process); `inbox retry ID` puts one
                              back, `inbox drop ID` marks it done (exit 3: ID is not set aside)

Exit codes: 0 clean stop, 1 runtime failure (e.g. health port in use), 2 usage, 3 status: no
active holder (inbox: no such update set aside), 4 status or inbox: cannot tell (database
unreachable), 78 configuration error (also an
unreadable .env line or a placeholder token), 130 forced by a repeated SIGINT.
"""

from __future__ import annotations

import sys

from utils.ops.early_stop import EarlyStop

# First, and only when run as a program (importing main installs nothing): a container's PID 1
# must honour SIGTERM from its first instruction (utils/ops/early_stop.py).
EARLY_STOP = EarlyStop.install() if __name__ == "__main__" else None

from utils.ops.bootstrap import prepare  # noqa: E402 - after the signal handlers, still light

# Before anything heavy: a bad configuration must exit 78 without paying for aiogram's imports.
PREPARED = prepare(sys.argv, __doc__ or "") if __name__ == "__main__" else None
if isinstance(PREPARED, int):
    sys.exit(PREPARED)

import asyncio  # noqa: E402 - deliberately after the bootstrap above
import gc  # noqa: E402
import logging  # noqa: E402

from utils.base.exit_codes import EXIT_CONFIG  # noqa: E402
from utils.ops.bot_module import BotModuleError  # noqa: E402
from utils.ops.daemon_config import DaemonConfig  # noqa: E402
from utils.ops.daemon_settings import DaemonSettings  # noqa: E402
from utils.ops.server import Server, serve_with_signals  # noqa: E402
from utils.ops.shutdown import exit_after_stop  # noqa: E402

log = logging.getLogger("solobot")


def run(settings: DaemonSettings, early: EarlyStop | None = None) -> int:
    """Load the configuration (the bot module), then serve until a signal; the exit code."""
    try:
        config = DaemonConfig.load(settings)
    except BotModuleError as exc:  # the bot module is unusable: a configuration error
        log.error("%s", exc)
        return EXIT_CONFIG
    server = Server(config)
    # Everything imported (aiogram's models, the bot module) lives as long as the process: keep it
    # out of the garbage collector's generations, so a collection only walks what the work itself
    # allocates. (The server wires its parts later, at start-up: those few objects are collected.)
    gc.freeze()
    if early is not None:
        early.hand_over()
    return asyncio.run(serve_with_signals(server, early))


if __name__ == "__main__":
    assert PREPARED is not None
    exit_after_stop(run(PREPARED[1], EARLY_STOP))
