"""The crash-takeover delay: waited only while the last holder could still act.

The policy in-process (:meth:`LockBackend.takeover_delay` over a grant), the PostgreSQL
mechanism's :func:`~utils.locking.postgres_backend.settle`, and its view of a predecessor's
sessions against the real server (``end_leftover_sessions``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.conftest import DATABASE_URL
from utils.locking.backend import Grant, LockBackend
from utils.locking.postgres_backend import settle
from utils.state import leader as sql
from utils.state.database import instance_tag_pattern, session_tag
from utils.state.leader import Takeover


def policy() -> LockBackend:
    """Only what takeover_delay reads: the policy's inputs, no lock."""
    return LockBackend(None, None, instance_id="me", stale_seconds=3.0, takeover=True)  # type: ignore[arg-type]


def takeover(*, released: bool = False, age: float | None = 0.2) -> Takeover:
    return Takeover(epoch=7, previous_released=released, previous_instance="old", previous_heartbeat_age=age)


@pytest.mark.parametrize(("released", "age", "gone", "delay"), [
    (False, 0.2, False, 0.5),  # vanished uncleanly, lease may run, sessions left: wait
    (False, None, False, 0.5),  # heartbeat age unknown: wait
    (True, 0.2, False, 0.0),  # released in order
    (False, 1.5, False, 0.0),  # its lease ran out (renew deadline 0.5 x 3 s)
    (False, 0.2, True, 0.0),  # no session left on the server: killed, cannot act
])
def test_delay_only_while_the_last_holder_could_act(released: bool, age: float | None, gone: bool,
                                                    delay: float) -> None:
    grant = Grant(takeover(released=released, age=age), settle(predecessor_gone=gone, waited=0.0))
    assert policy().takeover_delay(grant) == delay


def test_the_file_mechanism_never_waits() -> None:
    """A vanished flock holder is a dead one: its grant settles at once, whatever the record says."""
    assert policy().takeover_delay(Grant(takeover(released=False, age=0.2))) == 0.0


@pytest.fixture
def sessions() -> Iterator[list[psycopg.Connection[Any]]]:
    opened: list[psycopg.Connection[Any]] = []
    yield opened
    for conn in opened:
        conn.close()


async def test_leftover_sessions_in_a_transaction_are_ended_the_rest_counted(
        sessions: list[psycopg.Connection[Any]]) -> None:
    bot_id, old = 424242, "0ldinstance1"

    def open_session(purpose: str) -> psycopg.Connection[Any]:
        conn = psycopg.connect(DATABASE_URL, application_name=session_tag(bot_id, old, purpose))
        sessions.append(conn)
        return conn

    idle = open_session("monitor")
    idle.autocommit = True
    in_transaction = open_session("state")
    in_transaction.execute("SELECT 1")  # psycopg opened a transaction; it stays open (idle in transaction)
    async with await psycopg.AsyncConnection.connect(DATABASE_URL, autocommit=True) as conn:
        pattern = instance_tag_pattern(bot_id, old)
        assert await sql.end_leftover_sessions(conn, pattern) == (1, 1)
        idle.close()
        # The terminated backend and the closed one leave pg_stat_activity within moments.
        for _ in range(500):
            if await sql.open_sessions(conn, pattern) == 0:
                break
            await conn.execute("SELECT pg_sleep(0.01)")
        assert await sql.open_sessions(conn, pattern) == 0
        assert await sql.end_leftover_sessions(conn, pattern) == (0, 0)


async def test_a_server_restart_after_the_last_heartbeat_is_recognised() -> None:
    async with await psycopg.AsyncConnection.connect(DATABASE_URL, autocommit=True) as conn:
        # A temporary table shadows the real one for this session only.
        await conn.execute("CREATE TEMP TABLE solobot_leader (bot_id bigint, heartbeat timestamptz)")
        await conn.execute("INSERT INTO solobot_leader VALUES (1, now()), "
                           "(2, pg_postmaster_start_time() - interval '1 second')")
        assert await sql.restarted_since_heartbeat(conn, 1) is False
        assert await sql.restarted_since_heartbeat(conn, 2) is True
        assert await sql.restarted_since_heartbeat(conn, 3) is False, "no leader row: nothing to say"


def test_time_spent_waiting_for_leftovers_counts_against_the_delay() -> None:
    waited = Grant(takeover(), settle(predecessor_gone=False, waited=0.3))
    assert policy().takeover_delay(waited) == pytest.approx(0.2)
    assert policy().takeover_delay(Grant(takeover(), settle(predecessor_gone=False, waited=0.7))) == 0.0
