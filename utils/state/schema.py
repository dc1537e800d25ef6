"""The schema of solobot's durable state, and its idempotent migration.

Version 2 replaced the per-update ``solobot_processed`` record with the inbox: every update
fetched from Telegram (or, in webhook mode, delivered by it) is a row until it is done.
"""

from __future__ import annotations

import datetime as dt
import logging

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger("solobot.state")

SCHEMA_VERSION = 4  # 3 (in development): solobot_fsm or the inbox's started/deaths/set-aside columns; 4: both
#: Serialises concurrent migrations on PostgreSQL (an arbitrary, fixed advisory key).
MIGRATION_LOCK_KEY = 7160100001

metadata = sa.MetaData()

#: A primary key that is SQLite's rowid (fast, monotonic) and a bigint identity on PostgreSQL.
SEQ_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

schema_table = sa.Table(
    "solobot_schema",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)
leader_table = sa.Table(
    "solobot_leader",
    metadata,
    sa.Column("bot_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("instance_id", sa.String(64)),
    sa.Column("host", sa.String(255)),
    sa.Column("pid", sa.Integer),
    sa.Column("backend_pid", sa.Integer),  # PostgreSQL backend: the lock session, for fencing
    sa.Column("since", sa.DateTime(timezone=True)),
    sa.Column("heartbeat", sa.DateTime(timezone=True)),
    sa.Column("released", sa.Boolean, nullable=False, server_default=sa.false()),
)
offset_table = sa.Table(
    "solobot_offset",
    metadata,
    sa.Column("bot_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("next_offset", sa.BigInteger, nullable=False),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)
inbox_table = sa.Table(
    "solobot_inbox",
    metadata,
    sa.Column("seq", SEQ_TYPE, primary_key=True, autoincrement=True),
    sa.Column("bot_id", sa.BigInteger, nullable=False),
    sa.Column("update_id", sa.BigInteger, nullable=False),
    # Update ids restart (another Bot API server, Telegram's weekly reset): the id alone does not
    # identify an update; a re-delivered one is byte-for-byte the same, so id + content does.
    sa.Column("fingerprint", sa.String(32), nullable=False),
    # per-chat order: "c:<chat>" (the user's private chat for an update without one), "u:<user>"
    # (GLOBAL_USER) or NULL
    sa.Column("chat_key", sa.String(48)),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("claimed_epoch", sa.BigInteger),
    sa.Column("done_at", sa.DateTime(timezone=True)),  # NULL: waiting to be handled
    # Poison updates (utils/updates/poison.py, version 3): a durable "started" record while a
    # handler of a taken-over update runs (STARTED_WITH_OTHERS / STARTED_ALONE), the deaths it
    # was running at, and when it was set aside (set aside rows also have done_at: not waiting).
    sa.Column("run_started", sa.SmallInteger),
    sa.Column("deaths", sa.Integer, nullable=False, server_default="0"),
    sa.Column("alone_deaths", sa.Integer, nullable=False, server_default="0"),
    sa.Column("set_aside_at", sa.DateTime(timezone=True)),
    sa.UniqueConstraint("bot_id", "update_id", "fingerprint", name="uq_solobot_inbox_update"),
)
sa.Index("ix_solobot_inbox_waiting", inbox_table.c.bot_id, inbox_table.c.seq,
         sqlite_where=inbox_table.c.done_at.is_(None),
         postgresql_where=inbox_table.c.done_at.is_(None))
sa.Index("ix_solobot_inbox_received", inbox_table.c.bot_id, inbox_table.c.received_at)
sa.Index("ix_solobot_inbox_set_aside", inbox_table.c.bot_id, inbox_table.c.seq,
         sqlite_where=inbox_table.c.set_aside_at.is_not(None),
         postgresql_where=inbox_table.c.set_aside_at.is_not(None))
# A takeover's death count reads only the rows with a started record or a death: these keep it
# from scanning a large backlog before the first getUpdates.
sa.Index("ix_solobot_inbox_started", inbox_table.c.bot_id, inbox_table.c.run_started,
         sqlite_where=inbox_table.c.run_started.is_not(None),
         postgresql_where=inbox_table.c.run_started.is_not(None))
sa.Index("ix_solobot_inbox_suspects", inbox_table.c.bot_id, inbox_table.c.deaths,
         sqlite_where=sa.and_(inbox_table.c.deaths > 0, inbox_table.c.done_at.is_(None)),
         postgresql_where=sa.and_(inbox_table.c.deaths > 0, inbox_table.c.done_at.is_(None)))
#: Columns added to existing tables after version 2 (``create_all`` creates only missing tables).
ADDED_COLUMNS = (("solobot_inbox", ("run_started", "deaths", "alone_deaths", "set_aside_at")),)

posts_table = sa.Table(
    "solobot_posts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("bot_id", sa.BigInteger, nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("text", sa.Text),
    sa.Column("photo", sa.String(255)),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_by", sa.BigInteger),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("claimed_at", sa.DateTime(timezone=True)),
    sa.Column("sent_at", sa.DateTime(timezone=True)),
    sa.Column("message_id", sa.BigInteger),
    sa.Column("error", sa.Text),
    sa.Column("epoch", sa.BigInteger),
)
flags_table = sa.Table(
    "solobot_flags",
    metadata,
    sa.Column("bot_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("epoch", sa.BigInteger),
)

# -- aiogram FSM storage (utils/state/fsm.py): one row per full StorageKey ---------------------
#: None has no place in a primary key: a key without a thread or business connection is stored
#: with these (Telegram's thread ids are positive, its connection ids non-empty).
FSM_NO_THREAD = 0
FSM_NO_CONNECTION = ""
fsm_table = sa.Table(
    "solobot_fsm",
    metadata,
    sa.Column("bot_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("chat_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("user_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("thread_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("business_connection_id", sa.String(255), primary_key=True),
    sa.Column("destiny", sa.String(255), primary_key=True),
    sa.Column("state", sa.Text),
    sa.Column("data", sa.Text, nullable=False),  # a JSON object
    sa.Column("state_expires_at", sa.DateTime(timezone=True)),  # NULL: never (state_ttl unset)
    sa.Column("data_expires_at", sa.DateTime(timezone=True)),
    sa.Column("epoch", sa.BigInteger),  # the leader that wrote it
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)

#: Tables of earlier schema versions that nothing reads any more.
RETIRED_TABLES = ("solobot_processed",)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def aware(value: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive datetimes; everything here is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value


def add_missing_columns(sync: sa.Connection) -> None:
    """ALTER TABLE ADD COLUMN for :data:`ADDED_COLUMNS` an older table lacks (then its indexes)."""
    inspector = sa.inspect(sync)
    for table_name, names in ADDED_COLUMNS:
        if not inspector.has_table(table_name):
            continue  # create_all makes it whole
        table = metadata.tables[table_name]
        present = {c["name"] for c in inspector.get_columns(table_name)}
        for name in names:
            if name not in present:
                column = table.c[name]
                ddl = sa.schema.CreateColumn(column).compile(dialect=sync.dialect)
                sync.execute(sa.text(f"ALTER TABLE {table_name} ADD COLUMN {ddl}"))
        for index in table.indexes:
            index.create(sync, checkfirst=True)


async def migrate(engine: AsyncEngine) -> bool:
    """Bring the schema to :data:`SCHEMA_VERSION` idempotently; True if anything was applied.

    Run by a new leader right after it took the lock (never by a standby: a hung holder's open
    transaction must not keep a standby from reaching its lock wait). Concurrent runs serialise on
    an advisory lock (PostgreSQL) or SQLite's write lock.
    """
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            await conn.execute(sa.text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})"))
        present = None
        if await conn.run_sync(lambda sync: sa.inspect(sync).has_table(schema_table.name)):
            present = await conn.scalar(sa.select(sa.func.max(schema_table.c.version)))
        if present is not None and present >= SCHEMA_VERSION:
            return False
        await conn.run_sync(add_missing_columns)
        await conn.run_sync(metadata.create_all, checkfirst=True)
        for table in RETIRED_TABLES:
            await conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        await conn.execute(sa.insert(schema_table).values(version=SCHEMA_VERSION, applied_at=utcnow()))
        log.info("state schema at version %d (%s)", SCHEMA_VERSION, engine.dialect.name)
        return True
