"""Poison updates, in milliseconds: the verdict, the book of one term, the inbox's SQL, the CLI's parsing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from utils.ops.inbox_command import format_rows, parse_args
from utils.state.database import DatabaseTarget
from utils.state.inbox import NewUpdate
from utils.state.recovery import STARTED_ALONE, STARTED_WITH_OTHERS
from utils.state.store import StateStore
from utils.updates.poison import RecoveryBook, Verdict, update_type, verdict


@pytest.mark.parametrize(("deaths", "alone", "expected"), [
    (0, 0, Verdict.RUN),
    (1, 0, Verdict.RUN_ALONE),  # running at one death among others: a suspect, not convicted
    (1, 1, Verdict.RUN_ALONE),
    (2, 1, Verdict.RUN_ALONE),
    (3, 2, Verdict.SET_ASIDE),
    (3, 1, Verdict.SET_ASIDE),
    (5, 0, Verdict.RUN_ALONE),  # never alone at a death: never convicted, however many
])
def test_verdict(deaths: int, alone: int, expected: Verdict) -> None:
    assert verdict(deaths, alone, 3) is expected


def test_poison_after_one_still_needs_a_death_alone() -> None:
    assert verdict(1, 0, 1) is Verdict.RUN_ALONE
    assert verdict(2, 1, 1) is Verdict.SET_ASIDE


def test_update_type() -> None:
    assert update_type(json.dumps({"update_id": 5, "message": {"text": "/crash"}})) == "message"
    assert update_type(json.dumps({"update_id": 5, "callback_query": {}})) == "callback_query"
    assert update_type("not json") == "unknown"
    assert update_type("[1]") == "unknown"


def test_book_tracks_taken_over_rows_only_after_a_death() -> None:
    died = RecoveryBook(died=True, watermark=10, suspects={4})
    assert died.tracks(4) and died.tracks(10) and not died.tracks(11)
    clean = RecoveryBook(died=False, watermark=10, suspects={4})
    assert clean.tracks(4) and not clean.tracks(5)


def test_book_alone_phase_ends_with_the_last_suspect() -> None:
    book = RecoveryBook(died=True, watermark=10, suspects={3, 7})
    assert book.alone_phase
    assert not book.finished(5)
    assert not book.finished(3) and book.alone_phase
    assert book.finished(7) and not book.alone_phase


def test_book_alone_phase_can_be_ended_early() -> None:
    """A suspect that runs alone for long (slow, not poison) must not hold every chat."""
    book = RecoveryBook(died=False, watermark=10, suspects={3, 7})
    book.alone_ended = True
    assert not book.alone_phase and book.tracks(7)  # still under a started record
    assert not book.finished(3) and not book.finished(7)


def test_book_paging() -> None:
    book = RecoveryBook(died=False, watermark=100, suspects=set())
    assert book.will_load(1) and book.will_load(100) and not book.will_load(101)
    book.paged(50)
    assert not book.will_load(50) and book.will_load(51)
    book.paged(None)
    assert not book.loading and not book.will_load(60)


def test_cli_arguments() -> None:
    assert parse_args([]) == ("list", None)
    assert parse_args(["retry", "42"]) == ("retry", 42)
    assert parse_args(["drop", "7"]) == ("drop", 7)
    for bad in (["retry"], ["retry", "x"], ["kill", "1"], ["drop", "1", "2"]):
        assert parse_args(bad) is None


def test_cli_table_is_aligned() -> None:
    text = format_rows([(12345, "c:1", "message", 3, "2026-01-01 00:00:00")])
    header, row = text.splitlines()
    assert header.index("chat") == row.index("c:1") and header.index("deaths") == row.index("3 ")


# -- the SQL (SQLite here; the real-process tests run it on PostgreSQL too) -----------------------


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


async def make_store(tmp_path: Path) -> StateStore:
    store = StateStore.create(DatabaseTarget.parse(None, tmp_path), 123456, "test")
    await store.open()
    await store.migrate()
    await store.leader.advance_epoch(instance_id="a", host="h", pid=1)
    return store


def update(n: int, chat: int) -> NewUpdate:
    return NewUpdate(n, f"fp{n}", f"c:{chat}", json.dumps({"update_id": n, "message": {"text": str(n)}}))


def test_deaths_are_counted_only_for_started_rows_and_convict_after_an_alone_death(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await make_store(tmp_path)
        await store.inbox.store_batch([update(1, 1), update(2, 2), update(3, 3)], epoch=1)
        poison, innocent, waited = 1, 2, 3

        def convict(deaths: int, alone: int) -> bool:
            return verdict(deaths, alone, 3) is Verdict.SET_ASIDE

        # Epoch 1 ran 1 and 2 together under started records, then died.
        await store.recovery.mark_started_batch([(poison, STARTED_WITH_OTHERS)], 1)
        await store.recovery.mark_started_batch([(innocent, STARTED_WITH_OTHERS)], 1)
        epoch = (await store.leader.advance_epoch(instance_id="b", host="h", pid=2)).epoch
        t = await store.recovery.take_over(epoch, predecessor_died=True, convict=convict)
        assert {s.entry.seq: s.deaths for s in t.suspects} == {poison: 1, innocent: 1}
        assert t.watermark == waited and not t.set_aside
        # Epoch 2 ran the innocent alone (it finished: done) and then the poison alone: death.
        await store.recovery.mark_started_batch([(innocent, STARTED_ALONE)], epoch)
        await store.inbox.mark_done([innocent], epoch)
        await store.recovery.mark_started_batch([(poison, STARTED_ALONE)], epoch)
        epoch = (await store.leader.advance_epoch(instance_id="c", host="h", pid=3)).epoch
        t = await store.recovery.take_over(epoch, predecessor_died=True, convict=convict)
        assert [(s.entry.seq, s.deaths, s.alone_deaths) for s in t.suspects] == [(poison, 2, 1)]
        await store.recovery.mark_started_batch([(poison, STARTED_ALONE)], epoch)
        epoch = (await store.leader.advance_epoch(instance_id="d", host="h", pid=4)).epoch
        t = await store.recovery.take_over(epoch, predecessor_died=True, convict=convict)
        assert not t.suspects and [(r.seq, r.deaths) for r in t.set_aside] == [(poison, 3)]
        # Set aside: not waiting (depth), listed, not taken by a page of the backlog.
        assert (await store.inbox.depth())[0] == 1
        assert [r.update_id for r in await store.recovery.set_aside()] == [1]
        page = await store.recovery.claim_page(epoch, after=0, until=t.watermark, limit=10)
        assert [e.seq for e in page] == [waited]
        assert await store.recovery.count_set_aside() == 1
        # A re-delivered copy of it is a duplicate, not a new row to run.
        batch = await store.inbox.store_batch([update(1, 1)], epoch=epoch)
        assert batch.duplicates == 1 and not batch.waiting_duplicates
        assert await store.recovery.retry([99]) == 0
        assert await store.recovery.retry([1]) == 1
        assert await store.recovery.count_set_aside() == 0
        assert await store.inbox.has_unclaimed()  # the leader takes it as a replica's row
        entries = await store.inbox.claim_unclaimed(epoch, 10)
        assert [e.update_id for e in entries] == [1]
        await store.close()

    run(scenario())


def test_a_clean_stop_is_not_a_death(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await make_store(tmp_path)
        await store.inbox.store_batch([update(1, 1)], epoch=1)
        await store.recovery.mark_started_batch([(1, STARTED_ALONE)], 1)
        epoch = (await store.leader.advance_epoch(instance_id="b", host="h", pid=2)).epoch
        t = await store.recovery.take_over(epoch, predecessor_died=False, convict=lambda d, a: True)
        assert not t.suspects and not t.set_aside
        page = await store.recovery.claim_page(epoch, after=0, until=t.watermark, limit=10)
        assert [(e.seq, e.attempt) for e in page] == [(1, 2)]
        await store.close()

    run(scenario())


def test_drop_makes_it_an_ordinary_done_row(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = await make_store(tmp_path)
        await store.inbox.store_batch([update(1, 1)], epoch=1)
        for epoch in (2, 3, 4):
            await store.recovery.mark_started_batch([(1, STARTED_ALONE)], epoch - 1)
            await store.leader.advance_epoch(instance_id="x", host="h", pid=epoch)
            t = await store.recovery.take_over(epoch, predecessor_died=True,
                                               convict=lambda d, a: verdict(d, a, 3) is Verdict.SET_ASIDE)
        assert [r.update_id for r in t.set_aside] == [1]
        assert await store.recovery.drop([1]) == 1
        assert await store.recovery.count_set_aside() == 0 and (await store.inbox.depth())[0] == 0
        assert await store.recovery.drop([1]) == 0
        await store.close()

    run(scenario())


def test_before_the_first_run_there_is_nothing_set_aside(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = StateStore.create(DatabaseTarget.parse(None, tmp_path), 123456, "test")
        await store.open()
        assert not await store.recovery.exists()
        await store.close()

    run(scenario())


def test_a_version_2_inbox_gains_the_columns(tmp_path: Path) -> None:
    """An inbox from before poison updates (schema 2) is migrated in place, its rows kept."""
    async def scenario() -> None:
        store = StateStore.create(DatabaseTarget.parse(None, tmp_path), 123456, "test")
        await store.open()
        async with store.engine.begin() as conn:
            await conn.execute(sa.text(
                "CREATE TABLE solobot_inbox (seq INTEGER PRIMARY KEY, bot_id BIGINT NOT NULL, "
                "update_id BIGINT NOT NULL, fingerprint VARCHAR(32) NOT NULL, chat_key VARCHAR(48), "
                "payload TEXT NOT NULL, received_at DATETIME NOT NULL, attempts INTEGER DEFAULT 0 NOT NULL, "
                "claimed_epoch BIGINT, done_at DATETIME)"))
            await conn.execute(sa.text("CREATE TABLE solobot_schema (version INTEGER PRIMARY KEY, "
                                       "applied_at DATETIME NOT NULL)"))
            await conn.execute(sa.text("INSERT INTO solobot_schema VALUES (2, '2026-01-01 00:00:00')"))
            await conn.execute(sa.text(
                "INSERT INTO solobot_inbox (bot_id, update_id, fingerprint, payload, received_at) "
                "VALUES (123456, 7, 'fp', '{}', '2026-01-01 00:00:00')"))
        await store.migrate()
        await store.leader.advance_epoch(instance_id="a", host="h", pid=1)
        t = await store.recovery.take_over(1, predecessor_died=True, convict=lambda d, a: True)
        assert t.watermark == 1 and not t.suspects
        assert [e.update_id for e in await store.recovery.claim_page(1, after=0, until=1, limit=5)] == [7]
        await store.close()

    run(scenario())
