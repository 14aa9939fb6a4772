"""SQLite connections that run each call on the event loop, not in a thread of their own.

aiosqlite hands every call (each statement, fetch, BEGIN and COMMIT) to a thread of
its own and wakes the event loop when it is done: two thread switches and a fight
for the GIL per call, which cost the server more CPU than the statements themselves
(a 16-image result post is about 15 calls). The ledger's statements are short and
indexed, and a file's writers are one at a time anyway, so they run inline here.

The one call that could wait long is taking the write lock (``BEGIN IMMEDIATE``)
while another process holds it: SQLite's busy handler would then sleep with the
whole server stopped. So the busy timeout is short, and a BEGIN that finds the file
locked is retried from asyncio, with backoff, for up to ``write_wait_s``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Generator
from functools import partial
from typing import Any

import aiosqlite

# SQLite's own wait for a lock, during which the event loop stands still: short.
BUSY_TIMEOUT_MS = 20
_RETRY_FIRST_S = 0.005
_RETRY_CAP_S = 0.2


class _RunNow:
    """Stands in for aiosqlite's queue to its thread (SQLAlchemy's dialect uses it
    directly to set ``isolation_level``): runs each call as it is put."""

    def put_nowait(self, item: tuple[asyncio.Future[Any] | None, Callable[[], Any]]) -> None:
        future, function = item
        try:
            result = function()
        except BaseException as exc:  # handed to whoever awaits, as aiosqlite's thread does
            if future is None:
                raise
            future.set_exception(exc)
            return
        if future is not None:
            future.set_result(result)


class InlineConnection(aiosqlite.Connection):
    """aiosqlite's connection, every call made on the caller's thread."""

    def __init__(self, connector: Callable[[], sqlite3.Connection], write_wait_s: float) -> None:
        super().__init__(connector, iter_chunk_size=256)
        self._tx = _RunNow()  # type: ignore[assignment]
        self._write_wait_s = write_wait_s

    def __await__(self) -> Generator[Any, None, InlineConnection]:
        return self._connect_inline().__await__()

    async def _connect_inline(self) -> InlineConnection:
        if self._connection is None:
            self._connection = self._connector()
        return self

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._running or self._connection is None:
            raise ValueError("Connection closed")
        if not _is_begin(args):
            return fn(*args, **kwargs)
        give_up = time.monotonic() + self._write_wait_s
        delay = _RETRY_FIRST_S
        while True:
            try:
                return fn(*args, **kwargs)
            except sqlite3.OperationalError as exc:
                # Nothing began: another process holds the write lock. Wait in asyncio.
                if not _is_locked(exc) or time.monotonic() + delay > give_up:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RETRY_CAP_S)


def _is_begin(args: tuple[Any, ...]) -> bool:
    return bool(args) and isinstance(args[0], str) and args[0].lstrip()[:5].upper() == "BEGIN"


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


def connector(write_wait_s: float) -> Callable[..., InlineConnection]:
    """What SQLAlchemy's aiosqlite dialect calls (``async_creator_fn``) to open a connection."""

    def connect(database: str, **kwargs: Any) -> InlineConnection:
        kwargs.pop("iter_chunk_size", None)
        kwargs["check_same_thread"] = False
        return InlineConnection(partial(sqlite3.connect, database, **kwargs), write_wait_s)

    return connect
