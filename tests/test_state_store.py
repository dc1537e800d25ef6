"""The state store on SQLite and on the real PostgreSQL: fencing, the inbox, posts."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from tests.conftest import DATABASE_URL
from tests.test_postgres import drop_tables
from utils.state.database import DatabaseTarget, prepare_sqlite_files
from utils.state.inbox import NewUpdate
from utils.state.store import FencedError, StateStore

#: A bound above every sequence number the tests store (the paged claim takes seq <= until).
EVERY_SEQ = 2**62


async def fresh_store(backend: str, tmp_path: Path) -> StateStore:
    """A migrated state store with nothing in it: SQLite in *tmp_path*, or this worker's PostgreSQL."""
    if backend == "postgres":
        drop_tables(DATABASE_URL)
        s = StateStore.create(DatabaseTarget.parse(DATABASE_URL, tmp_path), 42, "test")
        await s.open()
    else:
        s = StateStore.create(DatabaseTarget.parse(None, tmp_path / "state"), 42, "test")
        await s.open()
    await s.migrate()
    return s


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    s = await fresh_store(request.param, tmp_path)
    s._migrated = False
    await s.migrate()  # idempotent
    yield s
    await s.close()


def update(update_id: int, text: str = "hi", chat: int = 1) -> NewUpdate:
    return NewUpdate(update_id, f"fp-{update_id}-{text}", f"c:{chat}", f'{{"update_id": {update_id}, "t": "{text}"}}')


async def test_epochs_fence_old_leaders(store: StateStore) -> None:
    t1 = await store.leader.advance_epoch(instance_id="a", host="h", pid=1)
    assert (t1.epoch, t1.previous_released) == (1, True)
    await store.inbox.store_batch([update(10)], epoch=1, next_offset=11)
    t2 = await store.leader.advance_epoch(instance_id="b", host="h", pid=2)
    assert (t2.epoch, t2.previous_released, t2.previous_instance) == (2, False, "a"), "epoch 1 never released"
    assert t2.previous_heartbeat_age is not None and t2.previous_heartbeat_age < 60
    with pytest.raises(FencedError):
        await store.inbox.store_batch([update(11)], epoch=1, next_offset=12)
    with pytest.raises(FencedError):
        await store.inbox.mark_done([1], 1)
    with pytest.raises(FencedError):
        await store.set_flag("last_slot", "x", epoch=1)
    assert await store.inbox.load_offset() == 11, "the fenced batch stored nothing, offset included"
    await store.leader.mark_released(2)
    t3 = await store.leader.advance_epoch(instance_id="c", host="h", pid=3)
    assert (t3.epoch, t3.previous_released) == (3, True)


async def test_inbox_dedup_on_id_and_content_and_claims(store: StateStore) -> None:
    await store.leader.advance_epoch(instance_id="a", host="h", pid=1)
    first = await store.inbox.store_batch([update(5, "a"), update(6, "b", chat=2)], epoch=1, next_offset=7)
    assert [e.update_id for e in first.new] == [5, 6] and first.duplicates == 0
    assert all(e.attempt == 1 for e in first.new)
    # The same updates again (re-fetched after a crash): duplicates, still waiting.
    again = await store.inbox.store_batch([update(5, "a"), update(6, "b", chat=2)], epoch=1, next_offset=7)
    assert again.new == [] and again.duplicates == 2
    assert [e.update_id for e in again.waiting_duplicates] == [5, 6]
    # A different update reusing id 5 (ids restarted): new, not a duplicate.
    reused = await store.inbox.store_batch([update(5, "other")], epoch=1, next_offset=6)
    assert [e.update_id for e in reused.new] == [5] and reused.duplicates == 0
    await store.inbox.mark_done([first.new[0].seq], 1)
    done_again = await store.inbox.store_batch([update(5, "a")], epoch=1)
    assert done_again.duplicates == 1 and done_again.waiting_duplicates == [], "done: not waiting"
    assert await store.inbox.depth() is not None
    # A new leader takes what is waiting, oldest first, counting the attempt.
    await store.leader.advance_epoch(instance_id="b", host="h", pid=2)
    # (The paged claim of a takeover, utils/updates/recovery.py, with room for everything.)
    waiting = await store.recovery.claim_page(2, after=0, until=EVERY_SEQ, limit=100)
    assert [(e.update_id, e.attempt) for e in waiting] == [(6, 2), (5, 2)]
    assert [e.seq for e in waiting] == sorted(e.seq for e in waiting)
    # Claiming twice in one term neither takes nor counts twice; the next term counts once more.
    assert await store.recovery.claim_page(2, after=0, until=EVERY_SEQ, limit=100) == []
    await store.leader.advance_epoch(instance_id="c", host="h", pid=3)
    assert [e.attempt for e in await store.recovery.claim_page(3, after=0, until=EVERY_SEQ, limit=100)] == [3, 3]
    await store.inbox.mark_done([e.seq for e in waiting], 3)
    assert await store.recovery.claim_page(3, after=0, until=EVERY_SEQ, limit=100) == []
    count, oldest = await store.inbox.depth()
    assert (count, oldest) == (0, None)


