"""The FSM storage: the journal's layers (pure, milliseconds) and DurableStorage on SQLite and
PostgreSQL: committed with the done marks, fenced, every StorageKey field, expiry, clear errors."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiogram.exceptions import DataNotDictLikeError
from aiogram.fsm.storage.base import StorageKey
from aiogram.fsm.strategy import FSMStrategy
from aiogram.types import Update

from tests.test_state_store import fresh_store
from utils.base.lease import Lease, LeaseLost
from utils.state.fsm import BatchedReads, DurableStorage, FsmDataError
from utils.state.fsm_journal import FsmJournal, FsmRecord
from utils.state.fsm_repository import KeyTuple
from utils.state.inbox import NewUpdate
from utils.state.store import FencedError, StateStore
from utils.updates.pipeline import chat_key

KEY = StorageKey(bot_id=42, chat_id=1, user_id=1)


def rec(state: str | None, data: str = "{}") -> FsmRecord:
    return FsmRecord(state=state, data=data)


# -- the journal (pure) ------------------------------------------------------------------------

def test_running_writes_are_private_until_finished_then_visible_until_committed() -> None:
    j = FsmJournal()
    j.open(1)
    j.write(1, "k", rec("a"))
    assert j.lookup("k", 1) == rec("a")
    assert j.lookup("k", None) is None and j.lookup("k", 2) is None, "not visible outside its update"
    assert j.finish(1)
    assert j.lookup("k", 2) == rec("a"), "a later update of the chat sees it in the commit window"
    assert j.to_commit([1]) == [("k", rec("a"))]
    j.committed([1])
    assert j.pending == 0 and j.lookup("k", None) == rec("a"), "remembered as committed"


def test_discarded_update_leaves_nothing() -> None:
    j = FsmJournal()
    j.remember("k", rec("before"))
    j.open(1)
    j.write(1, "k", rec("after"))
    j.discard(1)
    assert j.lookup("k", 1) == rec("before")
    assert not j.finish(1) and j.to_commit([1]) == []


def test_newest_write_of_a_key_is_committed_and_an_older_commit_keeps_the_newer_pending() -> None:
    j = FsmJournal()
    for seq, state in ((1, "a"), (2, "b")):
        j.open(seq)
        j.write(seq, "k", rec(state))
        j.finish(seq)
    assert j.to_commit([1, 2]) == [("k", rec("b"))]
    assert j.to_commit([2, 1]) == [("k", rec("b"))], "by version, not by the order of the marks"
    j.committed([1])
    assert j.lookup("k", None) == rec("b"), "update 2's write still pending over update 1's commit"
    assert j.pending == 1
    j.committed([2])
    assert j.pending == 0 and j.lookup("k", None) == rec("b")


def test_a_newer_write_committed_first_is_never_overwritten_by_an_older_pending_one() -> None:
    j = FsmJournal()
    for seq, state in ((1, "old"), (2, "new")):  # 1 waits for the group commit, 2 is marked done at once
        j.open(seq)
        j.write(seq, "k", rec(state))
        j.write(seq, f"own-{seq}", rec(state))
        j.finish(seq)
    j.committed([2])
    assert j.to_commit([1]) == [("own-1", rec("old"))], "update 1's older write of k is superseded"
    j.committed([1])
    assert j.lookup("k", None) == rec("new") and j.pending == 0


def test_direct_write_replaces_pending_writes_of_the_key() -> None:
    j = FsmJournal()
    j.open(1)
    j.write(1, "k", rec("from-update"))
    j.write(1, "other", rec("x"))
    j.finish(1)
    j.written_directly("k", rec("from-job"))
    assert j.lookup("k", None) == rec("from-job")
    assert j.to_commit([1]) == [("other", rec("x"))], "the older finished write is never committed after it"


def test_cache_is_bounded_and_reset_forgets_everything() -> None:
    j = FsmJournal(cache_max=2)
    for k in "abc":
        j.remember(k, rec(k))
    assert j.lookup("a", None) is None and j.lookup("c", None) == rec("c")
    j.open(1)
    j.write(1, "k", rec("x"))
    j.finish(1)
    j.reset()
    assert j.lookup("c", None) is None and j.lookup("k", None) is None and j.pending == 0


def test_ordering_key_follows_the_fsm_strategy() -> None:
    update = Update.model_validate({"update_id": 1, "message": {
        "message_id": 1, "date": 0, "chat": {"id": -100, "type": "group"},
        "from": {"id": 7, "is_bot": False, "first_name": "u"}, "text": "hi"}})
    for strategy in (FSMStrategy.USER_IN_CHAT, FSMStrategy.CHAT, FSMStrategy.USER_IN_TOPIC,
                     FSMStrategy.CHAT_TOPIC):
        assert chat_key(update, strategy) == "c:-100", strategy
    assert chat_key(update, FSMStrategy.GLOBAL_USER) == "u:7", "one user's state spans chats: order per user"
    inline = Update.model_validate({"update_id": 2, "inline_query": {
        "id": "q", "from": {"id": 7, "is_bot": False, "first_name": "u"}, "query": "", "offset": ""}})
    assert chat_key(inline, FSMStrategy.USER_IN_CHAT) == "c:7", "aiogram keys it on the user's private chat"


async def test_reads_asked_for_together_go_in_one_query_and_share_its_error() -> None:
    queries: list[list[KeyTuple]] = []
    fail = False

    async def read_many(keys):
        queries.append(list(keys))
        await asyncio.sleep(0)
        if fail:
            raise RuntimeError("database away")
        return {k: rec(f"s{k[1]}") for k in keys if k[1] % 2 == 0}

    reads = BatchedReads(read_many, max_batch=3)
    keys = [(1, n, n, 0, "", "default") for n in range(5)]
    got = await asyncio.gather(*(reads.get(k) for k in keys), reads.get(keys[0]))
    assert got == [rec("s0"), None, rec("s2"), None, rec("s4"), rec("s0")]
    assert queries == [keys[:3], keys[3:]], "one query per round, a key asked twice read once"
    fail = True
    results = await asyncio.gather(reads.get(keys[1]), reads.get(keys[2]), return_exceptions=True)
    assert [str(r) for r in results] == ["database away"] * 2
    fail = False
    assert await reads.get(keys[2]) == rec("s2"), "a failed round leaves nothing behind"


# -- DurableStorage on both backends ------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    s = await fresh_store(request.param, tmp_path)
    yield s
    await s.close()


async def lead(store: StateStore) -> Lease:
    takeover = await store.leader.advance_epoch(instance_id="t", host="h", pid=1)

    async def verify() -> bool:
        return True

    return Lease(takeover.epoch, verify=verify, renew_deadline=60.0)


async def handled(store: StateStore, storage: DurableStorage, lease: Lease, seq: int) -> None:
    """Record update *seq* as done, with the state it set, as the pipeline's flush does."""
    async with storage.committing([seq], lease.epoch) as step:
        await store.inbox.mark_done([seq], lease.epoch, also=step)


