"""The SQL of ``solobot_fsm``, the aiogram FSM storage's table (:mod:`utils.state.fsm`).

Kept apart from the storage class so that the state store (and ``main.py status``) need no aiogram.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from utils.state.fencing import hold_epoch
from utils.state.fsm_journal import FsmRecord
from utils.state.schema import aware, fsm_table, utcnow

#: A step run inside the done marks' transaction, after the epoch is held.
TransactionStep = Callable[[AsyncConnection], Awaitable[None]]
#: The primary key: every field of aiogram's ``StorageKey`` (None as FSM_NO_THREAD / _CONNECTION).
KeyTuple = tuple[int, int, int, int, str, str]
KEY_COLUMNS = ("bot_id", "chat_id", "user_id", "thread_id", "business_connection_id", "destiny")


def _unix(value: dt.datetime | None) -> float | None:
    when = aware(value)
    return None if when is None else when.timestamp()


def _when(value: float | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, dt.UTC)


class FsmRepository:
    """The SQL of ``solobot_fsm``."""

    def __init__(self, engine: AsyncEngine, bot_id: int) -> None:
        self.engine = engine
        self.bot_id = bot_id  # whose leader row fences the writes
        insert: Any = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        statement = insert(fsm_table)
        self._upsert = statement.on_conflict_do_update(
            index_elements=list(KEY_COLUMNS),
            set_={name: statement.excluded[name] for name in
                  ("state", "data", "state_expires_at", "data_expires_at", "epoch", "updated_at")},
        )
        self._key = sa.tuple_(*(fsm_table.c[name] for name in KEY_COLUMNS))
        self._read_many = sa.select(*(fsm_table.c[name] for name in KEY_COLUMNS), fsm_table.c.state,
                                    fsm_table.c.data, fsm_table.c.state_expires_at, fsm_table.c.data_expires_at)

    async def read(self, key: KeyTuple) -> FsmRecord | None:
        return (await self.read_many([key])).get(key)

    async def read_many(self, keys: Sequence[KeyTuple]) -> dict[KeyTuple, FsmRecord]:
        """The stored records of *keys* (absent ones left out), in one query."""
        async with self.engine.connect() as conn:
            rows = (await conn.execute(self._read_many.where(self._key.in_(list(keys))))).all()
        return {tuple(getattr(row, name) for name in KEY_COLUMNS):
                FsmRecord(row.state, row.data, _unix(row.state_expires_at), _unix(row.data_expires_at))
                for row in rows}

    def _rows(self, records: Sequence[tuple[Hashable, FsmRecord]], epoch: int) -> list[dict[str, Any]]:
        now = utcnow()
        rows = []
        for key, record in records:
            assert isinstance(key, tuple)  # a KeyTuple (the journal's keys are opaque to it)
            row: dict[str, Any] = dict(zip(KEY_COLUMNS, key, strict=True))
            row.update(state=record.state, data=record.data, state_expires_at=_when(record.state_expires_at),
                       data_expires_at=_when(record.data_expires_at), epoch=epoch, updated_at=now)
            rows.append(row)
        return rows

    def step(self, records: Sequence[tuple[Hashable, FsmRecord]], epoch: int) -> TransactionStep:
        """Write *records* inside a transaction that already holds *epoch* (the done marks')."""
        rows = self._rows(records, epoch)

        async def write(conn: AsyncConnection) -> None:
            await conn.execute(self._upsert, rows)

        return write

    async def write_now(self, key: KeyTuple, record: FsmRecord, epoch: int) -> None:
        """One write in its own fenced transaction (outside any handler)."""
        async with self.engine.begin() as conn:
            await hold_epoch(conn, self.bot_id, epoch)
            await conn.execute(self._upsert, self._rows([(key, record)], epoch))
