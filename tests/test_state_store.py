"""The state store on SQLite and on the real PostgreSQL: fencing, offsets, processed updates, posts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import DATABASE_URL
from tests.test_postgres import TABLES
from utils.state.store import FencedError, StateStore


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    if request.param == "postgres":
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            for table in TABLES:
                conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
        s = StateStore.create(DATABASE_URL, tmp_path, 42)
    else:
        s = StateStore.create(None, tmp_path, 42)
    await s.migrate()
    await s.migrate()  # idempotent
    yield s
    await s.close()


async def test_epochs_fence_old_leaders(store: StateStore) -> None:
    e1, clean = await store.advance_epoch(instance_id="a", host="h", pid=1)
    assert (e1, clean) == (1, True)
    await store.commit_offset(10, e1)
    await store.mark_processed(10, e1)
    e2, clean = await store.advance_epoch(instance_id="b", host="h", pid=2)
    assert (e2, clean) == (2, False), "epoch 1 never released"
    with pytest.raises(FencedError):
        await store.commit_offset(11, e1)
    with pytest.raises(FencedError):
        await store.mark_processed(11, e1)
    with pytest.raises(FencedError):
        await store.set_flag("last_slot", "x", epoch=e1)
    await store.commit_offset(12, e2)
    assert await store.load_offset() == 12
    await store.commit_offset(11, e2)
    assert await store.load_offset() == 12, "the offset never goes back"
    assert await store.processed_among([9, 10, 11]) == {10}
    await store.mark_released(e2)
    assert (await store.advance_epoch(instance_id="c", host="h", pid=3)) == (3, True)


async def test_post_claim_is_fenced_and_exclusive(store: StateStore) -> None:
    e1, _ = await store.advance_epoch(instance_id="a", host="h", pid=1)
    p1 = await store.add_post(text="one", photo=None, created_by=7)
    p2 = await store.add_post(text="two", photo=None, created_by=7)
    claimed = await store.claim_post(e1)
    assert claimed is not None and claimed.id == p1.id and claimed.status == "sending"
    e2, _ = await store.advance_epoch(instance_id="b", host="h", pid=2)
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
