"""What runs before the heavy imports: signals from the first instruction, configuration, logging.

A container's PID 1 gets no default signal actions: the kernel drops a SIGTERM that PID 1 has no
handler for. aiogram, SQLAlchemy and APScheduler take seconds to import in a slim image, so the
handlers are installed first (:mod:`utils.ops.early_stop`, imported by main.py before this module),
and a stop that arrives during the imports ends the process at once with exit 0 (nothing was
acquired yet). Once the event loop runs,
:class:`utils.ops.shutdown.ShutdownManager` takes the signals over and is told about any that
arrived in between. The configuration is validated here too, so exit 78 costs no heavy import.

Those imports are also seconds of silence: a start that says nothing looks hung, in a terminal and
in the journal alike. So the first log line (version, where the configuration came from, "loading
the bot") goes out here, before them, and systemd's ``STATUS=`` says "starting" meanwhile.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from utils import __version__
from utils.config import EX_CONFIG, ConfigError, Settings, load_configuration
from utils.ops.early_stop import EarlyStop
from utils.ops.logging_setup import configure_logging
from utils.ops.sd_notify import SystemdNotifier

#: When the process started, near enough: main.py imports this module first. ``status`` answers
#: within a bound counted from here, so a slow start-up shortens its database query.
STARTED = time.monotonic()

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
COMMANDS = ("run", "status", "inbox")
HELP_FLAGS = ("-h", "--help", "help")
#: systemd's status line while the heavy imports run (the Server replaces it on the first mode change).
STARTING_STATUS = "STATUS=starting: loading the bot"

log = logging.getLogger("solobot")


def configuration_source(settings: Settings) -> str:
    """Where the settings came from, for the first log line: the environment, and which file."""
    if settings.env_file is None or str(settings.env_file) == os.devnull:
        return "the environment"
    return f"the environment and {settings.env_file}"


def announce_start(settings: Settings) -> None:
    """The first line of a start, before the seconds of imports: which release, which configuration."""
    log.info("solobot %s (pid %d): configuration from %s; loading the bot",
             __version__, os.getpid(), configuration_source(settings))
    SystemdNotifier.from_environment().notify(STARTING_STATUS)


def prepare(argv: list[str], usage: str) -> tuple[str, Settings] | int:
    """Parse the command line, load and validate the configuration, set up logging.

    Returns ``(command, settings)`` to run the bot, or the exit code to stop with: a usage error,
    a bad configuration, or the outcome of ``status`` (which needs nothing heavy).
    """
    command = argv[1] if len(argv) > 1 else "run"
    if command in HELP_FLAGS and len(argv) == 2:  # asked for: on stdout (``main.py --help | less``)
        print(usage)
        return EXIT_OK
    if command not in COMMANDS or (len(argv) > 2 and command != "inbox"):
        print(usage, file=sys.stderr)
        return EXIT_USAGE
    try:
        # The working directory's .env (or $ENV_FILE), strictly: see utils/env_file.py.
        settings = load_configuration(os.environ, Path.cwd())
    except ConfigError as exc:
        print(f"solobot: {exc}", file=sys.stderr)  # masked: ConfigError redacts its problems
        return EX_CONFIG
    configure_logging(settings.log_level, settings.log_format,
                      token=settings.bot_token, database_url=settings.database_url)
    if command == "status":
        from utils.ops.status import run_status  # no aiogram: a status check stays quick

        return run_status(settings, started=STARTED)
    if command == "inbox":
        from utils.ops.inbox_command import run_inbox  # poison updates set aside: no aiogram either

        return run_inbox(settings, argv[2:], started=STARTED)
    announce_start(settings)
    return command, settings


__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "EarlyStop", "prepare"]
