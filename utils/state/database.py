"""Where the durable state lives, parsed once: the one reader of ``DATABASE_URL`` and ``STATE_DIR``.

Everything else asks a :class:`DatabaseTarget` for what it needs: SQLAlchemy's async URL, libpq's
DSN for the lock connections, the masked form for logs, host/port/database for error messages.

Sessions are tagged: every PostgreSQL connection of an instance carries ``application_name``
``solobot-<bot id>-<instance id>-<purpose>``, so a standby that fences a hung holder can end *all*
of its sessions (and the row locks they hold), not only the lock session.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from utils.base.dsn import DEFAULT_PG_PORT, SQLITE_FILE, DatabaseUrl, has_port, parse_database_url
from utils.base.private_path import check_private_file, create_private_file, ensure_private_dir
from utils.base.redact import Redactor
from utils.state.errors import SQLITE_LOCATION

log = logging.getLogger("solobot.state")

SQLITE_BUSY_TIMEOUT_MS = 30_000
#: A session left idle inside a transaction (its process paused or partitioned) is ended by the
#: server after this long, releasing its row locks even if no standby fences it.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 5_000
PG_POOL_SIZE = 4
PG_POOL_OVERFLOW = 4
PG_CONNECT_TIMEOUT_S = 5


def session_tag(bot_id: int, instance_id: str, purpose: str) -> str:
    """``application_name`` of one of this instance's sessions (63 bytes at most in PostgreSQL)."""
    return f"solobot-{bot_id}-{instance_id}-{purpose}"[:63]


def instance_tag_pattern(bot_id: int, instance_id: str) -> str:
    """A LIKE pattern matching every session of one instance."""
    return f"solobot-{bot_id}-{instance_id}-%"


@dataclass(frozen=True)
class DatabaseTarget:
    """The configured database, parsed once."""

    kind: str  # "sqlite" | "postgres"
    # Both carry the password: never in a repr (a traceback's locals, an assertion message).
    sqlalchemy_url: str = field(default="", repr=False)
    libpq_dsn: str = field(default="", repr=False)
    display: str = ""  # for logs: no password
    host: str | None = None
    port: int | None = None
    database: str | None = None
    sqlite_path: Path | None = None
    #: Where, for error lines: ``PostgreSQL host:port/database (user u)``; never the password.
    location: str = SQLITE_LOCATION
    #: Masks this target's password (and any other) in a text; made once with the target.
    redactor: Redactor = field(default_factory=Redactor, compare=False, repr=False)

    @property
    def is_postgres(self) -> bool:
        return self.kind == "postgres"

    @classmethod
    def parse(cls, database_url: str | DatabaseUrl | None, state_dir: Path) -> DatabaseTarget:
        """The target of *database_url*: as configuration parsed it (``Settings.database``), or a
        text taken apart here by the same rule (:mod:`utils.base.dsn`); None: SQLite in *state_dir*."""
        if not database_url:
            path = (state_dir / SQLITE_FILE).absolute()  # not resolve(): a symlink is refused, not followed
            return cls(kind="sqlite", sqlalchemy_url=f"sqlite+aiosqlite:///{path}", display=str(path),
                       sqlite_path=path)
        parts = database_url if isinstance(database_url, DatabaseUrl) else parse_database_url(database_url)
        if parts is None:  # configuration refuses it first; never echo it
            raise ValueError("DATABASE_URL is not a postgresql:// URL")
        # Built from the parts (utils/base/dsn.py: the one rule for where a password ends), not
        # re-parsed by SQLAlchemy's own rule, which splits a password with "@" differently.
        query = {k: v for k, v in parts.query.items() if k != "password"}
        single_host, _, port_text = parts.hosts.rpartition(":") if has_port(parts.hosts) else (parts.hosts, "", "")
        if "," in parts.hosts:  # several hosts: libpq's own syntax, through the query
            query["host"], single_host, port_text = parts.hosts, "", ""
        url = URL.create(
            "postgresql+psycopg", username=parts.user,
            password=parts.password if parts.password is not None else parts.query.get("password"),
            host=single_host.strip("[]") or None, port=int(port_text) if port_text.isdigit() else None,
            database=parts.database or None, query=query,
        )
        # libpq's key/value form, built from the parts: a password with spaces or other
        # specials survives (a re-rendered URL would not quote them all).
        dsn = make_conninfo("", **{
            "host": url.host, "port": url.port, "dbname": url.database, "user": url.username,
            "password": url.password, **{k: str(v) for k, v in url.query.items()},
        })
        return cls(
            kind="postgres",
            sqlalchemy_url=url.render_as_string(hide_password=False),
            libpq_dsn=dsn,
            display=url.set(drivername="postgresql").render_as_string(hide_password=True),
            host=url.host or "localhost",
            port=url.port or DEFAULT_PG_PORT,
            database=url.database,
            location=parts.location(),
            redactor=Redactor(database_url=parts),
        )

    def where(self) -> str:
        """``host:port/database`` (PostgreSQL) or the SQLite file, for messages."""
        if self.is_postgres:
            return f"{self.host}:{self.port}/{self.database or ''}"
        return str(self.sqlite_path)

    def create_engine(self, *, bot_id: int, instance_id: str) -> AsyncEngine:
        """The engine, without connecting (SQLite's files are prepared by ``StateStore.open``)."""
        if not self.is_postgres:
            engine = create_async_engine(self.sqlalchemy_url, connect_args={
                "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "factory": RollbackBeforeClose})
            _sqlite_serialised_writes(engine)
            return engine
        connect_args: dict[str, Any] = {
            "application_name": session_tag(bot_id, instance_id, "state"),
            "connect_timeout": PG_CONNECT_TIMEOUT_S,
            "options": f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}",
            # A silent server or a half-open connection (a failover, a dropped NAT entry) ends a
            # call within seconds, not the kernel's default of up to two hours: a lookup that
            # /health stopped waiting for must not keep a pooled connection that long.
            **PG_TCP_TIMEOUTS,
        }
        # The URL object, not its text: SQLAlchemy passes the parts to psycopg unmangled.
        url = make_url(self.sqlalchemy_url)
        # No pool_pre_ping: it costs a round trip per transaction. A connection that died with
        # the server fails its statement instead, and every caller retries (the pipeline keeps a
        # batch or its done marks until they are written).
        return create_async_engine(url, pool_size=PG_POOL_SIZE, max_overflow=PG_POOL_OVERFLOW,
                                   connect_args=connect_args)


#: libpq's TCP settings for every PostgreSQL connection (the state store's and the lock
#: backend's): a dead peer is noticed within seconds.
PG_TCP_TIMEOUTS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}


