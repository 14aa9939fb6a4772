"""``trapline demo``: the whole system in one process, on the sample images, with nothing set up.

A temporary data dir holds a SQLite ledger and an embedded NATS; the server runs
in-process on a free port; two in-process workers drain the job. Everything is
real (HTTP, JetStream, the ledger): only the deployment is squeezed into one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import httpx
import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from trapline.cli.client import (
    CliError,
    LogLevelOpt,
    cli_errors,
    detail_line,
    err,
    out,
    setup_logging,
)
from trapline.cli.job_views import FINISHED, STATES, counts_line
from trapline.cli.server_cmd import StoppableServer, server_config
from trapline.cli.token_cmd import make_token
from trapline.settings import ServerSettings, WorkerSettings

DEFAULT_PIPELINE = "moth-detector-cv"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
POLL_S = 0.5
MAX_TABLE_ROWS = 50
# After the job has finished, how long workers get to notice there is no more work.
WORKER_GRACE_S = 15.0
# After a stop request, how long workers get to finish their batch and release the rest.
WORKER_STOP_S = 20.0


@dataclass
class DemoOptions:
    pipeline: str
    images_dir: Path | None
    workers: int
    keep: bool
    timeout_s: float


@contextmanager
def demo_images(images_dir: Path | None) -> Iterator[Path]:
    """The folder of images to process: the given one, or the samples shipped in the package."""
    if images_dir is not None:
        folder = images_dir.expanduser().resolve()
        if not folder.is_dir():
            raise CliError(f"--images-dir {folder} is not a directory")
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*") if p.is_file()):
            raise CliError(f"--images-dir {folder} holds no image files")
        yield folder
        return
    shipped = resources.files("trapline").joinpath("demo_images")
    if not shipped.is_dir() or not any(e.name.endswith(".jpg") for e in shipped.iterdir()):
        raise CliError(
            "the sample images (trapline/demo_images/*.jpg) are not in this installation; "
            "pass --images-dir with a folder of images"
        )
    # The server reads images from a real folder: as_file gives one even from a zip.
    with resources.as_file(shipped) as folder:
        yield Path(folder).resolve()


class DemoServer(StoppableServer):
    """The first Ctrl-C stops the demo in order (workers release their tasks, then the
    server stops) instead of stopping the server under the workers' feet."""

    interrupted: asyncio.Event | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = self.interrupted is not None and not self.interrupted.is_set()
        if first and self.interrupted is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(self.interrupted.set)
            return
        super().handle_exit(sig, frame)  # a second Ctrl-C: uvicorn's own, faster exit


async def wait_started(server: Any, task: asyncio.Task[None], timeout_s: float = 60.0) -> None:
    """Until uvicorn listens; a server that exits first is a start failure."""
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if task.done():
            exc = task.exception() if not task.cancelled() else None
            raise CliError(f"the demo server did not start: {exc or 'see the log above'}")
        if time.monotonic() > deadline:
            raise CliError(f"the demo server did not start within {timeout_s:.0f} s")
        await asyncio.sleep(0.05)


