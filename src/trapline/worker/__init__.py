"""The trapline worker: pulls tasks over HTTP, runs a pipeline, delivers every result.

Entry points:

- :func:`run_worker` — the worker as a coroutine (in-process use: demo, tests);
- :func:`serve` — a blocking call with signal handling that returns an exit code
  (for ``multiprocessing`` children and subprocess tests);
- ``python -m trapline.worker`` / ``trapline worker`` — the command line.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import platformdirs

from trapline.errors import PipelineError, TraplineError, WorkerError
from trapline.pipelines.base import Pipeline
from trapline.pipelines.registry import available_pipelines
from trapline.settings import WorkerSettings
from trapline.worker.client import WorkerClient
from trapline.worker.compute import ComputeThread
from trapline.worker.download import Downloader
from trapline.worker.outbox import Outbox
from trapline.worker.report import JobReport, WorkerReport, WorkerStats
from trapline.worker.runner import Worker

__all__ = [
    "JobReport",
    "WorkerReport",
    "WorkerStats",
    "default_state_dir",
    "run_worker",
    "serve",
]

logger = logging.getLogger(__name__)


def default_state_dir(settings: WorkerSettings) -> Path:
    """``state_dir`` if set, else the user state dir of trapline / the service name."""
    if settings.state_dir is not None:
        return Path(settings.state_dir)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", settings.service_name) or "worker"
    return Path(platformdirs.user_state_dir("trapline")) / safe


def worker_name(settings: WorkerSettings) -> str:
    return f"{settings.service_name}@{socket.gethostname()}"


def installed_pipeline(slug: str) -> Pipeline:
    """An instance of the installed pipeline ``slug`` (not loaded yet)."""
    classes = available_pipelines()
    if slug not in classes:
        raise PipelineError(
            f"unknown pipeline {slug!r}; installed: {', '.join(sorted(classes)) or 'none'}"
        )
    return classes[slug]()


def _load_pipelines(slugs: list[str], factory: Callable[[str], Pipeline]) -> dict[str, Pipeline]:
    """Instantiate and load every pipeline; PipelineError names the one that failed."""
    pipelines: dict[str, Pipeline] = {}
    for slug in slugs:
        pipeline = factory(slug)
        try:
            pipeline.load()
        except PipelineError:
            raise
        except Exception as exc:
            raise PipelineError(
                f"pipeline {slug!r} failed to load: {type(exc).__name__}: {exc}"
            ) from exc
        if pipeline.slug != slug:
            raise PipelineError(f"pipeline factory returned {pipeline.slug!r} for {slug!r}")
        pipelines[slug] = pipeline
    return pipelines


async def run_worker(
    settings: WorkerSettings,
    pipeline_slugs: list[str],
    *,
    drain: bool = False,
    stop: asyncio.Event | None = None,
    abort: asyncio.Event | None = None,
    handle_signals: bool = False,
    on_stats: Callable[[WorkerStats], None] | None = None,
    pipeline_factory: Callable[[str], Pipeline] | None = None,
) -> WorkerReport:
    """Run the worker until ``stop`` is set (or, with ``drain``, until no job has work).

    Pipelines are loaded before anything is reserved: one that cannot load raises
    :class:`~trapline.errors.PipelineError` and nothing is reserved. A server that
    refuses the token raises :class:`~trapline.errors.WorkerError`. Otherwise the
    outcome of every reserved task is in the returned report.

    ``stop`` starts a graceful shutdown (stop reserving, finish the batch in
    compute within ``grace_s``, deliver, release the rest); ``abort`` ends at
    once (release, keep undelivered results in the outbox). With
    ``handle_signals`` the first SIGTERM/SIGINT sets ``stop``, the second ``abort``.
    ``pipeline_factory`` makes a (not yet loaded) pipeline from a slug; default:
    the installed ``trapline.pipelines`` entry points.
    """
    factory = pipeline_factory or installed_pipeline
    if settings.pipeline_files:
        from trapline.pipelines.onnx import load_pipeline_file

        from_files = {p.slug: p for p in map(load_pipeline_file, settings.pipeline_files)}
        pipeline_slugs = [*pipeline_slugs, *from_files]
        base_factory = factory

        def factory(slug: str) -> Pipeline:
            return from_files[slug] if slug in from_files else base_factory(slug)

    slugs = list(dict.fromkeys(s.strip() for s in pipeline_slugs if s.strip()))
    if not slugs:
        raise WorkerError("no pipeline given: name at least one pipeline slug")
    stop = stop if stop is not None else asyncio.Event()
    abort = abort if abort is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if handle_signals:
        installed = _install_signal_handlers(loop, stop, abort)
    compute_thread = ComputeThread()
    try:
        # On the compute thread: GPU libraries tie state to the loading thread.
        loading = asyncio.ensure_future(compute_thread.run(lambda: _load_pipelines(slugs, factory)))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({loading, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if not loading.done():
            # Nothing is reserved yet, so there is nothing to finish: leave now (the
            # load goes on in a daemon thread and dies with the process).
            loading.cancel()
            logger.warning("stopped while the pipelines were loading; nothing was reserved")
            return WorkerReport()
        pipelines = loading.result()
        logger.info("loaded pipelines: %s", ", ".join(slugs))
        state_dir = default_state_dir(settings)
        outbox = await asyncio.to_thread(Outbox.open, state_dir)
        try:
            async with WorkerClient(
                settings.server_url,
                settings.token,
                worker_name=worker_name(settings),
                worker_id=uuid.uuid4().hex,
                timeout_s=settings.http_timeout_s,
            ) as client:
                downloader = Downloader(
                    concurrency=settings.download_concurrency,
                    timeout_s=settings.download_timeout_s,
                    retries=settings.download_retries,
                )
                try:
                    worker = Worker(
                        settings,
                        pipelines,
                        client=client,
                        downloader=downloader,
                        outbox=outbox,
                        compute_thread=compute_thread,
                        stop=stop,
                        abort=abort,
                        drain=drain,
                        on_stats=on_stats,
                    )
                    return await worker.run()
                finally:
                    await downloader.aclose()
        finally:
            await asyncio.to_thread(outbox.close)
    finally:
        compute_thread.close()
        for sig in installed:
            loop.remove_signal_handler(sig)


def _install_signal_handlers(
    loop: asyncio.AbstractEventLoop, stop: asyncio.Event, abort: asyncio.Event
) -> list[signal.Signals]:
    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            logger.warning(
                "%s received: finishing gracefully (signal again to stop at once)", sig.name
            )
            stop.set()
        else:
            logger.warning("%s received again: releasing everything and stopping now", sig.name)
            abort.set()

    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or a platform without it
        installed.append(sig)
    return installed


def serve(
    settings: WorkerSettings,
    pipeline_slugs: list[str],
    *,
    drain: bool = False,
    on_stats: Callable[[WorkerStats], None] | None = None,
) -> int:
    """Run the worker in this process with signal handling; the process exit code.

    0: everything reserved was delivered or released; 1: something is left (see
    the log); 2: the worker could not start (pipeline, token, state directory).
    Does not configure logging (the CLI does).
    """
    try:
        report = asyncio.run(
            run_worker(
                settings, pipeline_slugs, drain=drain, handle_signals=True, on_stats=on_stats
            )
        )
    except TraplineError as exc:
        logger.error("%s", exc)
        return 2
    return report.exit_code
