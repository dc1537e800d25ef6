"""How the process ends: its exit codes and the signals that ask it to stop, each defined here once.

Why one module: the codes are a contract with whoever runs solobot (systemd's
``RestartPreventExitStatus=78``, a script testing ``main.py status``'s 3 and 4, a shell seeing 130
after Ctrl-C twice), and they used to be spelled in seven modules; a code that means two things or
a signal handled in one place but not another is how such a contract breaks. Standard library
only: ``main.py``'s first import (:mod:`utils.ops.early_stop`) uses it before anything else.
"""

from __future__ import annotations

import signal

#: A clean stop (also a stop signal before anything was acquired); ``status``: an active holder.
EXIT_OK = 0
#: A runtime failure: a port in use, a stage of the shutdown that failed.
EXIT_FAILURE = 1
#: The command line is wrong (the usage goes to stderr).
EXIT_USAGE = 2
#: ``status``: no active holder; ``inbox retry|drop ID``: no such update set aside.
EXIT_NOTHING = 3
#: ``status`` and ``inbox``: cannot tell (the database is unreachable or does not answer).
EXIT_CANNOT_TELL = 4
#: sysexits.h EX_CONFIG: a configuration error (also an unreadable .env line, a placeholder or
#: revoked token, an unusable BOT_MODULE); systemd's RestartPreventExitStatus names it.
EXIT_CONFIG = 78
#: A repeated SIGINT while stopping: the operator insisted (128 + SIGINT, as a shell reports it).
EXIT_FORCED = 130

#: The container HEALTHCHECK's answer (``python -m utils.ops.healthcheck``), Docker's contract:
#: 0 healthy, 1 unhealthy (other codes are reserved).
HEALTHY, UNHEALTHY = EXIT_OK, EXIT_FAILURE

#: The signals that ask for an orderly stop: an orchestrator's SIGTERM, a terminal's Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
