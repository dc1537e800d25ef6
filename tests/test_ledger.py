"""The pipeline's pure bookkeeping: per-chat order, concurrency, offsets, done marks (milliseconds)."""

from __future__ import annotations

import pytest

from utils.updates.ledger import ChatQueues, DoneMarks, OffsetBook, QueuedUpdate


def item(seq: int, chat: str | None = "c:1", update_id: int | None = None) -> QueuedUpdate:
    return QueuedUpdate(seq=seq, update_id=update_id or 1000 + seq, chat_key=chat, attempt=1, payload="{}")


def test_one_at_a_time_per_chat_in_order_and_chats_concurrently() -> None:
    q = ChatQueues(concurrency=10)
    q.extend([item(1, "a"), item(2, "a"), item(3, "b"), item(4, "a")])
    first = q.take_runnable()
    assert [i.seq for i in first] == [1, 3], "one per chat, chats in arrival order"
    assert q.take_runnable() == []
    q.finish(first[0])
    assert [i.seq for i in q.take_runnable()] == [2], "the chat's next, only after the first finished"
    assert (q.running, q.waiting, q.held) == (2, 1, 3)


def test_out_of_order_finishes_keep_each_chat_in_order() -> None:
    q = ChatQueues(concurrency=10)
    q.extend([item(1, "a"), item(2, "b"), item(3, "a"), item(4, "b")])
    a1, b1 = q.take_runnable()
    q.finish(b1)  # b finishes before a
    assert [i.seq for i in q.take_runnable()] == [4]
    q.finish(a1)
    assert [i.seq for i in q.take_runnable()] == [3]


def test_saturation_and_round_robin_between_chats() -> None:
    q = ChatQueues(concurrency=2)
    q.extend([item(1, "a"), item(2, "a"), item(3, "a"), item(4, "b"), item(5, "c")])
    running = q.take_runnable()
    assert [i.seq for i in running] == [1, 4], "limit 2"
    q.finish(running[0])  # a's slot frees: c waited longer than a's next
    assert [i.seq for i in q.take_runnable()] == [5]


def test_stuck_handler_holds_only_its_chat() -> None:
    q = ChatQueues(concurrency=3)
    q.push(item(1, "slow"))
    [stuck] = q.take_runnable()
    for seq in range(2, 50):
        q.push(item(seq, f"chat{seq}"))
        started = q.take_runnable()
        assert started, "other chats keep running"
        for s in started:
            q.finish(s)
    assert [i.seq for i in q.running_updates()] == [stuck.seq]


def test_updates_without_a_chat_run_on_their_own() -> None:
    q = ChatQueues(concurrency=5)
    q.extend([item(1, None), item(2, None)])
    assert [i.seq for i in q.take_runnable()] == [1, 2]


def test_drop_waiting_at_stop_keeps_running_and_duplicates_are_refused() -> None:
    q = ChatQueues(concurrency=1)
    q.extend([item(1, "a"), item(2, "b"), item(3, "a")])
    [running] = q.take_runnable()
    assert not q.push(item(1, "a")), "already held"
    dropped = q.drop_waiting()
    assert sorted(i.seq for i in dropped) == [2, 3]
    assert q.held == 1 and q.knows(1) and not q.knows(2)
    q.finish(running)  # a cancelled handler is finished too (not marked done by the caller)
    assert q.held == 0 and q.take_runnable() == []
    with pytest.raises(KeyError):
        q.finish(running)


def test_offset_follows_batches_and_recognises_restarted_ids() -> None:
    book = OffsetBook(stored=None)
    assert book.offset is None
    assert not book.after_batch(None, [5, 6, 7])
    assert book.offset == 8
    assert not book.after_batch(8, [])
    assert book.offset == 8
    # The server restarted its ids (served from its head): follow them, say so.
    assert book.after_batch(8, [2, 3])
    assert book.offset == 4
    assert not book.after_batch(4, [4])
    assert book.offset == 5


def test_stored_offset_beyond_a_new_server_tail() -> None:
    book = OffsetBook(stored=5031)
    assert book.after_batch(5031, [1001])
    assert book.offset == 1002


def test_done_marks_group_commit() -> None:
    marks = DoneMarks(max_batch=3, max_delay=0.005)
    assert marks.due_in(0.0) is None
    marks.add(1, now=10.0)
    assert marks.due_in(10.0) == pytest.approx(0.005)
    assert marks.due_in(10.01) == 0.0
    marks.add(2, now=10.001)
    marks.add(3, now=10.002)
    assert marks.due_in(10.002) == 0.0, "full batch: now"
    taken = marks.take()
    assert taken == [1, 2, 3] and len(marks) == 0
    marks.add(4, now=11.0)
    marks.put_back(taken, now=11.5)
    assert marks.take() == [1, 2, 3, 4]


def test_a_handler_waiting_for_a_send_slot_frees_its_concurrency_slot_not_its_chat() -> None:
    q = ChatQueues(concurrency=1)
    q.extend([item(1, "a"), item(2, "a"), item(3, "b"), item(4, "c")])
    [a1] = q.take_runnable()
    assert q.take_runnable() == [], "limit 1"
    q.park(a1, True)
    [b] = q.take_runnable()
    assert b.seq == 3, "another chat runs while a's handler waits; a's next update does not"
    q.park(a1, False)
    assert q.running == 2 and q.take_runnable() == [], "back from waiting, above the limit for now"
    q.finish(b)
    assert q.take_runnable() == []
    q.finish(a1)
    assert [i.seq for i in q.take_runnable()] == [4]
