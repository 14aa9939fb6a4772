"""Database engine, sessions and migrations (SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, make_url, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from trapline.ledger import inline_sqlite

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Serializes migrations when several server processes start on one PostgreSQL database.
_PG_MIGRATION_LOCK = 7_411_093


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


# How long a writer waits for the write lock, whichever way it queues: in asyncio for
# this process's one write connection, and in asyncio too (inline_sqlite retries its
# BEGIN) while another process holds the file's.
WRITE_WAIT_S = 30


def _sqlite_connect_args() -> dict[str, Any]:
    return {
        "timeout": inline_sqlite.BUSY_TIMEOUT_MS / 1000,
        "async_creator_fn": inline_sqlite.connector(WRITE_WAIT_S),
    }


def create_engine(url: str) -> AsyncEngine:
    """The engine for writes (and migrations).

    On SQLite: WAL, a busy timeout, foreign keys, and ONE pooled connection, so the
    writers of this process queue in asyncio (FIFO, nobody sleeping in SQLite's busy
    handler) and each transaction takes the write lock up front; the busy timeout is
    left for other processes on the same file. Never open a second ``sessions()``
    session while holding one: it would wait for the connection the first one holds.
    """
    if url.startswith("sqlite"):
        path = make_url(url).database
        one_connection: dict[str, Any] = {}  # in memory, there is only one anyway
        if not _in_memory(path):
            Path(str(path)).parent.mkdir(parents=True, exist_ok=True)
            one_connection = {"pool_size": 1, "max_overflow": 0, "pool_timeout": WRITE_WAIT_S}
        engine = create_async_engine(url, connect_args=_sqlite_connect_args(), **one_connection)
        _sqlite_connections(engine, pragmas=["journal_mode=WAL", "synchronous=NORMAL"])

        # aiosqlite opens transactions lazily; BEGIN IMMEDIATE takes the write lock up
        # front so a writer in another process never fails to upgrade a read lock.
        @event.listens_for(engine.sync_engine, "begin")
        def _begin_immediate(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)
    # A list of rows goes as multi-row INSERTs (1,000 rows each), as psycopg2's dialect
    # does, instead of asyncpg's executemany: one statement per row, which also fires the
    # statement-level counting triggers once per row (migration 0003) — 2-3x the time.
    engine.dialect.use_insertmanyvalues_wo_returning = True
    return engine


def _in_memory(database: str | None) -> bool:
    return database in (None, "", ":memory:")


def _sqlite_connections(engine: AsyncEngine, pragmas: list[str]) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        for pragma in [
            *pragmas,
            f"busy_timeout={inline_sqlite.BUSY_TIMEOUT_MS}",
            "foreign_keys=ON",
        ]:
            cur.execute(f"PRAGMA {pragma}")
        cur.close()
        # Transactions are begun by the "begin" listeners, not by the driver.
        dbapi_conn.isolation_level = None


def create_read_engine(engine: AsyncEngine) -> AsyncEngine:
    """The engine for read-only sessions, refusing writes.

    On a SQLite file: a pool of its own whose transactions begin DEFERRED: under WAL
    a reader sees the last commit and neither waits for the writer nor holds it up.
    On PostgreSQL (or in-memory SQLite, which a second pool could not see): ``engine``
    itself, its transactions READ ONLY on PostgreSQL.
    """
    if not is_sqlite(engine):
        return engine.execution_options(postgresql_readonly=True)
    if _in_memory(engine.url.database):
        return engine
    reader = create_async_engine(engine.url, connect_args=_sqlite_connect_args())
    _sqlite_connections(reader, pragmas=["query_only=ON"])

    @event.listens_for(reader.sync_engine, "begin")
    def _begin_deferred(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN DEFERRED")

    return reader


def owns_pool(reader: AsyncEngine, engine: AsyncEngine) -> bool:
    """Whether ``reader`` has connections of its own to dispose of."""
    return reader.sync_engine.pool is not engine.sync_engine.pool


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def refresh_statistics(engine: AsyncEngine) -> None:
    """After a job's images are in (PostgreSQL): the planner's statistics of the image rows.

    Without them a freshly filled table looks empty, and PostgreSQL plans the result
    UPDATE (``job_id = … AND image_id IN (…) AND state IN (…)``) through the (job, state)
    index: a scan of every open image of the job per result post — seconds each at a
    million images. SQLite's statistics are fixed by migration 0003.
    """
    if is_sqlite(engine):
        return
    async with engine.connect() as conn:
        await conn.execute(text("ANALYZE job_images"))
        await conn.commit()


def _alembic_config(connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
    command.upgrade(_alembic_config(connection), "head")


async def migrate(engine: AsyncEngine) -> None:
    """Apply every pending migration (idempotent; safe when several servers start at once)."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)
    log.debug("database migrated to head")


@asynccontextmanager
async def open_database(
    url: str,
) -> AsyncIterator[tuple[AsyncEngine, async_sessionmaker[AsyncSession]]]:
    """Engine + session factory with migrations applied; disposed on exit."""
    engine = create_engine(url)
    try:
        await migrate(engine)
        yield engine, session_factory(engine)
    finally:
        await engine.dispose()