async def api(http: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> Any:
    """One request to the demo server; an error answer becomes a CliError line."""
    try:
        response = await http.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise CliError(f"the demo server stopped answering: {exc or type(exc).__name__}") from None
    if response.status_code >= 400:
        try:
            body: Any = response.json()
        except ValueError:
            body = None
        raise CliError(detail_line(response.status_code, body, response.reason_phrase))
    return response.json()


def worker_failure(tasks: list[asyncio.Task[Any]]) -> str | None:
    """The first worker that died with an error, as a line."""
    for n, task in enumerate(tasks, start=1):
        if task.done() and not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            return f"worker {n} stopped: {type(exc).__name__}: {exc}"
    return None


async def follow(
    http: httpx.AsyncClient,
    job_id: int,
    workers: list[asyncio.Task[Any]],
    timeout_s: float,
    interrupted: asyncio.Event,
) -> dict[str, Any]:
    """Progress bar until the job finishes; the final job view."""
    started = time.monotonic()
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
        console=err,
    )
    with progress:
        bar = progress.add_task(f"job {job_id}", total=None, detail="")
        while True:
            view = await api(http, "GET", f"/api/v2/jobs/{job_id}/")
            counts = view.get("counts") or {}
            detail = " · ".join(f"{int(counts.get(s, 0))} {s}" for s in STATES[1:])
            progress.update(
                bar,
                total=int(counts.get("total", 0)) or None,
                completed=int(counts.get("done", 0)) + int(counts.get("failed", 0)),
                detail=f"{detail} · {view.get('detections', 0)} det.",
            )
            if view.get("status") in FINISHED:
                return dict(view)
            if interrupted.is_set():
                raise CliError("interrupted: stopping the workers and the server", 130)
            problem = worker_failure(workers)
            if problem:
                raise CliError(problem)
            if time.monotonic() - started > timeout_s:
                raise CliError(
                    f"job {job_id} did not finish within {timeout_s:.0f} s: {counts_line(counts)}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(interrupted.wait(), POLL_S)


async def stop_workers(stop: asyncio.Event, workers: list[asyncio.Task[Any]]) -> list[Any]:
    """Let draining workers end by themselves; after a grace period, ask them to stop."""
    if not workers:
        return []
    _, pending = await asyncio.wait(workers, timeout=WORKER_GRACE_S)
    if pending:
        stop.set()
        await asyncio.wait(pending, timeout=60)
    for task in workers:
        if not task.done():
            task.cancel()
    return list(await asyncio.gather(*workers, return_exceptions=True))


def summary_table(images: list[dict[str, Any]], detections: list[dict[str, Any]]) -> Table:
    """One row per image: state, number of detections and their labels."""
    per_image: dict[str, list[dict[str, Any]]] = {}
    for d in detections:
        per_image.setdefault(str(d.get("image_id")), []).append(d)
    table = Table(title="detections per image", title_justify="left")
    table.add_column("image")
    table.add_column("state")
    table.add_column("detections", justify="right")
    table.add_column("labels")
    for row in images[:MAX_TABLE_ROWS]:
        image_id = str(row.get("image_id"))
        found = per_image.get(image_id, [])
        labels = Counter(
            str((d.get("classifications") or [{}])[0].get("classification", "?")) for d in found
        )
        state = str(row.get("state"))
        table.add_row(
            escape(image_id),
            state if state != "failed" else f"[red]failed[/]: {escape(str(row.get('reason')))}",
            str(len(found)),
            escape(", ".join(f"{n} {label}" for label, n in labels.most_common())),
        )
    if len(images) > MAX_TABLE_ROWS:
        table.caption = f"… and {len(images) - MAX_TABLE_ROWS} more images"
    return table


async def run_demo(opts: DemoOptions, images_dir: Path, data_dir: Path) -> str:
    """Server, tokens, job, workers; prints the summary and returns the job's final status."""
    # Imported here: the worker stack is heavy, and every ``trapline`` call imports this module.
    from trapline.queue.embedded import free_port
    from trapline.worker import run_worker

    # Every setting given explicitly: the demo must not pick up a configured deployment.
    settings = ServerSettings(
        data_dir=data_dir,
        host="127.0.0.1",
        port=free_port(),
        database_url=f"sqlite+aiosqlite:///{data_dir / 'trapline.db'}",
        nats_url=None,
        public_url=None,
        reconcile_interval_s=0.5,
    )
    url = f"http://127.0.0.1:{settings.port}"
    db_url = settings.resolved_database_url()
    admin_token = await make_token(db_url, "demo-admin", "admin", None)
    worker_token = await make_token(db_url, "demo-worker", "worker", 1)
    err.print(f"demo server on {url}, data in {data_dir}", markup=False, highlight=False)
    server = DemoServer(server_config(settings))
    interrupted = asyncio.Event()
    server.interrupted, server.loop = interrupted, asyncio.get_running_loop()
    serve_task = asyncio.create_task(server.serve())
    stop = asyncio.Event()
    workers: list[asyncio.Task[Any]] = []
    try:
        await wait_started(server, serve_task)
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Token {admin_token}"}, timeout=60
        ) as http:
            job = await api(
                http,
                "POST",
                "/api/v2/jobs/",
                json={
                    "name": f"demo: {images_dir.name}",
                    "project_id": 1,
                    "pipeline": opts.pipeline,
                    "images_dir": str(images_dir),
                },
            )
            job_id = int(job["id"])
            err.print(
                f"job {job_id}: {job['counts']['total']} images, pipeline {opts.pipeline}, "
                f"{opts.workers} worker(s)",
                markup=False,
            )
            began = time.monotonic()
            # Small batches on small jobs, so that every worker gets a share to show.
            total = int(job["counts"]["total"])
            batch_size = max(1, min(16, total // (opts.workers * 4)))
            for n in range(1, opts.workers + 1):
                worker_settings = WorkerSettings(
                    server_url=url,
                    token=worker_token,
                    service_name=f"demo-worker-{n}",
                    project_id=1,
                    state_dir=data_dir / f"worker-{n}",
                    poll_interval_s=0.5,
                    batch_size=batch_size,
                    grace_s=WORKER_STOP_S / 2,
                )
                workers.append(
                    asyncio.create_task(
                        run_worker(worker_settings, [opts.pipeline], drain=True, stop=stop)
                    )
                )
            final = await follow(http, job_id, workers, opts.timeout_s, interrupted)
            seconds = time.monotonic() - began
            reports = await stop_workers(stop, workers)
            images = await api(
                http, "GET", f"/api/v2/jobs/{job_id}/images/", params={"limit": 10_000}
            )
            results = await api(
                http, "GET", f"/api/v2/jobs/{job_id}/results/", params={"limit": 100_000}
            )
        rows = images.get("results") or []
        out.print(summary_table(rows, results.get("results") or []))
        out.print(counts_line(final.get("counts") or {}), markup=False)
        out.print(
            f"{final.get('detections', 0)} detections in {seconds:.1f} s "
            f"({total / seconds if seconds > 0 else 0.0:.1f} images/s, {opts.workers} worker(s))",
            markup=False,
        )
        for n, report in enumerate(reports, start=1):
            text = report.summary() if hasattr(report, "summary") else f"error: {report}"
            out.print(f"worker {n}: {text}", markup=False)
        if opts.keep:
            out.print(f"data kept in {data_dir} (server was {url})", markup=False)
        # The caller prints the bare status as the last line, for scripts.
        return str(final.get("status"))
    finally:
        # Graceful first: workers finish their batch and release the rest of their tasks.
        stop.set()
        if workers:
            await asyncio.wait(workers, timeout=WORKER_STOP_S)
        for task in workers:
            if not task.done():
                task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        server.should_exit = True
        await asyncio.gather(serve_task, return_exceptions=True)


def demo(
    pipeline: Annotated[str, typer.Option(help="Pipeline the workers run.")] = DEFAULT_PIPELINE,
    images_dir: Annotated[
        Path | None,
        typer.Option("--images-dir", help="Process this folder instead of the sample images."),
    ] = None,
    workers: Annotated[int, typer.Option(help="In-process workers.", min=1, max=32)] = 2,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the data dir afterwards.")] = False,
    timeout: Annotated[
        float, typer.Option(help="Give up if the job has not finished after this many seconds.")
    ] = 600.0,
    log_level: LogLevelOpt = None,
) -> None:
    """Run server, NATS, database and workers in one process on sample images; print the result.

    The last line is the job's final status; exit code 0 on SUCCESS.
    """
    with cli_errors(), ExitStack() as stack:
        setup_logging(log_level)
        folder = stack.enter_context(demo_images(images_dir))
        data_dir = Path(tempfile.mkdtemp(prefix="trapline-demo-"))
        if not keep:
            stack.callback(shutil.rmtree, data_dir, ignore_errors=True)
        opts = DemoOptions(pipeline, images_dir, workers, keep, timeout)
        status = asyncio.run(run_demo(opts, folder, data_dir))
        typer.echo(status)
        if status != "SUCCESS":
            raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``trapline demo``."""
    app.command("demo")(demo)
