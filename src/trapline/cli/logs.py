"""Logging set-up for CLI processes (library modules only create named loggers)."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler


def configure_logging(level: str = "INFO", *, rich: bool = True) -> None:
    """Configure the root logger once for this process."""
    handler: logging.Handler
    if rich:
        # stderr: stdout carries ids, tokens and JSON that scripts read.
        handler = RichHandler(
            console=Console(stderr=True),
            show_path=False,
            rich_tracebacks=False,
            log_time_format="%H:%M:%S",
        )
        fmt = "%(name)s: %(message)s"
    else:
        handler = logging.StreamHandler()
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Request logs of uvicorn/httpx at INFO drown the lines that matter.
    for noisy in ("httpx", "httpcore", "uvicorn.access", "nats"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
