"""The ASGI application and the process around it (database, NATS, reconciler)."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from starlette.types import ASGIApp

import trapline
from trapline.ledger.db import (
    create_engine,
    create_read_engine,
    migrate,
    owns_pool,
    session_factory,
)
from trapline.queue import EmbeddedNats, TaskQueue
from trapline.server import api_jobs, api_worker, dashboard
from trapline.server.auth import Ctx, TokenCache
from trapline.server.context import AppContext
from trapline.server.edge import EdgeMiddleware, install_error_handlers
from trapline.server.metrics import Metrics
from trapline.server.reconciler import Reconciler
from trapline.server.signing import load_installation_id, load_signer
from trapline.settings import ServerSettings

log = logging.getLogger(__name__)


@asynccontextmanager
async def running_context(settings: ServerSettings) -> AsyncIterator[AppContext]:
    """Database migrated, NATS connected (embedded if no URL), reconciler running."""
    async with AsyncExitStack() as stack:
        engine = create_engine(settings.resolved_database_url())
        stack.push_async_callback(engine.dispose)
        await migrate(engine)
        sessions = session_factory(engine)
        reader = create_read_engine(engine)
        if owns_pool(reader, engine):
            stack.push_async_callback(reader.dispose)
        nats_url = settings.nats_url
        if not nats_url:
            embedded = EmbeddedNats(settings.data_dir.resolve() / "nats")
            embedded.start()
            stack.callback(embedded.stop)
            nats_url = embedded.url
        queue = TaskQueue(
            settings.ack_wait_s,
            settings.max_ack_pending,
            installation=await load_installation_id(sessions),
        )
        await queue.connect(nats_url, settings.nats_connect_timeout_s)
        stack.push_async_callback(queue.close)
        signer = await load_signer(sessions, settings.signed_url_ttl_s)
        ctx = AppContext(
            settings=settings,
            engine=engine,
            sessions=sessions,
            reads=session_factory(reader),
            queue=queue,
            signer=signer,
            tokens=TokenCache(),
            metrics=Metrics(),
            instance=f"{socket.gethostname()}:{os.getpid()}",
        )
        reconciler = Reconciler(ctx)
        reconciler.start()
        stack.push_async_callback(reconciler.stop)
        log.info(
            "trapline %s ready: database %s, NATS %s",
            trapline.__version__,
            engine.url.render_as_string(hide_password=True),
            nats_url,
        )
        yield ctx


def create_app(settings: ServerSettings | None = None) -> ASGIApp:
    """The server as an ASGI app; settings read once here."""
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with running_context(settings) as ctx:
            app.state.ctx = ctx
            yield

    app = FastAPI(
        title="trapline",
        version=trapline.__version__,
        description="Jobs over camera-trap images on pull-based workers (Antenna v2 worker API).",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # First: a folder job's image downloads are most of its requests, and routes are
    # matched in order.
    app.include_router(api_jobs.files_router)
    app.include_router(api_worker.router)
    app.include_router(api_jobs.router)
    app.include_router(dashboard.router)

    @app.get("/healthz", tags=["ops"])
    async def healthz(ctx: Ctx) -> JSONResponse:
        checks: dict[str, Any] = {"nats": ctx.queue.connected}
        try:
            async with ctx.reads() as session:
                await session.execute(text("SELECT 1"))
            checks["database"] = True
        except Exception as exc:  # any failure means "not healthy", with its reason
            checks["database"] = False
            checks["database_error"] = str(exc).splitlines()[0][:200]
        ok = checks["nats"] and checks["database"]
        body = {"status": "ok" if ok else "degraded", "version": trapline.__version__, **checks}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["ops"])
    async def metrics(ctx: Ctx) -> Response:
        return Response(ctx.metrics.export(), media_type=CONTENT_TYPE_LATEST)

    return EdgeMiddleware(app, settings.max_body_bytes)
