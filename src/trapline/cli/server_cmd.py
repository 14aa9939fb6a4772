"""``trapline server``: the HTTP server (uvicorn) with its database, queue and reconciler."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
from types import FrameType
from typing import Annotated, Any

import typer
import uvicorn

from trapline.cli.client import LogLevelOpt, cli_errors, fail, setup_logging
from trapline.errors import ConfigError
from trapline.settings import ServerSettings

log = logging.getLogger(__name__)

EXIT_STARTUP_FAILED = 3


class ShortTracebacks(logging.Filter):
    """Shortens uvicorn's startup tracebacks to their last line unless at DEBUG.

    Starlette hands uvicorn a formatted traceback when the lifespan fails (database
    or NATS unreachable): expected failures, which deserve one line, not thirty.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            return True
        message = record.getMessage()
        if message.startswith("Traceback (most recent call last)"):
            lines = [ln for ln in message.strip().splitlines() if ln.strip()]
            record.msg, record.args = f"startup failed: {lines[-1]}", None
        lifespan = "lifespan" in str(record.msg)
        if lifespan and record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage().strip()}: {type(exc).__name__}: {exc}"
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


class StoppableServer(uvicorn.Server):
    """uvicorn, but a stop signal also ends a start that hangs (database or NATS unreachable).

    uvicorn looks at ``should_exit`` only once the app has started; a lifespan that
    keeps retrying a connection would otherwise ignore SIGTERM for good.
    """

    serve_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        task = self.serve_task
        if not self.started and task is not None and not task.done():
            task.get_loop().call_soon_threadsafe(task.cancel)

    async def serve_until_stopped(self) -> bool:
        """Serve; False when stopped by a signal before the app had started."""
        self.serve_task = asyncio.create_task(self.serve())
        try:
            await self.serve_task
        except asyncio.CancelledError:
            if self.started:
                raise
            return False
        return True


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def server_config(settings: ServerSettings) -> uvicorn.Config:
    """uvicorn's config for ``create_app(settings)``, logging through our handlers.

    uvloop and httptools where installed (uvloop is not on Windows): every worker
    request costs less CPU on them than on asyncio's loop and h11's pure-Python parser.
    """
    from trapline.server.app import create_app

    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop" if _installed("uvloop") else "asyncio",
        http="httptools" if _installed("httptools") else "h11",
        lifespan="on",
        log_config=None,  # keep the logging configure_logging set up
        proxy_headers=True,
        timeout_graceful_shutdown=30,
    )


def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to listen on [default: 127.0.0.1].")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on [default: 8000].")] = None,
    log_level: LogLevelOpt = None,
) -> None:
    """Run the trapline server until SIGTERM or Ctrl-C (then stop gracefully)."""
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    with cli_errors():
        settings = ServerSettings(**overrides)
        # Plain timestamped lines when logs go to a file or a journal, Rich on a terminal.
        setup_logging(log_level, default=settings.log_level, rich=sys.stderr.isatty())
        logging.getLogger("uvicorn.error").addFilter(ShortTracebacks())
        if not settings.nats_url:
            from trapline.queue.embedded import find_nats_server

            # Checked here so a missing binary is one line, not a failed lifespan.
            try:
                find_nats_server()
            except ConfigError as exc:
                fail(str(exc))
        config = server_config(settings)
        server = StoppableServer(config)
        # uvicorn installs SIGTERM/SIGINT handlers: it stops accepting, lets running
        # requests finish, then runs the lifespan shutdown (reconciler, NATS, database).
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            served = runner.run(server.serve_until_stopped())
        if not served:
            fail("stopped before the server had started", EXIT_STARTUP_FAILED)
        if not server.started:
            fail(
                f"server did not start on {settings.host}:{settings.port} (see the log above)",
                EXIT_STARTUP_FAILED,
            )


def register(app: typer.Typer) -> None:
    """Add ``trapline server``."""
    app.command("server")(serve)
