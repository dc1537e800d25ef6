"""What runs before the heavy imports: signals from the first instruction, configuration, logging.

A container's PID 1 gets no default signal actions: the kernel drops a SIGTERM that PID 1 has no
handler for. aiogram, SQLAlchemy and APScheduler take seconds to import in a slim image, so the
handlers are installed first (:mod:`utils.ops.early_stop`, imported by main.py before this module),
and a stop that arrives during the imports ends the process at once with exit 0 (nothing was
acquired yet). Once the event loop runs,
:class:`utils.ops.shutdown.ShutdownManager` takes the signals over and is told about any that
arrived in between. The configuration is validated here too, so exit 78 costs no heavy import.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from utils.config import EX_CONFIG, ConfigError, Settings, load_configuration
from utils.ops.early_stop import EarlyStop
from utils.ops.logging_setup import configure_logging

#: When the process started, near enough: main.py imports this module first. ``status`` answers
#: within a bound counted from here, so a slow start-up shortens its database query.
STARTED = time.monotonic()

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def prepare(argv: list[str], usage: str) -> tuple[str, Settings] | int:
    """Parse the command line, load and validate the configuration, set up logging.

    Returns ``(command, settings)`` to run the bot, or the exit code to stop with: a usage error,
    a bad configuration, or the outcome of ``status`` (which needs nothing heavy).
    """
    command = argv[1] if len(argv) > 1 else "run"
    if command not in ("run", "status", "inbox") or (len(argv) > 2 and command != "inbox"):
        print(usage, file=sys.stderr)
        return EXIT_USAGE
    try:
        # The working directory's .env (or $ENV_FILE), strictly: see utils/env_file.py.
        settings = load_configuration(os.environ, Path.cwd())
    except ConfigError as exc:
        print(f"solobot: {exc}", file=sys.stderr)
        return EX_CONFIG
    configure_logging(settings.log_level, settings.log_format,
                      token=settings.bot_token, database_url=settings.database_url)
    if command == "status":
        from utils.ops.status import run_status  # no aiogram: a status check stays quick

        return run_status(settings, started=STARTED)
    if command == "inbox":
        from utils.ops.inbox_command import run_inbox  # poison updates set aside: no aiogram either

        return run_inbox(settings, argv[2:], started=STARTED)
    return command, settings


__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "EarlyStop", "prepare"]
