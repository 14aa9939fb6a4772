"""Durable outbox: every result batch is on disk before its first POST, until a 2xx.

One SQLite file per *slot*. A process takes the first slot whose lock file it
can lock (``fcntl.flock``), so several worker processes sharing a state
directory never deliver each other's batches twice, and a process that starts
adopts the batches of slots nobody holds (a process that died, or a run that
used more processes than this one). POSIX only.

SQLite calls are blocking; the async methods run them in a thread.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from trapline.errors import WorkerError
from trapline.worker.results import item_image_id, item_subject

logger = logging.getLogger(__name__)

JsonDict = dict[str, Any]
Status = Literal["pending", "rejected"]

MAX_SLOTS = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT
);
"""


@dataclass(frozen=True)
class OutboxEntry:
    """One result batch as stored: ``body`` is the exact JSON POSTed to ``.../result/``."""

    id: int
    job_id: int
    body: str
    created_at: float
    attempts: int
    status: Status
    last_error: str | None

    @property
    def items(self) -> list[JsonDict]:
        data = json.loads(self.body)
        items = data.get("results") if isinstance(data, dict) else None
        return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []

    @property
    def image_ids(self) -> list[str]:
        return [item_image_id(i) for i in self.items]

    @property
    def reply_subjects(self) -> list[str]:
        return [item_subject(i) for i in self.items]


def encode_body(items: list[JsonDict]) -> str:
    # Compact separators: bodies with long score arrays reach several MB.
    return json.dumps({"results": items}, separators=(",", ":"), allow_nan=False)