async def stored(store: StateStore, n: int, epoch: int) -> list[int]:
    batch = await store.inbox.store_batch(
        [NewUpdate(i, f"fp{i}", "c:1", "{}") for i in range(1, n + 1)], epoch=epoch)
    return [e.seq for e in batch.new]


async def test_handler_writes_commit_with_the_done_mark(store: StateStore) -> None:
    lease = await lead(store)
    storage = DurableStorage(store.fsm, lambda: lease)
    fresh = DurableStorage(store.fsm, lambda: lease)  # what the next leader would read
    seq, later = await stored(store, 2, lease.epoch)
    storage.begin_update(seq)
    await storage.set_state(KEY, "Form:name")
    await storage.update_data(KEY, {"name": "Ann"})
    assert await storage.get_state(KEY) == "Form:name", "the handler reads its own writes"
    assert await fresh.get_state(KEY) is None, "nothing durable before the done mark"
    storage.end_update(seq, done=True)
    assert await fresh.get_state(KEY) is None, "still in the commit window"
    storage.begin_update(later)  # the chat's next update, while the first one's mark waits
    assert await storage.get_state(KEY) == "Form:name" and await storage.get_data(KEY) == {"name": "Ann"}
    storage.end_update(later, done=True)
    await handled(store, storage, lease, seq)
    assert await DurableStorage(store.fsm, lambda: lease).get_state(KEY) == "Form:name"
    assert await DurableStorage(store.fsm, lambda: lease).get_data(KEY) == {"name": "Ann"}


async def test_unfinished_update_changes_nothing(store: StateStore) -> None:
    lease = await lead(store)
    storage = DurableStorage(store.fsm, lambda: lease)
    await storage.set_state(KEY, "Form:name")  # outside any update: committed at once
    [seq] = await stored(store, 1, lease.epoch)
    storage.begin_update(seq)
    await storage.set_state(KEY, "Form:age")
    storage.end_update(seq, done=False)  # killed, cancelled, lease lost
    await handled(store, storage, lease, seq)
    assert await storage.get_state(KEY) == "Form:name"
    assert await DurableStorage(store.fsm, lambda: lease).get_state(KEY) == "Form:name"


