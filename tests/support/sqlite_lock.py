"""The write lock of a SQLite file held by a connection outside the code under test, as
another process on the same file would hold it."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path


@asynccontextmanager
async def write_lock_held_by_another_process(path: Path) -> AsyncIterator[None]:
    """A plain sqlite3 connection in the middle of a write transaction (an uncommitted
    project 99) until the block ends, then rolled back. Taken in a thread: a server in
    this event loop may be committing meanwhile, and must be able to."""
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")
        other.execute("INSERT INTO projects (id, name, created_at) VALUES (99, 'uncommitted', 0)")
        try:
            yield
        finally:
            other.execute("ROLLBACK")
    finally:
        other.close()