class _SlotLock:
    """An exclusive, non-blocking ``flock`` on a slot's lock file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a batch the outbox has accepted survives a power cut, not only a crash.
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(_SCHEMA)
    return conn


def _row(row: tuple[Any, ...]) -> OutboxEntry:
    return OutboxEntry(
        id=row[0],
        job_id=row[1],
        body=row[2],
        created_at=row[3],
        attempts=row[4],
        status=row[5],
        last_error=row[6],
    )


_COLUMNS = "id, job_id, body, created_at, attempts, status, last_error"


class Outbox:
    """The outbox of one slot. Open with :meth:`open` (takes a free slot) and close when done."""

    def __init__(self, path: Path, lock: _SlotLock | None = None) -> None:
        self.path = path
        self._lock = lock
        self._conn = _connect(path)
        self._mutex = threading.Lock()

    @classmethod
    def open(cls, state_dir: Path) -> Outbox:
        """Take the first free slot in ``state_dir`` (created if missing)."""
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WorkerError(
                f"cannot create the worker state directory {state_dir}: {exc}"
            ) from exc
        for slot in range(MAX_SLOTS):
            lock = _SlotLock(state_dir / f"outbox-{slot}.lock")
            if lock.try_acquire():
                try:
                    return cls(state_dir / f"outbox-{slot}.sqlite3", lock)
                except sqlite3.Error as exc:
                    lock.release()
                    raise WorkerError(f"cannot open the outbox in {state_dir}: {exc}") from exc
        raise WorkerError(f"all {MAX_SLOTS} outbox slots in {state_dir} are locked by live workers")

    def close(self) -> None:
        with self._mutex:
            self._conn.close()
        if self._lock is not None:
            self._lock.release()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # -- synchronous API (thread-safe) --------------------------------------------------

    def add_sync(self, job_id: int, items: list[JsonDict]) -> OutboxEntry:
        body = encode_body(items)
        created = time.time()
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT INTO batches (job_id, body, created_at) VALUES (?, ?, ?)",
                (job_id, body, created),
            )
            row_id = cur.lastrowid
        assert row_id is not None
        return OutboxEntry(row_id, job_id, body, created, 0, "pending", None)

    def delete_sync(self, entry_id: int) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM batches WHERE id = ?", (entry_id,))

    def record_attempt_sync(self, entry_id: int, error: str | None) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE batches SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                (error, entry_id),
            )

    def mark_rejected_sync(self, entry_id: int, detail: str) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE batches SET status = 'rejected', last_error = ? WHERE id = ?",
                (detail, entry_id),
            )

    def split_sync(self, entry: OutboxEntry) -> tuple[OutboxEntry, OutboxEntry]:
        """Replace a batch by its two halves, atomically."""
        items = entry.items
        if len(items) < 2:
            raise ValueError("a batch of one item cannot be split")
        mid = len(items) // 2
        halves: list[OutboxEntry] = []
        with self._tx() as conn:
            for part in (items[:mid], items[mid:]):
                body = encode_body(part)
                cur = conn.execute(
                    "INSERT INTO batches (job_id, body, created_at, attempts) VALUES (?, ?, ?, ?)",
                    (entry.job_id, body, entry.created_at, entry.attempts),
                )
                assert cur.lastrowid is not None
                halves.append(
                    OutboxEntry(
                        cur.lastrowid,
                        entry.job_id,
                        body,
                        entry.created_at,
                        entry.attempts,
                        "pending",
                        entry.last_error,
                    )
                )
            conn.execute("DELETE FROM batches WHERE id = ?", (entry.id,))
        return halves[0], halves[1]

    def entries_sync(self, status: Status = "pending") -> list[OutboxEntry]:
        with self._mutex:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM batches WHERE status = ? ORDER BY id", (status,)
            ).fetchall()
        return [_row(r) for r in rows]

    def get_sync(self, entry_id: int) -> OutboxEntry | None:
        with self._mutex:
            row = self._conn.execute(
                f"SELECT {_COLUMNS} FROM batches WHERE id = ?", (entry_id,)
            ).fetchone()
        return _row(row) if row else None

    def adopt_orphans_sync(self) -> int:
        """Move the batches of unlocked sibling slots into this one; the number moved."""
        if self._lock is None:
            return 0
        moved = 0
        for lock_path in sorted(self.path.parent.glob("outbox-*.lock")):
            if lock_path == self._lock.path:
                continue
            db_path = lock_path.with_suffix(".sqlite3")
            if not db_path.exists():
                continue
            other_lock = _SlotLock(lock_path)
            if not other_lock.try_acquire():
                continue  # a live process owns it and delivers its own batches
            try:
                other = _connect(db_path)
                try:
                    rows = other.execute(f"SELECT {_COLUMNS} FROM batches ORDER BY id").fetchall()
                    if rows:
                        # Copy first, delete after: a crash in between duplicates a
                        # batch, which the server answers as duplicates; never loses one.
                        with self._tx() as conn:
                            conn.executemany(
                                "INSERT INTO batches (job_id, body, created_at, attempts, status,"
                                " last_error) VALUES (?, ?, ?, ?, ?, ?)",
                                [r[1:] for r in rows],
                            )
                        other.execute("DELETE FROM batches WHERE id <= ?", (rows[-1][0],))
                        moved += len(rows)
                        logger.info(
                            "adopted %d result batch(es) left in %s by an earlier worker",
                            len(rows),
                            db_path,
                        )
                finally:
                    other.close()
            finally:
                other_lock.release()
        return moved

    # -- async API ------------------------------------------------------------------------

    async def add(self, job_id: int, items: list[JsonDict]) -> OutboxEntry:
        return await asyncio.to_thread(self.add_sync, job_id, items)

    async def delete(self, entry_id: int) -> None:
        await asyncio.to_thread(self.delete_sync, entry_id)

    async def record_attempt(self, entry_id: int, error: str | None) -> None:
        await asyncio.to_thread(self.record_attempt_sync, entry_id, error)

    async def mark_rejected(self, entry_id: int, detail: str) -> None:
        await asyncio.to_thread(self.mark_rejected_sync, entry_id, detail)

    async def split(self, entry: OutboxEntry) -> tuple[OutboxEntry, OutboxEntry]:
        return await asyncio.to_thread(self.split_sync, entry)

    async def entries(self, status: Status = "pending") -> list[OutboxEntry]:
        return await asyncio.to_thread(self.entries_sync, status)

    async def adopt_orphans(self) -> int:
        return await asyncio.to_thread(self.adopt_orphans_sync)
