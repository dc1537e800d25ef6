"""``python main.py status``: who is active for the configured backend, without starting a bot.

Exit codes (scripts and health checks branch on them): 0 an active holder exists (its JSON on
stdout), 3 no active holder, 4 cannot tell (the database is unreachable, refuses us or does not
answer in time), 78 a configuration error. A status check must answer quickly and in one line
whatever state the database is in, so the query ends by :data:`ANSWER_WITHIN` after the start and a
failure becomes one line (:meth:`StateStore.describe_error`: where and why), never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Coroutine
from typing import Any, TextIO

from utils.base.exit_codes import EXIT_CANNOT_TELL, EXIT_CONFIG, EXIT_NOTHING, EXIT_OK
from utils.config import Settings
from utils.locking.backend import HolderInfo, LockBackend
from utils.locking.factory import make_backend
from utils.ops.status_snapshot import holder_json
from utils.state.database import DatabaseTarget
from utils.state.store import StateStore

log = logging.getLogger("solobot")

#: The answer is due this long after the process started, even when the database accepts
#: connections but never replies. The bound for the whole command is 3 s; the interpreter's exit
#: after the answer (finalising SQLAlchemy and psycopg) takes 0.2-0.5 s on a busy machine.
ANSWER_WITHIN = 2.2
#: But the query (connect included) gets at least this long, however slow the start-up was: a
#: healthy remote server needs a few round trips.
MIN_QUERY_TIMEOUT = 0.5
#: Closing what the query opened; a hung server must not hold the answer back.
CLOSE_TIMEOUT = 0.5


class CannotTell(Exception):
    """The backend could not say who is active; the message is the one line to print."""


def query_timeout(now: float, started: float) -> float:
    """Seconds left for the query: what remains of :data:`ANSWER_WITHIN`, but at least the minimum."""
    return max(MIN_QUERY_TIMEOUT, ANSWER_WITHIN - (now - started))


async def _ask(backend: LockBackend) -> tuple[HolderInfo | None, bool]:
    holder = await backend.holder()
    return holder, holder is not None and await backend.holder_is_live(holder)


async def count_set_aside(store: StateStore, timeout: float) -> int | None:
    """Poison updates set aside (``python main.py inbox``); None if the inbox cannot say in time
    (never created, an older schema, a slow database): the holder is the answer, this a detail."""
    try:
        return await asyncio.wait_for(store.recovery.count_set_aside(), timeout)
    except Exception:  # the detail is left out, the answer stands
        log.debug("status: set-aside count failed", exc_info=True)
        return None


async def close_quietly(name: str, close: Any) -> None:
    """Close within :data:`CLOSE_TIMEOUT`; the answer is already known, so failures only go to DEBUG."""
    try:
        await asyncio.wait_for(close(), CLOSE_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - whatever closing a broken connection raises
        log.debug("status: closing the %s failed: %r", name, exc)


async def query_holder(settings: Settings, started: float) -> tuple[str, HolderInfo | None, bool, int | None]:
    """(backend name, holder, holder is live, updates set aside), or :class:`CannotTell` with the reason in one line.

    *started* is the process's start on the :func:`time.monotonic` clock (the answer is due
    :data:`ANSWER_WITHIN` after it).
    """
    store = StateStore.create(DatabaseTarget.parse(settings.database, settings.state_dir),
                              settings.bot_id, "status-query")
    backend = make_backend(settings, store, "status-query")
    # Before any connection: a state or lock directory that is not ours alone is a configuration
    # error (run_command), not a "cannot tell"; nothing is open yet to close.
    await store.open()
    await backend.open()
    timeout = query_timeout(time.monotonic(), started)
    try:
        holder, live = await asyncio.wait_for(_ask(backend), timeout)
        set_aside = await count_set_aside(store, query_timeout(time.monotonic(), started))
    except (OSError, TimeoutError) as exc:
        raise CannotTell(store.describe_error(exc, waited=round(timeout, 1))) from exc
    except Exception as exc:  # psycopg/SQLAlchemy errors (and bugs): named in the one line
        log.debug("status query failed", exc_info=True)
        raise CannotTell(store.describe_error(exc)) from exc
    finally:
        await close_quietly("lock backend", backend.close)
        await close_quietly("state store", store.close)
    return backend.name, holder, live, set_aside


async def status_command(settings: Settings, started: float) -> int:
    """``python main.py status``: who is active for the configured backend."""
    try:
        backend_name, holder, live, set_aside = await query_holder(settings, started)
    except CannotTell as exc:
        say(settings, f"solobot status: cannot tell who is active: {exc}", sys.stderr)
        return EXIT_CANNOT_TELL
    if holder is None or not live:
        held = f"; {set_aside} update(s) set aside: python main.py inbox" if set_aside else ""
        say(settings, f"no active holder (backend {backend_name}){held}")
        return EXIT_NOTHING
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.since)) if holder.since else "?"
    # The holder as /health's lock.holder shows it (one rendering of the typed holder).
    say(settings, json.dumps({"backend": backend_name, **(holder_json(holder) or {}), "since_text": since,
                              "set_aside": set_aside}))
    return EXIT_OK


def say(settings: Settings, line: str, stream: TextIO | None = None) -> None:
    """Every line ``status`` prints, through the configuration's redaction (as log lines are); on
    stdout unless *stream* says otherwise (looked up when called, not bound at import)."""
    print(settings.redactor(line), file=stream or sys.stdout)


def run_status(settings: Settings, started: float | None = None) -> int:
    """Entry for ``main.py status``; a lock or state directory problem is a configuration error.

    *started*: when the process started (:func:`time.monotonic`); default now.
    """
    return run_command(status_command(settings, time.monotonic() if started is None else started))


def run_command(command: Coroutine[Any, Any, int]) -> int:
    """Run a command of ``main.py`` that reads the state (``status``, ``inbox``): a lock or state
    directory that is not ours alone is a configuration error (exit 78, one line), as for the bot."""
    from utils.base.private_path import UnsafePathError

    try:
        return asyncio.run(command)
    except UnsafePathError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
