"""SIGTERM/SIGINT honoured from the first instruction of ``main.py`` (standard library only).

A container's PID 1 gets no default signal actions: the kernel drops a SIGTERM that PID 1 has no
handler for, and the engine kills the process at the end of its grace period. So ``main.py``,
when it runs as a program (an import installs nothing), imports this module before anything else
(``utils`` and ``utils.ops`` import nothing heavy) and installs the handlers at once. Until
:meth:`EarlyStop.hand_over`, nothing has been acquired, so a signal ends the process on the spot
with exit 0: ``os._exit``, not ``SystemExit``, because an exception raised in the middle of a
third-party import can be caught and re-wrapped there (pydantic turns it into a schema error) and
end in a traceback and exit 1.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

EXIT_OK = 0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class EarlyStop:
    """SIGTERM/SIGINT from the first instruction until the event loop's handlers take over."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._abort = True  # while nothing is acquired, a signal ends the process at once

    @classmethod
    def install(cls) -> EarlyStop:
        early = cls()
        for sig in STOP_SIGNALS:
            signal.signal(sig, early._on_signal)
        return early

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signal.Signals(signum)
        if self._abort:
            sys.stderr.write(f"solobot: {self.received.name} before startup finished; exiting\n")
            sys.stderr.flush()
            os._exit(EXIT_OK)

    def hand_over(self) -> None:
        """From now on only record signals: the caller is about to install its own handlers."""
        self._abort = False
