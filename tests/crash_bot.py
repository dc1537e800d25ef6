"""``python -m tests.crash_bot PYTHON main.py``: solobot whose handler for ``/crash`` kills its process.

A poison update as the field meets it (a segfault in a C extension, a native abort, the OOM
killer): the process dies with SIGKILL inside the handler, nothing runs after. Used as the
``prefix`` of a test's ``spawn`` (tests/conftest.py): it adds the killing handler in front of
bot.py's own and runs main.py as ``__main__``, so everything else is the real daemon.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import bot

#: The message text whose handler kills the process.
CRASH_TEXT = "/crash"


async def crash_on_text(handler: Callable[[Any, dict[str, Any]], Awaitable[Any]], event: Any,
                        data: dict[str, Any]) -> Any:
    if getattr(event, "text", None) == CRASH_TEXT:
        os.kill(os.getpid(), signal.SIGKILL)
    return await handler(event, data)


def install() -> None:
    """Put the killing handler in front of bot.py's own (tests/conftest.py calls this in a forked child)."""
    bot.router.message.outer_middleware(crash_on_text)


def main() -> None:
    install()
    main_py = sys.argv[-1]
    sys.argv = [main_py]
    runpy.run_path(main_py, run_name="__main__")


if __name__ == "__main__":
    main()
