"""Everything a server app holds: settings, database, queue, and its own metrics and
token cache. Nothing a restart would lose (counters and cached tokens start afresh)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from trapline.queue import TaskQueue
from trapline.server.metrics import Metrics
from trapline.server.signing import UrlSigner
from trapline.settings import ServerSettings

if TYPE_CHECKING:  # auth depends on this module at run time
    from trapline.server.auth import TokenCache


@dataclass
class AppContext:
    settings: ServerSettings
    engine: AsyncEngine
    # Writes, and reads that must see their own transaction's writes. On SQLite one
    # connection: never open a second ``sessions()`` session while holding one.
    sessions: async_sessionmaker[AsyncSession]
    # Read-only work: never waits for a writer (transactions refuse writes).
    reads: async_sessionmaker[AsyncSession]
    queue: TaskQueue
    signer: UrlSigner
    tokens: TokenCache
    metrics: Metrics
    instance: str = field(default="")
