"""The real trapline server on a free port, in-process (uvicorn) or as a subprocess."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from trapline.ledger.db import create_engine, migrate, session_factory
from trapline.ledger.tokens import create_token
from trapline.queue.embedded import free_port
from trapline.server.app import create_app
from trapline.settings import ServerSettings


async def make_tokens(database_url: str) -> tuple[str, str]:
    """(admin key, worker key) created directly on the database, as the CLI does."""
    engine = create_engine(database_url)
    try:
        await migrate(engine)
        async with session_factory(engine)() as session, session.begin():
            admin = await create_token(session, "test-admin", "admin", None)
            worker = await create_token(session, "test-worker", "worker", 1)
    finally:
        await engine.dispose()
    return admin, worker


@dataclass
class RunningServer:
    url: str
    admin_token: str
    worker_token: str
    settings: ServerSettings
    app: Any

    def client(self, token: str | None = None, **headers: str) -> httpx.AsyncClient:
        key = token or self.admin_token
        return httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Token {key}", **headers},
            timeout=30,
        )

    def worker_client(self, name: str = "test-worker", worker_id: str = "w1") -> httpx.AsyncClient:
        return self.client(self.worker_token, **{"X-Worker-Name": name, "X-Worker-Id": worker_id})

    @property
    def ctx(self) -> Any:
        return self.app.app.state.ctx


@asynccontextmanager
async def start_server(settings: ServerSettings) -> AsyncIterator[RunningServer]:
    admin, worker = await make_tokens(settings.resolved_database_url())
    port = free_port()
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server exited at start")
        await asyncio.sleep(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", admin, worker, settings, app)
    finally:
        server.should_exit = True
        await task
