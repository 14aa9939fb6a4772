"""The real trapline server, in-process (uvicorn) on a socket bound before it starts.

Binding the socket here and handing it to uvicorn leaves no gap in which another
program could take the port between choosing it and listening on it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from trapline.ledger.db import create_engine, migrate, session_factory
from trapline.ledger.tokens import create_token
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


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    user_agent: str


class RequestLog:
    """Passes every request to the server unchanged and notes it, so a test can wait
    for a client (e.g. a watching CLI) to have reached the server."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen: list[SeenRequest] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            agent = headers.get(b"user-agent", b"").decode(errors="replace")
            self.seen.append(SeenRequest(scope["method"], scope["path"], agent))
        await self.app(scope, receive, send)


@dataclass
class RunningServer:
    url: str
    admin_token: str
    worker_token: str
    settings: ServerSettings
    app: Any
    requests: list[SeenRequest] = field(default_factory=list)

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
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
        app = create_app(settings)
        recorded = RequestLog(app)
        config = uvicorn.Config(
            recorded, host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name=f"uvicorn-{port}")
        try:
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("server exited at start")
                await asyncio.sleep(0.02)
            yield RunningServer(
                f"http://127.0.0.1:{port}", admin, worker, settings, app, recorded.seen
            )
        finally:
            server.should_exit = True
            await task
    finally:
        sock.close()
