"""Read sessions never wait for a writer; writers of one process queue for each other
instead of sleeping in SQLite's busy handler. Real database files, real connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.sqlite_lock import write_lock_held_by_another_process
from trapline.ledger.db import (
    create_engine,
    create_read_engine,
    migrate,
    owns_pool,
    session_factory,
)
from trapline.ledger.models import Project

WRITERS = 8
ROWS_PER_WRITER = 50


@pytest.fixture
async def sqlite_file(tmp_path: Path) -> AsyncIterator[Path]:
    """A migrated SQLite ledger file, with the default project."""
    path = tmp_path / "ledger.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        await migrate(engine)
    finally:
        await engine.dispose()
    yield path


async def test_a_read_session_answers_while_another_process_holds_the_write_lock(
    sqlite_file: Path,
) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{sqlite_file}")
    reader = create_read_engine(engine)
    try:
        # A read that took the write lock would sleep in the busy handler, then fail.
        async with (
            write_lock_held_by_another_process(sqlite_file),
            session_factory(reader)() as session,
        ):
            names = (await session.scalars(select(Project.name))).all()
    finally:
        await reader.dispose()
        await engine.dispose()
    assert names == ["default"]  # the last commit; never the other process's open write


async def test_a_read_session_refuses_to_write(database_url: str) -> None:
    engine = create_engine(database_url)
    reader = create_read_engine(engine)
    try:
        await migrate(engine)
        with pytest.raises(DBAPIError, match=r"(?i)read.?only"):
            async with session_factory(reader)() as session, session.begin():
                session.add(Project(id=2, name="written by a reader"))
        async with session_factory(engine)() as session:
            projects = await session.scalar(select(func.count()).select_from(Project))
    finally:
        if owns_pool(reader, engine):
            await reader.dispose()
        await engine.dispose()
    assert projects == 1


def _without_busy_handler(engine: AsyncEngine) -> None:
    """Turn SQLite's busy handler off on every connection of ``engine``: a writer that met
    the lock held by another connection would fail at once ("database is locked")."""

    @event.listens_for(engine.sync_engine, "connect")
    def _no_busy_wait(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=0")
        cur.close()


async def test_concurrent_writers_in_one_process_queue_for_each_other_not_for_the_lock(
    sqlite_file: Path,
) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{sqlite_file}")
    _without_busy_handler(engine)
    sessions = session_factory(engine)

    async def writer(n: int) -> None:
        # One row per statement: each a round trip that lets the other writers run.
        async with sessions() as session, session.begin():
            for i in range(ROWS_PER_WRITER):
                session.add(Project(id=1000 * (n + 1) + i, name=f"writer {n}"))
                await session.flush()

    try:
        await asyncio.gather(*(writer(n) for n in range(WRITERS)))
        async with sessions() as session:
            written = await session.scalar(
                select(func.count()).select_from(Project).where(Project.name.like("writer %"))
            )
    finally:
        await engine.dispose()
    assert written == WRITERS * ROWS_PER_WRITER


async def test_a_writer_waits_for_another_processs_write_lock_without_stopping_the_server(
    sqlite_file: Path,
) -> None:
    """SQLite runs on the event loop: a BEGIN that finds the file locked by another
    process must wait in asyncio, not in SQLite's busy handler with everything stopped."""
    engine = create_engine(f"sqlite+aiosqlite:///{sqlite_file}")
    sessions = session_factory(engine)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def write() -> None:
        async with sessions() as session, session.begin():
            session.add(Project(id=7, name="after the lock"))

    clock = asyncio.create_task(ticker())
    try:
        async with write_lock_held_by_another_process(sqlite_file):
            writing = asyncio.create_task(write())
            await asyncio.sleep(0.5)
            waited_ticks, written_early = ticks, writing.done()
        await asyncio.wait_for(writing, 10)
        async with sessions() as session:
            name = await session.scalar(select(Project.name).where(Project.id == 7))
    finally:
        clock.cancel()
        await engine.dispose()
    assert not written_early  # it did wait for the other process
    assert waited_ticks >= 20  # and the loop ran meanwhile (50 ticks if never stalled)
    assert name == "after the lock"
