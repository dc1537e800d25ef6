"""The update pipeline as the sink of both sources, in-process: it answers its room after every
batch (``INBOX_MAX`` minus what it holds unfinished), a source told 0 waits in ``until_room``, and
webhook adoption claims no more than the room. No Telegram: the handlers are held by an event."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiogram import Bot, Dispatcher
from aiogram.types import Message, Update

from tests.daemon import wait_for
from tests.test_state_store import fresh_store
from utils.base.lease import Lease
from utils.state.store import StateStore
from utils.updates.pipeline import UpdatePipeline, to_new_update
from utils.updates.stats import UpdateStats

INBOX_MAX = 3


def update(update_id: int) -> Update:
    """A message in its own chat: nothing orders it behind another."""
    return Update.model_validate({
        "update_id": update_id,
        "message": {"message_id": update_id, "date": 0, "text": "hi",
                    "chat": {"id": update_id, "type": "private"}},
    })


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StateStore]:
    s = await fresh_store("sqlite", tmp_path)
    yield s
    await s.close()


@pytest.fixture
async def sink(store: StateStore) -> AsyncIterator[tuple[UpdatePipeline, asyncio.Event]]:
    """A started pipeline whose handlers wait for the event (so what it takes, it holds)."""
    go = asyncio.Event()
    dp = Dispatcher()

    @dp.message()
    async def held(message: Message) -> None:
        await go.wait()

    takeover = await store.leader.advance_epoch(instance_id="t", host="h", pid=1)

    async def verify() -> bool:
        return True

    bot = Bot("123456:" + "A" * 35)
    pipeline = UpdatePipeline(bot, dp, store, UpdateStats(), step_down=lambda _why: None,
                              inbox_max=INBOX_MAX, sweep_unclaimed=False)
    await pipeline.start(Lease(takeover.epoch, verify=verify, renew_deadline=60.0))
    # The (empty) backlog is paged in by a task: until it is, adoption takes nothing.
    await wait_for(lambda: not pipeline.resuming, 10, message="the takeover's backlog loaded")
    yield pipeline, go
    go.set()
    await pipeline.stop()
    await bot.session.close()


async def test_fetched_batches_are_answered_with_the_room_left(
        sink: tuple[UpdatePipeline, asyncio.Event]) -> None:
    pipeline, go = sink
    assert pipeline.room == INBOX_MAX
    assert await pipeline.put_fetched([update(1), update(2)], next_offset=3) == 1
    assert await pipeline.put_fetched([update(3), update(4)], next_offset=5) == 0, "full (over by one)"
    waiting = asyncio.create_task(pipeline.until_room())
    done, _ = await asyncio.wait({waiting}, timeout=0.05)
    assert not done, "a source told 0 waits"
    go.set()
    assert await asyncio.wait_for(waiting, 5) > 0, "until_room returns the room once handlers finish"


async def test_adoption_claims_no_more_than_the_room(
        sink: tuple[UpdatePipeline, asyncio.Event], store: StateStore) -> None:
    pipeline, go = sink
    rows = [to_new_update(update(i)) for i in range(10, 15)]
    await store.inbox.store_batch(rows, epoch=None)  # five rows a receiver stored, unclaimed
    assert await pipeline.take_stored() == 0, "three taken, the room is used up: more may wait"
    assert await store.inbox.has_unclaimed(), "the other two wait in the database, not in memory"
    go.set()
    await asyncio.wait_for(pipeline.until_room(), 5)
    assert await pipeline.take_stored() > 0, "the rest taken, room left: nothing more waits"
    assert not await store.inbox.has_unclaimed()


async def test_a_full_claim_says_more_may_wait_even_when_handlers_made_room_meanwhile(
        sink: tuple[UpdatePipeline, asyncio.Event], store: StateStore) -> None:
    """The room after the claim is no proof that nothing waits: handlers finishing during the claim
    free room again. A claim that took all it asked for answers 0 (more may wait)."""
    pipeline, go = sink
    await store.inbox.store_batch([to_new_update(update(i)) for i in (20, 21)], epoch=None)
    assert await pipeline.take_stored() == 1, "two taken of a room of three: none left"
    await store.inbox.store_batch([to_new_update(update(i)) for i in range(22, 27)], epoch=None)
    go.set()  # the two running handlers finish while the next claim is under way
    assert await pipeline.take_stored() == 0, "one asked for, one taken: more may wait"
    assert await store.inbox.has_unclaimed()
    while await store.inbox.has_unclaimed():  # what the webhook's adoption loop does with a 0
        await asyncio.wait_for(pipeline.until_room(), 5)
        await pipeline.take_stored()
