"""Waking the leader when another process stored an update (webhook mode).

Any replica may store a webhook delivery in the inbox; only the leader handles it. Without a
wake-up the leader would find such a row only on its next sweep, which adds latency to every
update that a balancer sent to a passive replica.

* PostgreSQL: the receiving replica sends ``NOTIFY`` on the bot's channel after its insert
  committed; the leader keeps one ``LISTEN`` connection (tagged like every session of the
  instance, so fencing ends it too) and adopts at once.
* SQLite: the replicas share one host and one file; there is no notification between
  processes, so the leader asks ``InboxRepository.has_unclaimed`` on a short timer (a one-row
  index read).

The notification carries nothing: the inbox is the truth and a lost notification only delays
(the leader also sweeps on a timer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.ext.asyncio import AsyncEngine

from utils.state.database import PG_TCP_TIMEOUTS, DatabaseTarget, session_tag

log = logging.getLogger("solobot.state")

#: The LISTEN connection gives up connecting after this long (then retries).
LISTEN_CONNECT_TIMEOUT_S = 5


def inbox_channel(bot_id: int) -> str:
    """The NOTIFY channel of one bot's inbox (an identifier: digits and underscores only)."""
    return f"solobot_inbox_{bot_id}"


async def notify_inbox(engine: AsyncEngine, bot_id: int) -> None:
    """Tell the leader a row was stored (PostgreSQL; a no-op on SQLite). Call after the commit."""
    if engine.dialect.name != "postgresql":
        return
    async with engine.begin() as conn:
        await conn.execute(sa.select(sa.func.pg_notify(inbox_channel(bot_id), "")))


@contextlib.asynccontextmanager
async def inbox_listener(target: DatabaseTarget, bot_id: int,
                         instance_id: str) -> AsyncIterator[AsyncIterator[None]]:
    """A LISTEN session on the bot's channel; yields an iterator that produces one item per
    notification. The connection is closed on exit; a dropped connection ends the iterator
    with the driver's error (the caller reconnects)."""
    conn = await psycopg.AsyncConnection.connect(
        target.libpq_dsn, autocommit=True, connect_timeout=LISTEN_CONNECT_TIMEOUT_S,
        application_name=session_tag(bot_id, instance_id, "listen"), **PG_TCP_TIMEOUTS,
    )
    try:
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(inbox_channel(bot_id))))

        async def notifications() -> AsyncIterator[None]:
            async for _ in conn.notifies():
                yield None

        yield notifications()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(conn.close())
