"""aiogram FSM storage in the state store: conversations survive a handover, fenced like the rest.

``DurableStorage`` is an aiogram :class:`~aiogram.fsm.storage.base.BaseStorage` over the table
``solobot_fsm`` (SQLite by default, PostgreSQL with ``DATABASE_URL``): one row per full
``StorageKey`` (bot, chat, user, thread, business connection, destiny), the state and the data as
a JSON object. Why not aiogram's ``RedisStorage`` or ``MemoryStorage``: memory dies with the
process, and neither ties a state change to the update that made it, nor refuses a paused old
leader.

**Committed with the update.** A write made while a handler runs is buffered for that update
(the pipeline says which one through :meth:`DurableStorage.begin_update`, a context variable carries it
into the handler) and written in the transaction that records the update as done
(:meth:`DurableStorage.committing`, the group commit of done marks). A process killed before that
commit leaves the state as it was, and the next leader runs the update again against it: never a
half-applied or doubled transition. Later updates of the same chat read the finished updates'
writes from memory while their commit waits (:mod:`utils.state.fsm_journal`). A write outside any
handler (a scheduled job) is committed at once, fenced.

**Fenced.** Every read and write asks the active term first (the lease: no verification older
than the renew deadline), so a passive or resumed old leader cannot read state into a handler;
every commit is fenced by the epoch, so it cannot write any either.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from dataclasses import replace
from typing import Any, Protocol

from aiogram.exceptions import DataNotDictLikeError
from aiogram.fsm.state import State
from aiogram.fsm.storage.base import BaseStorage, StateType, StorageKey

from utils.base.lease import Lease, LeaseLost
from utils.state.fsm_journal import EMPTY, FsmJournal, FsmRecord
from utils.state.fsm_repository import FsmRepository, KeyTuple, TransactionStep
from utils.state.schema import FSM_NO_CONNECTION, FSM_NO_THREAD

#: Which update (its inbox ``seq``) the running code belongs to; None outside any handler.
CURRENT_UPDATE: ContextVar[int | None] = ContextVar("solobot_fsm_update", default=None)


class FsmDataError(TypeError):
    """FSM data that cannot be stored as a JSON object (raised in the handler that set it)."""


#: Keys read in one query at most (6 parameters each: well inside SQLite's and PostgreSQL's limits).
READ_BATCH = 100

def key_tuple(key: StorageKey) -> KeyTuple:
    """The row's primary key: every field of aiogram's ``StorageKey``."""
    return (key.bot_id, key.chat_id, key.user_id,
            FSM_NO_THREAD if key.thread_id is None else key.thread_id,
            FSM_NO_CONNECTION if key.business_connection_id is None else key.business_connection_id,
            key.destiny)


def encode_data(data: Mapping[str, Any]) -> str:
    """The data as JSON text, or :class:`FsmDataError` naming what cannot be stored."""
    if not isinstance(data, dict):
        raise DataNotDictLikeError(f"Data must be a dict or dict-like object, got {type(data).__name__}")

    def refuse(value: Any) -> Any:
        raise FsmDataError(f"FSM data must be JSON (str, int, float, bool, None, list, dict); "
                           f"a {type(value).__name__} cannot be stored: {value!r:.80}")

    try:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=refuse)
    except FsmDataError:
        raise
    except (TypeError, ValueError) as exc:  # a key that is not a str/number, a circular reference
        raise FsmDataError(f"FSM data cannot be stored as JSON: {exc}") from None


class UpdateWrites(Protocol):
    """What the update pipeline tells the FSM storage (:class:`DurableStorage`, or nothing)."""

    def reset(self) -> None: ...
    def begin_update(self, seq: int) -> None: ...
    def end_update(self, seq: int, *, done: bool) -> None: ...
    def committing(self, seqs: Sequence[int], epoch: int
                   ) -> AbstractAsyncContextManager[TransactionStep | None]: ...


class NoWrites:
    """For a dispatcher whose FSM storage is not ours (the bot module replaced it)."""

    def reset(self) -> None:
        pass

    def begin_update(self, seq: int) -> None:
        pass

    def end_update(self, seq: int, *, done: bool) -> None:
        pass

    @asynccontextmanager
    async def committing(self, seqs: Sequence[int], epoch: int) -> AsyncIterator[TransactionStep | None]:
        yield None


class DurableStorage(BaseStorage):
    """aiogram FSM storage in the state store, committed with each update's done mark.

    *term* returns the active term (the lease) or None on a passive instance. *state_ttl* and
    *data_ttl* (seconds) expire a state or data that long after it was last set, as aiogram's
    ``RedisStorage`` does; None keeps them until changed.
    """

    def __init__(self, repository: FsmRepository, term: Callable[[], Lease | None], *,
                 state_ttl: float | None = None, data_ttl: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.repository = repository
        self._term = term
        self.state_ttl = state_ttl
        self.data_ttl = data_ttl
        self._clock = clock
        self._journal = FsmJournal()
        self._reads = BatchedReads(repository.read_many)
        #: Bumped at every term: a read that started in an earlier one is not remembered.
        self._term_number = 0
        #: Held while FSM records are written (a done-mark commit, a direct write): a direct
        #: write can then never be overtaken by an older finished write committed after it.
        self._commit_lock = asyncio.Lock()

    # -- the pipeline's side (UpdateWrites) ----------------------------------------------------

    def reset(self) -> None:
        """A term starts: forget what the last one knew."""
        self._journal.reset()
        self._term_number += 1

    def begin_update(self, seq: int) -> None:
        """The update *seq* starts in this task: its writes are buffered for its done mark."""
        self._journal.open(seq)
        CURRENT_UPDATE.set(seq)

    def end_update(self, seq: int, *, done: bool) -> None:
        """The update *seq* ended: its writes join its done mark, or vanish if it did not finish."""
        if done:
            self._journal.finish(seq)
        else:
            self._journal.discard(seq)

    @asynccontextmanager
    async def committing(self, seqs: Sequence[int], epoch: int) -> AsyncIterator[TransactionStep | None]:
        """Around the done marks' transaction of *seqs*: yields the step that writes their state
        (None if they wrote none); once the block succeeded, their writes count as committed."""
        async with self._commit_lock:
            records = self._journal.to_commit(seqs)
            yield self.repository.step(records, epoch) if records else None
            self._journal.committed(seqs)

    # -- aiogram's BaseStorage -----------------------------------------------------------------

    async def _active(self) -> Lease:
        lease = self._term()
        if lease is None:
            raise LeaseLost("not the active instance: FSM state is read and written only by the leader")
        await lease.ensure()
        return lease

    async def _record(self, key: KeyTuple) -> FsmRecord:
        """The current record (expired parts cleared), through the lease."""
        await self._active()
        record = self._journal.lookup(key, CURRENT_UPDATE.get())
        if record is None:
            term = self._term_number
            record = await self._reads.get(key) or EMPTY
            if term == self._term_number and self._journal.lookup(key, None) is None:
                self._journal.remember(key, record)
        now = self._clock()
        if record.state_expires_at is not None and record.state_expires_at <= now:
            record = replace(record, state=None, state_expires_at=None)
        if record.data_expires_at is not None and record.data_expires_at <= now:
            record = replace(record, data=EMPTY.data, data_expires_at=None)
        return record

    async def _write(self, key: KeyTuple, record: FsmRecord) -> None:
        owner = CURRENT_UPDATE.get()
        if owner is not None and self._journal.is_open(owner):
            self._journal.write(owner, key, record)
            return
        async with self._commit_lock:  # outside a handler: committed at once, fenced
            lease = await self._active()
            await self.repository.write_now(key, record, lease.epoch)
            self._journal.written_directly(key, record)

    def _expiry(self, ttl: float | None) -> float | None:
        return None if ttl is None else self._clock() + ttl

    async def set_state(self, key: StorageKey, state: StateType = None) -> None:
        value = state.state if isinstance(state, State) else state
        k = key_tuple(key)
        record = await self._record(k)
        await self._write(k, replace(record, state=value,
                                     state_expires_at=None if value is None else self._expiry(self.state_ttl)))

    async def get_state(self, key: StorageKey) -> str | None:
        return (await self._record(key_tuple(key))).state

    async def set_data(self, key: StorageKey, data: Mapping[str, Any]) -> None:
        text = encode_data(data)  # before anything else: the handler gets the error
        k = key_tuple(key)
        record = await self._record(k)
        await self._write(k, replace(record, data=text,
                                     data_expires_at=None if not data else self._expiry(self.data_ttl)))

    async def get_data(self, key: StorageKey) -> dict[str, Any]:
        data = json.loads((await self._record(key_tuple(key))).data)
        assert isinstance(data, dict)
        return data

    async def close(self) -> None:
        """Nothing to close: the state store's engine is closed with the store."""