#: SQLite's companions of the database file in WAL mode: they hold committed transactions too.
SQLITE_COMPANIONS = ("-wal", "-shm")


def prepare_sqlite_files(path: Path) -> None:
    """The state directory and the SQLite files, private to this user before SQLite opens them.

    The directory is created 0700 (refused when a symlink, someone else's or writable by others);
    the database file is created 0600 before SQLite does (its -wal/-shm then inherit the mode);
    an existing database, -wal or -shm of someone else is refused, one of ours open to others is
    tightened to 0600 (:mod:`utils.base.private_path`). Whoever could write them could insert
    updates "from" an admin.
    """
    ensure_private_dir(path.parent, "STATE_DIR")
    create_private_file(path, "state database")
    for suffix in SQLITE_COMPANIONS:
        check_private_file(path.with_name(path.name + suffix), "state database")


class RollbackBeforeClose(sqlite3.Connection):
    """A SQLite connection that ends its transaction before it closes, always.

    A task cancelled in the middle of a statement (a leadership term's tasks at a stop, a call cut
    short by :func:`~utils.base.lookup.within`) makes SQLAlchemy close the connection, not roll it
    back; while a cursor of that statement is still referenced (by the cancelled task's traceback:
    a reference cycle, freed at the next garbage collection), ``sqlite3_close_v2`` only defers the
    close. The connection lives on as a zombie, its transaction open: it held the database's
    write lock, and every other connection (this process's, and every other process's on the same
    file) waited out its busy timeout, until a collection happened to run (seen: a leader whose
    shutdown overran, then never exited). A rollback first ends the transaction and releases the
    lock whatever becomes of the connection (SQLite aborts the statements still pending).
    """

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.rollback()
        super().close()


def _sqlite_serialised_writes(engine: AsyncEngine) -> None:
    """Every SQLite transaction ``BEGIN IMMEDIATE``; WAL with ``synchronous=NORMAL``.

    pysqlite's deferred transactions upgrade read locks to write locks late, which two processes
    turn into instant SQLITE_BUSY errors; taking the write lock up front makes them wait instead.
    WAL + NORMAL: a commit survives the process being killed (it is in the WAL file, which the OS
    keeps); a power loss can lose the last transactions since the last checkpoint's fsync (see
    docs/architecture.md). The database file itself is never corrupted.
    """

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