async def test_webhook_rows_unclaimed_until_a_leader_takes_them(store: StateStore) -> None:
    stored = await store.inbox.store_batch([update(1)], epoch=None)
    assert stored.new[0].attempt == 0
    await store.leader.advance_epoch(instance_id="a", host="h", pid=1)
    assert [e.attempt for e in await store.inbox.claim_unclaimed(1, 100)] == [1]


async def test_post_claim_is_fenced_and_exclusive(store: StateStore) -> None:
    e1 = (await store.leader.advance_epoch(instance_id="a", host="h", pid=1)).epoch
    p1 = await store.add_post(text="one", photo=None, created_by=7)
    p2 = await store.add_post(text="two", photo=None, created_by=7)
    claimed = await store.claim_post(e1)
    assert claimed is not None and claimed.id == p1.id and claimed.status == "sending"
    e2 = (await store.leader.advance_epoch(instance_id="b", host="h", pid=2)).epoch
    with pytest.raises(FencedError):
        await store.finish_post(p1.id, e1, status="sent", message_id=5)
    with pytest.raises(FencedError):
        await store.claim_post(e1)
    uncertain = await store.mark_interrupted_uncertain(e2)
    assert [p.id for p in uncertain] == [p1.id]
    nxt = await store.claim_post(e2)
    assert nxt is not None and nxt.id == p2.id
    await store.finish_post(p2.id, e2, status="sent", message_id=9)
    assert [p.status for p in (await store.posts_with_status("sent"))] == ["sent"]
    assert await store.set_post_status(p1.id, from_statuses=("uncertain",), to="queued", priority=1)
    assert [p.id for p in await store.queued_posts()] == [p1.id]


async def test_sqlite_state_is_private(tmp_path: Path) -> None:
    store = StateStore.create(DatabaseTarget.parse(None, tmp_path / "state"), 42, "test")
    await store.open()
    await store.migrate()
    await store.close()
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    for path in (tmp_path / "state").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_database_target_parsed_once() -> None:
    target = DatabaseTarget.parse("postgresql://bob:s3cret@db.example:6543/app", Path("/x"))
    assert target.is_postgres and (target.host, target.port, target.database) == ("db.example", 6543, "app")
    assert target.sqlalchemy_url.startswith("postgresql+psycopg://bob:s3cret@")
    assert "password=s3cret" in target.libpq_dsn and "host=db.example" in target.libpq_dsn
    assert "s3cret" not in target.display and target.where() == "db.example:6543/app"
    lite = DatabaseTarget.parse(None, Path("/tmp/st"))
    assert lite.kind == "sqlite" and str(lite.sqlite_path) == "/tmp/st/solobot.sqlite3"


def test_password_with_spaces_survives_parsing() -> None:
    target = DatabaseTarget.parse("postgresql://bob:s3cret%20P%40ss@h/app", Path("/x"))
    from psycopg.conninfo import conninfo_to_dict

    assert conninfo_to_dict(target.libpq_dsn)["password"] == "s3cret P@ss"


async def test_leader_adopts_rows_other_processes_stored(store: StateStore) -> None:
    await store.leader.advance_epoch(instance_id="a", host="h", pid=1)
    await store.inbox.store_batch([update(1), update(2)], epoch=None)  # two webhook deliveries
    first = await store.inbox.claim_unclaimed(1, limit=1)
    assert [(e.update_id, e.attempt) for e in first] == [(1, 1)], "oldest first, bounded"
    rest = await store.inbox.claim_unclaimed(1, limit=10)
    assert [e.update_id for e in rest] == [2]
    assert await store.inbox.claim_unclaimed(1, limit=10) == [], "each row adopted once"


async def test_a_transaction_cancelled_mid_statement_leaves_the_sqlite_write_lock_free(tmp_path: Path) -> None:
    """A task cancelled while its statement runs (a term's tasks at a stop) must not leave its
    transaction open: SQLAlchemy closes such a connection instead of rolling it back, and SQLite
    only defers that close while the statement's cursor is referenced. Without the rollback the
    write lock stayed held until a garbage collection (every writer waited out its busy timeout)."""
    target = DatabaseTarget.parse(None, tmp_path / "state")
    path = target.sqlite_path
    assert path is not None
    prepare_sqlite_files(path)
    engine = target.create_engine(bot_id=42, instance_id="test")
    running, release = threading.Event(), threading.Event()

    def hold() -> int:  # a statement that runs until the test lets it end
        running.set()
        release.wait(10)
        return 1

    @event.listens_for(engine.sync_engine, "connect")
    def _functions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_function("hold", 0, hold)

    async with engine.begin() as conn:
        await conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))

    async def interrupted() -> None:
        async with engine.begin() as conn:
            await conn.execute(sa.text("INSERT INTO t VALUES (1)"))
            await conn.execute(sa.text("SELECT hold()"))

    task = asyncio.create_task(interrupted())
    assert await asyncio.to_thread(running.wait, 10), "the statement runs"
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task

    def write_elsewhere() -> list[tuple[int]]:
        """Another process's write, as a standby's: a short busy timeout, not the engine's 30 s."""
        with sqlite3.connect(path, timeout=2) as other:
            other.execute("INSERT INTO t VALUES (2)")
            return list(other.execute("SELECT x FROM t"))

    try:
        assert await asyncio.to_thread(write_elsewhere) == [(2,)], "the cancelled insert rolled back"
    finally:
        await engine.dispose()