class BatchedReads:
    """Reads of records not known in memory, coalesced: the keys asked for while a query runs go
    together in the next one (as the done marks' group commit does for writes).

    Why: at the start of a term every chat's first update misses the cache at once; 50 queries
    side by side held the database's connections from the inbox writes and cost a burst of 3000
    updates a sixth of its throughput; one query per round costs a few milliseconds.
    """

    def __init__(self, read_many: Callable[[Sequence[KeyTuple]], Awaitable[dict[KeyTuple, FsmRecord]]],
                 *, max_batch: int = READ_BATCH) -> None:
        self._read_many = read_many
        self._max_batch = max_batch
        self._waiting: dict[KeyTuple, asyncio.Future[FsmRecord | None]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def get(self, key: KeyTuple) -> FsmRecord | None:
        """The stored record of *key*, or None if there is none."""
        future = self._waiting.get(key)
        if future is None:
            future = self._waiting[key] = asyncio.get_running_loop().create_future()
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read_rounds(), name="solobot-fsm-reads")
        return await asyncio.shield(future)

    async def _read_rounds(self) -> None:
        while self._waiting:
            keys = [key for key, future in self._waiting.items() if not future.done()][: self._max_batch]
            if not keys:
                self._waiting.clear()
                return
            try:
                found = await self._read_many(keys)
            except Exception as exc:  # noqa: BLE001 - each reader gets the error in its handler
                for key in keys:
                    future = self._waiting.pop(key)
                    if not future.done():
                        future.set_exception(exc)
                        future.exception()  # seen here too: a reader that gave up must not warn
                continue
            for key in keys:
                future = self._waiting.pop(key)
                if not future.done():
                    future.set_result(found.get(key))
