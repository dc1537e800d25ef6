"""``python main.py inbox``: the updates set aside as poison, and what an operator does with them.

    python main.py inbox              list them: update id, chat, type, deaths, when set aside
    python main.py inbox retry ID     put update ID back: the leader runs it again
    python main.py inbox drop ID      mark update ID done: it is never run

Exit codes as ``status``'s (scripts branch on them): 0 listed or done, 2 usage, 3 no update ID is
set aside, 4 cannot tell (the database is unreachable, refuses us or does not answer in time:
one line says why), 78 a configuration error. Nothing here imports aiogram, and nothing printed
carries a token or a password (the database is named as ``status`` names it).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from utils.base.exit_codes import EXIT_CANNOT_TELL, EXIT_NOTHING, EXIT_OK, EXIT_USAGE
from utils.config import Settings

USAGE = """usage: python main.py inbox              list the updates set aside (poison)
       python main.py inbox retry ID     put update ID back: the active instance runs it again
       python main.py inbox drop ID      mark update ID done: it is never run"""
ACTIONS = ("retry", "drop")

T = TypeVar("T")


def parse_args(args: Sequence[str]) -> tuple[str, int | None] | None:
    """``("list", None)``, ``("retry", id)`` or ``("drop", id)``; None for a usage error."""
    if not args:
        return "list", None
    if len(args) == 2 and args[0] in ACTIONS and args[1].lstrip("-").isdigit():
        return args[0], int(args[1])
    return None


def format_rows(rows: Sequence[tuple[int, str, str, int, str]]) -> str:
    """The listing: one aligned line per update, under a header."""
    header = ("update_id", "chat", "type", "deaths", "set aside at (UTC)")
    table = [header, *[tuple(str(v) for v in row) for row in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in table)


async def _with_store(settings: Settings, started: float, work: Callable[..., Awaitable[T]]) -> T:
    """Run *work(store)* bounded like ``status``; a failure becomes :class:`CannotTell`."""
    from utils.ops.status import CannotTell, close_quietly, query_timeout
    from utils.state.database import DatabaseTarget
    from utils.state.store import StateStore

    store = StateStore.create(DatabaseTarget.parse(settings.database, settings.state_dir),
                              settings.bot_id, "inbox-command")
    await store.open()  # a state directory not ours alone: exit 78 (run_command), nothing open yet
    timeout = query_timeout(time.monotonic(), started)
    try:
        return await asyncio.wait_for(work(store), timeout)
    except (OSError, TimeoutError) as exc:
        raise CannotTell(store.describe_error(exc, waited=round(timeout, 1))) from exc
    except Exception as exc:  # psycopg/SQLAlchemy errors (an old schema too): one line
        raise CannotTell(store.describe_error(exc)) from exc
    finally:
        await close_quietly("state store", store.close)


async def inbox_command(settings: Settings, action: str, update_id: int | None, started: float) -> int:
    from utils.ops.status import CannotTell, say
    from utils.state.store import StateStore
    from utils.updates.poison import update_type

    async def listing(store: StateStore) -> list[tuple[int, str, str, int, str]]:
        if not await store.recovery.exists():
            return []
        rows = await store.recovery.set_aside()
        return [(r.update_id, r.chat_key or "-", update_type(r.payload), r.deaths,
                 r.set_aside_at.strftime("%Y-%m-%d %H:%M:%S") if r.set_aside_at else "?") for r in rows]

    async def act(store: StateStore) -> int:
        assert update_id is not None
        if not await store.recovery.exists():
            return 0
        change = store.recovery.retry if action == "retry" else store.recovery.drop
        return await change([update_id])

    try:
        if action == "list":
            rows = await _with_store(settings, started, listing)
            say(settings, format_rows(rows) if rows else "no update is set aside")
            return EXIT_OK
        changed = await _with_store(settings, started, act)
    except CannotTell as exc:
        say(settings, f"solobot inbox: cannot tell: {exc}", sys.stderr)
        return EXIT_CANNOT_TELL
    if not changed:
        say(settings, f"solobot inbox: no update {update_id} is set aside (see `python main.py inbox`)", sys.stderr)
        return EXIT_NOTHING
    if action == "retry":
        say(settings, f"update {update_id} put back: the active instance runs it again")
    else:
        say(settings, f"update {update_id} dropped: marked done, never run")
    return EXIT_OK


def run_inbox(settings: Settings, args: Sequence[str], started: float | None = None) -> int:
    """Entry for ``main.py inbox ...``; *args* were checked by :func:`parse_args`."""
    parsed = parse_args(args)
    if parsed is None:
        print(USAGE, file=sys.stderr)
        return EXIT_USAGE
    action, update_id = parsed
    from utils.ops.status import run_command

    return run_command(inbox_command(settings, action, update_id, time.monotonic() if started is None else started))
