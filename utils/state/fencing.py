"""Fencing by epoch: a leader's write is refused once a newer leader exists.

Two forms, both evaluated by the database, never by a check-then-act in Python:

* :func:`fenced` - a ``WHERE`` clause for single statements (the autoposter's claim and finish).
* :func:`hold_epoch` - for multi-statement transactions (an inbox batch, done marks): read the
  leader row ``FOR KEY SHARE`` first. A new leader takes the row ``FOR UPDATE`` before it raises
  the epoch, so it waits for such a transaction to commit and then sees its rows; the holder's
  heartbeat (a plain ``UPDATE`` of non-key columns) is not blocked by it. On SQLite every
  transaction already holds the database's write lock (``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from utils.state.schema import leader_table


class FencedError(RuntimeError):
    """A newer leader exists: this instance's write was refused."""


def current_epoch(bot_id: int) -> sa.ScalarSelect[int]:
    return sa.select(leader_table.c.epoch).where(leader_table.c.bot_id == bot_id).scalar_subquery()


def fenced(bot_id: int, epoch: int) -> sa.ColumnElement[bool]:
    """``WHERE`` condition: *epoch* is still the newest."""
    return sa.literal(epoch, sa.BigInteger) >= current_epoch(bot_id)


def epoch_is_current(dialect: str, bot_id: int) -> sa.ColumnElement[bool]:
    """``WHERE`` condition on a bound ``epoch`` parameter, holding the leader row on PostgreSQL.

    For statements compiled once and run many times: the epoch is a parameter, not a literal.
    """
    query = sa.select(leader_table.c.epoch).where(leader_table.c.bot_id == bot_id)
    if dialect == "postgresql":
        query = query.with_for_update(key_share=True, read=True)
    return sa.bindparam("epoch", type_=sa.BigInteger) >= query.scalar_subquery()


async def hold_epoch(conn: AsyncConnection, bot_id: int, epoch: int) -> None:
    """Inside a transaction: raise :class:`FencedError` unless *epoch* is current, and keep it so
    until commit (``FOR KEY SHARE`` on PostgreSQL)."""
    query = sa.select(leader_table.c.epoch).where(leader_table.c.bot_id == bot_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(key_share=True, read=True)
    newest = await conn.scalar(query)
    if newest is not None and int(newest) > epoch:
        raise FencedError(f"epoch {epoch} is fenced off by epoch {newest}")


async def raise_if_fenced(conn: AsyncConnection, bot_id: int, epoch: int) -> None:
    """After a fenced statement changed nothing: was it because a newer leader exists?"""
    newest = await conn.scalar(
        sa.select(leader_table.c.epoch).where(leader_table.c.bot_id == bot_id)
    )
    if newest is not None and int(newest) > epoch:
        raise FencedError(f"epoch {epoch} is fenced off by epoch {newest}")
