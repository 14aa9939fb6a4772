"""Everything a server process holds: settings, database, queue. Nothing a restart would lose."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from trapline.queue import TaskQueue
from trapline.server.signing import UrlSigner
from trapline.settings import ServerSettings


@dataclass
class AppContext:
    settings: ServerSettings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    queue: TaskQueue
    signer: UrlSigner
    instance: str = field(default="")
