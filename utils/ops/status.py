"""``python main.py status``: who is active for the configured backend, without starting a bot."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from utils.config import Settings
from utils.locking.factory import make_backend
from utils.state.store import StateStore

EXIT_OK, EXIT_NO_HOLDER = 0, 3


async def status_command(settings: Settings) -> int:
    """``python main.py status``: who is active for the configured backend."""
    store = StateStore.create(settings.database_url, settings.state_dir, settings.bot_id)
    backend = make_backend(settings, store, "status-query")
    try:
        holder = await backend.holder()
        active = holder is not None and await backend.holder_is_live(holder)
    finally:
        await backend.close()
        await store.close()
    if holder is None or not active:
        print(f"no active holder (backend {backend.name})")
        return EXIT_NO_HOLDER
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.since)) if holder.since else "?"
    print(json.dumps({"backend": backend.name, **holder.as_dict(), "since_text": since}))
    return EXIT_OK


def run_status(settings: Settings) -> int:
    """Entry for ``main.py status``; a lock directory problem is a configuration error."""
    from utils.config import EX_CONFIG
    from utils.locking.instance_lock import LockSetupError

    try:
        return asyncio.run(status_command(settings))
    except LockSetupError as exc:
        logging.getLogger("solobot").error("%s", exc)
        return EX_CONFIG
