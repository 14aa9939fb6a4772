"""``trapline worker``: pull tasks from a trapline (or Antenna) server and process them."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.live import Live
from rich.table import Table

from trapline.cli.logs import configure_logging
from trapline.errors import TraplineError
from trapline.settings import WorkerSettings
from trapline.worker import WorkerStats, run_worker, serve
from trapline.worker.devices import pin_device, visible_gpus
from trapline.worker.supervisor import EXIT_CANNOT_START, supervise

logger = logging.getLogger(__name__)

_err = Console(stderr=True)


def _fail(message: str, code: int = EXIT_CANNOT_START) -> typer.Exit:
    _err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _settings(overrides: dict[str, object]) -> WorkerSettings:
    try:
        return WorkerSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()
        )
        raise _fail(f"invalid worker settings: {problems}") from None


class _Progress:
    """Per-stage counts and rates for ``--progress``, rendered with rich."""

    def __init__(self, live: Live) -> None:
        self._live = live
        self._last: tuple[float, WorkerStats] | None = None

    def __call__(self, stats: WorkerStats) -> None:
        now = time.monotonic()
        rates: dict[str, float] = {}
        if self._last is not None:
            then, prev = self._last
            dt = max(now - then, 1e-6)
            for name in ("reserved", "downloaded", "computed", "delivered"):
                rates[name] = (getattr(stats, name) - getattr(prev, name)) / dt
        self._last = (now, stats)
        table = Table(title=f"trapline worker — {stats.elapsed_s:.0f} s", expand=False)
        table.add_column("stage")
        table.add_column("images", justify="right")
        table.add_column("per s", justify="right")
        for name in ("reserved", "downloaded", "computed", "delivered"):
            table.add_row(name, str(getattr(stats, name)), f"{rates.get(name, 0.0):.1f}")
        table.add_row("reported failed", str(stats.failed), "")
        table.add_row("released", str(stats.released), "")
        table.add_row("kept in outbox", str(stats.kept), "")
        held = ", ".join(f"{k} {v}" for k, v in stats.states.items() if v)
        table.caption = (
            f"held {stats.held} ({held or 'none'}); prefetched batches {stats.prefetched_batches}; "
            f"deliver queue {stats.deliver_queue}; jobs {', '.join(map(str, stats.jobs)) or '-'}"
        )
        self._live.update(table)


def _watch_parent(parent_pid: int) -> None:
    """In a supervised child: if the supervisor dies, finish gracefully instead of orphaning."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="trapline-parent-watch", daemon=True).start()


def child_main(
    index: int,
    settings: WorkerSettings,
    slugs: list[str],
    drain: bool,
    log_level: str,
    gpus: list[str],
) -> None:
    """Entry point of one supervised worker process (multiprocessing spawn target)."""
    # Own process group: a terminal's Ctrl-C reaches us only via the supervisor.
    os.setpgrp()
    # One GPU per process, round robin when there are more processes than GPUs.
    pin_device(gpus[index % len(gpus)] if gpus else None)
    configure_logging(log_level, rich=False)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s [worker {index}] %(name)s: %(message)s")
        )
    _watch_parent(os.getppid())
    sys.exit(serve(settings, slugs, drain=drain))


def worker(
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            help="Server URL (env TRAPLINE_SERVER_URL or AMI_ANTENNA_API_BASE_URL).",
            show_default="http://127.0.0.1:8000",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="Worker token (env TRAPLINE_TOKEN or AMI_ANTENNA_API_AUTH_TOKEN).",
            show_default=False,
        ),
    ] = None,
    pipeline: Annotated[
        list[str] | None,
        typer.Option("--pipeline", "-p", help="Pipeline slug to serve; repeat for several."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="Tasks per reserve.", show_default="16"),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            help="Where the outbox lives.",
            show_default="user state dir/trapline/<service name>",
        ),
    ] = None,
    project_id: Annotated[
        int | None,
        typer.Option(
            "--project-id",
            help="Project to register pipelines in.",
            show_default="1",
        ),
    ] = None,
    service_name: Annotated[
        str | None,
        typer.Option(
            "--service-name",
            help="Processing service name (env TRAPLINE_SERVICE_NAME).",
            show_default="trapline-worker",
        ),
    ] = None,
    pipeline_file: Annotated[
        list[Path] | None,
        typer.Option(
            "--pipeline-file",
            help="TOML file describing an ONNX pipeline to serve (repeatable; trapline[onnx]).",
        ),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            min=1,
            help="Worker processes, each supervised on its own and pinned to one GPU "
            "when there are GPUs.",
            show_default="one per visible GPU, else 1",
        ),
    ] = None,
    drain: Annotated[
        bool, typer.Option("--drain", help="Exit once no job has tasks and nothing is held.")
    ] = False,
    progress: Annotated[
        bool, typer.Option("--progress", help="Show live per-stage counts and rates.")
    ] = False,
    log_level: Annotated[
        str | None,
        typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.", show_default="INFO"),
    ] = None,
) -> None:
    """Pull tasks from the server, run the pipelines, deliver every result.

    Exit code 0 when every reserved task was delivered or released; 1 when
    something is left (kept in the outbox, refused, or not released; see the
    log); 2 when the worker could not start.
    """
    overrides: dict[str, object] = {}
    for key, value in (
        ("server_url", server),
        ("token", token),
        ("batch_size", batch_size),
        ("state_dir", state_dir),
        ("project_id", project_id),
        ("service_name", service_name),
        ("log_level", log_level),
        ("pipeline_files", pipeline_file or None),
        ("processes", processes),
    ):
        if value is not None:
            overrides[key] = value
    settings = _settings(overrides)
    level = settings.log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise _fail(f"invalid log level {settings.log_level!r}")
    slugs = [s for s in (pipeline or []) if s.strip()]
    if not slugs and not settings.pipeline_files:
        raise _fail("no pipeline given: pass --pipeline SLUG (see `trapline pipelines`)")
    gpus = visible_gpus(settings.cuda_visible_devices)
    processes = settings.processes or len(gpus) or 1

    if processes > 1:
        configure_logging(level, rich=False)
        if progress:
            logger.warning("--progress shows one process only; ignored with --processes > 1")
        if gpus:
            logger.info("%d worker processes over GPUs %s", processes, ", ".join(gpus))
        raise typer.Exit(supervise(child_main, (settings, slugs, drain, level, gpus), processes))

    # Rich layout only on a terminal; under systemd or a redirect, whole timestamped lines.
    configure_logging(level, rich=sys.stderr.isatty())
    try:
        if progress:
            with Live(refresh_per_second=2, transient=False) as live:
                report = asyncio.run(
                    run_worker(
                        settings, slugs, drain=drain, handle_signals=True, on_stats=_Progress(live)
                    )
                )
        else:
            report = asyncio.run(run_worker(settings, slugs, drain=drain, handle_signals=True))
    except TraplineError as exc:
        # Start-up failures (pipeline, token, state dir): one line, nothing reserved.
        raise _fail(str(exc)) from None
    raise typer.Exit(report.exit_code)


def register(app: typer.Typer) -> None:
    """Add the ``worker`` command to the ``trapline`` app."""
    app.command("worker")(worker)


def main(argv: list[str] | None = None) -> None:
    """``python -m trapline.worker``: the ``worker`` command on its own (exits the process)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(worker)
    typer.main.get_command(app).main(args=argv, prog_name="python -m trapline.worker")