async def test_fenced_leader_writes_nothing_and_a_passive_one_reads_nothing(store: StateStore) -> None:
    lease = await lead(store)
    storage = DurableStorage(store.fsm, lambda: lease)
    [seq] = await stored(store, 1, lease.epoch)
    storage.begin_update(seq)
    await storage.set_state(KEY, "Form:age")
    storage.end_update(seq, done=True)
    newer = await lead(store)  # a standby fenced this leader
    with pytest.raises(FencedError):
        await handled(store, storage, lease, seq)
    with pytest.raises(FencedError):
        await storage.set_state(KEY, "from-a-job")
    assert await DurableStorage(store.fsm, lambda: newer).get_state(KEY) is None
    with pytest.raises(LeaseLost):
        await DurableStorage(store.fsm, lambda: None).get_state(KEY)
    lease.lose("fenced")
    with pytest.raises(LeaseLost):
        await storage.get_state(KEY)


async def test_every_storage_key_field_is_its_own_row(store: StateStore) -> None:
    lease = await lead(store)
    storage = DurableStorage(store.fsm, lambda: lease)
    keys = [KEY, StorageKey(42, 1, 2), StorageKey(42, 2, 1), StorageKey(43, 1, 1),
            StorageKey(42, 1, 1, thread_id=5), StorageKey(42, 1, 1, business_connection_id="bc"),
            StorageKey(42, 1, 1, destiny="other")]
    for i, key in enumerate(keys):
        await storage.set_state(key, f"s{i}")
        await storage.set_data(key, {"i": i, "nested": {"list": [1, "two", None, True]}})
    fresh = DurableStorage(store.fsm, lambda: lease)
    for i, key in enumerate(keys):
        assert await fresh.get_state(key) == f"s{i}"
        assert await fresh.get_data(key) == {"i": i, "nested": {"list": [1, "two", None, True]}}
    await fresh.set_state(KEY, None)
    assert await DurableStorage(store.fsm, lambda: lease).get_data(KEY) == {"i": 0, "nested": {
        "list": [1, "two", None, True]}}, "clearing the state keeps the data (aiogram's semantics)"


async def test_data_that_cannot_be_stored_is_an_error_in_the_handler(store: StateStore) -> None:
    lease = await lead(store)
    storage = DurableStorage(store.fsm, lambda: lease)
    await storage.set_data(KEY, {"name": "Ann"})
    with pytest.raises(FsmDataError, match="datetime cannot be stored"):
        await storage.update_data(KEY, {"when": dt.datetime.now()})
    with pytest.raises(FsmDataError, match="keys must be"):
        await storage.set_data(KEY, {("a", 1): "tuple key"})  # type: ignore[dict-item]
    loop: dict[str, object] = {}
    loop["self"] = loop
    with pytest.raises(FsmDataError, match="Circular reference"):
        await storage.set_data(KEY, loop)
    with pytest.raises(DataNotDictLikeError):
        await storage.set_data(KEY, [("a", 1)])  # type: ignore[arg-type]
    assert await storage.get_data(KEY) == {"name": "Ann"}, "nothing half-stored"
    data = await storage.get_data(KEY)
    data["name"] = "changed"
    assert await storage.get_data(KEY) == {"name": "Ann"}, "get_data returns a copy"


async def test_state_and_data_expire_like_redis_storage_ttls(store: StateStore) -> None:
    lease = await lead(store)
    now = [1000.0]
    storage = DurableStorage(store.fsm, lambda: lease, state_ttl=10, data_ttl=20, clock=lambda: now[0])
    await storage.set_state(KEY, "Form:name")
    await storage.set_data(KEY, {"a": 1})
    now[0] += 15
    fresh = DurableStorage(store.fsm, lambda: lease, clock=lambda: now[0])
    assert (await fresh.get_state(KEY), await fresh.get_data(KEY)) == (None, {"a": 1})
    now[0] += 10
    assert await storage.get_data(KEY) == {}


async def test_direct_write_is_not_overtaken_by_an_older_pending_one(store: StateStore) -> None:
    lease = await lead(store)
    storage = DurableStorage(store.fsm, lambda: lease)
    [seq] = await stored(store, 1, lease.epoch)
    storage.begin_update(seq)
    await storage.set_state(KEY, "from-handler")
    storage.end_update(seq, done=True)
    await storage.set_state(KEY, "from-job")  # a task outside the update (CURRENT_UPDATE is set but closed)
    await handled(store, storage, lease, seq)
    assert await DurableStorage(store.fsm, lambda: lease).get_state(KEY) == "from-job"
