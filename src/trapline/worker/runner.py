"""The worker's stages and their orchestration.

::

    reserve ─► reserved_q ─► download+decode ─► ready_q ─► compute ─► outbox ─► deliver_q ─► deliver
    (prefetch permits: at most prefetch_batches batches between reserve and compute)

Every queue is bounded, so a slow stage holds back the ones before it and
memory stays bounded. Every reserved task is in :class:`HeldTasks` from the
reserve until its outcome; shutdown and error paths work from that registry
(release what was not computed, deliver what was), so no path strands a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from trapline.errors import WorkerError
from trapline.pipelines.base import ImageInput, ImageResult, Pipeline
from trapline.settings import WorkerSettings
from trapline.worker.client import ApiError, Capabilities, JobRef, WorkerClient
from trapline.worker.compute import ComputeThread, batch_inputs, build_items
from trapline.worker.delivery import Deliverer, DeliveryResult
from trapline.worker.download import Downloader, DownloadFailed, decode_rgb
from trapline.worker.leases import HeldTask, HeldTasks, LeaseExtender, Outcome, TaskState
from trapline.worker.outbox import Outbox, OutboxEntry
from trapline.worker.report import JobReport, WorkerReport, log_final_summary, log_job_summary
from trapline.worker.results import ResultConverter, error_item
from trapline.worker.tasks import Batch, parse_tasks

logger = logging.getLogger(__name__)

DELIVERY_CONCURRENCY = 2
DELIVER_QUEUE_SIZE = 2
REGISTER_INTERVAL_S = 300.0
OUTBOX_SWEEP_INTERVAL_S = 60.0
# Re-list jobs at least this often while busy, to notice cancelled or older jobs.
RELIST_INTERVAL_S = 10.0
# A pipeline that raises on this many batches in a row is broken: stop instead
# of failing every image of every job.
MAX_CONSECUTIVE_PIPELINE_FAILURES = 3
# Release calls at shutdown must not take the whole grace period each.
RELEASE_TIMEOUT_S = 10.0
WARN_INTERVAL_S = 60.0
# On abort, an in-flight reserve still gets this long: its tasks are then released.
RESERVE_WAIT_ON_ABORT_S = 5.0


@dataclass
class WorkerStats:
    """A snapshot for progress displays."""

    elapsed_s: float
    reserved: int
    downloaded: int
    computed: int
    delivered: int
    failed: int
    released: int
    kept: int
    held: int
    states: dict[str, int]
    prefetched_batches: int
    deliver_queue: int
    jobs: list[int] = field(default_factory=list)


class _RateLimitedWarning:
    """Logs a recurring problem once per interval per key, so outages do not flood the log."""

    def __init__(self, interval_s: float = WARN_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._last: dict[str, float] = {}

    def __call__(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, float("-inf")) >= self._interval_s:
            self._last[key] = now
            logger.warning(msg, *args)
        else:
            logger.debug(msg, *args)


class Worker:
    """One worker process's stages. Build with loaded pipelines; call :meth:`run` once."""

    def __init__(
        self,
        settings: WorkerSettings,
        pipelines: dict[str, Pipeline],
        *,
        client: WorkerClient,
        downloader: Downloader,
        outbox: Outbox,
        compute_thread: ComputeThread,
        stop: asyncio.Event,
        abort: asyncio.Event,
        drain: bool = False,
        on_stats: Callable[[WorkerStats], None] | None = None,
        stats_interval_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self._pipelines = pipelines
        self._converters = {slug: ResultConverter(p) for slug, p in pipelines.items()}
        self._client = client
        self._downloader = downloader
        self._outbox = outbox
        self._compute_thread = compute_thread
        self._stop = stop
        self._abort = abort
        self._drain = drain
        self._on_stats = on_stats
        self._stats_interval_s = stats_interval_s

        self.held = HeldTasks()
        self._deliverer = Deliverer(
            client,
            outbox,
            deadline_s=settings.delivery_deadline_s,
            backoff_cap_s=settings.delivery_backoff_cap_s,
        )
        self._caps = Capabilities.plain_antenna()
        prefetch = max(1, settings.prefetch_batches)
        self._prefetch = asyncio.Semaphore(prefetch)
        self._reserved_q: asyncio.Queue[Batch] = asyncio.Queue(prefetch)
        self._ready_q: asyncio.Queue[Batch] = asyncio.Queue(prefetch)
        self._deliver_q: asyncio.Queue[OutboxEntry | None] = asyncio.Queue(DELIVER_QUEUE_SIZE)
        # Set when the run must end: stop/abort, drained, or fatal.
        self._halt = asyncio.Event()
        self._fatal: str | None = None
        self._gone: set[int] = set()
        self._skipped: set[int] = set()
        self._active_jobs: list[JobRef] = []
        self._summarized: dict[int, int] = {}
        self._listed_once = False
        self._computing: Batch | None = None
        self._handoff: OutboxEntry | None = None
        self._kept_entry_ids: list[int] = []
        self._recovered = 0
        self._malformed = 0
        self._downloaded = 0
        self._computed = 0
        self._pipeline_failures = 0
        self._started = time.monotonic()
        self._warn = _RateLimitedWarning()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._starting = False

    # -- helpers ----------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        """Something makes going on pointless: stop reserving and wind down."""
        if self._fatal is None:
            self._fatal = reason
            logger.error("worker stopping: %s", reason)
        self._halt.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep unless the run is halting."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._halt.wait(), seconds)

    def _spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=f"trapline-worker-{name}")
        self._tasks[name] = task
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A bug or an unexpected failure in a stage: wind down through the
            # normal shutdown, which releases and delivers from the registry.
            logger.error("internal error in %s", task.get_name(), exc_info=exc)
            self._fail(f"internal error in {task.get_name()}: {type(exc).__name__}: {exc}")

    async def _cancel(self, name: str) -> None:
        task = self._tasks.get(name)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _wait_task(self, name: str, limit_s: float, *, abortable: bool = True) -> bool:
        """Wait for a stage to end by itself (unless aborted); True if it ended."""
        task = self._tasks.get(name)
        if task is None or task.done():
            return True
        aborted = asyncio.ensure_future(self._abort.wait() if abortable else asyncio.sleep(limit_s))
        try:
            await asyncio.wait(
                {task, aborted}, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            aborted.cancel()
        return task.done()

    # -- run ----------------------------------------------------------------------------------

    async def run(self) -> WorkerReport:
        """Serve until stopped, drained or failed; then shut down and report."""
        watchers = [
            asyncio.create_task(self._watch_stop()),
            asyncio.create_task(self._watch_abort()),
        ]
        try:
            self._starting = True
            await self._startup()
            self._starting = False
            if not self._halt.is_set():
                self._spawn("reserve", self._reserve_loop())
                self._spawn("download", self._download_loop())
                self._spawn("compute", self._compute_loop())
                for i in range(DELIVERY_CONCURRENCY):
                    self._spawn(f"deliver-{i}", self._deliver_loop())
                if self._caps.lease_extension and self._caps.ack_wait_s:
                    extender = LeaseExtender(
                        self._client,
                        self.held,
                        max(0.5, self._caps.ack_wait_s / 3),
                        on_job_gone=lambda job_id: self._job_gone(job_id, "job not found"),
                    )
                    self._spawn("extend", extender.run())
                self._spawn("register", self._register_loop())
                self._spawn("sweep", self._sweep_loop())
                if self._on_stats is not None:
                    self._spawn("stats", self._stats_loop())
                await self._halt.wait()
            await self._shutdown()
            if self._on_stats is not None:
                self._on_stats(self.stats())  # the final state, after the last delivery
        finally:
            for watcher in watchers:
                watcher.cancel()
            for name in list(self._tasks):
                await self._cancel(name)
        return await self._report()

    async def _watch_stop(self) -> None:
        await self._stop.wait()
        if self._starting:
            # Leftover deliveries at start-up would otherwise run to their full deadline.
            self._deliverer.set_cutoff(time.monotonic() + self.settings.grace_s)
        self._halt.set()

    async def _watch_abort(self) -> None:
        await self._abort.wait()
        self._deliverer.abort()
        self._stop.set()
        self._halt.set()

    async def _startup(self) -> None:
        """Capabilities, leftovers in the outbox, pipeline registration — before any reserve."""
        self._caps = await self._capabilities()
        if self._halt.is_set():
            return
        if self._caps.trapline is None:
            logger.warning(
                "server %s has no trapline capabilities (plain Antenna?): lease extension and "
                "release are off, so tasks held longer than the server's lease may be handed to "
                "another worker, and tasks not processed at shutdown wait out their lease",
                self._client.base_url,
            )
        else:
            missing = [
                name
                for name, on in (
                    ("lease extension", self._caps.lease_extension),
                    ("release", self._caps.release),
                )
                if not on
            ]
            if missing:
                logger.warning(
                    "server does not offer %s; those protections are off", " and ".join(missing)
                )
        await self._outbox.adopt_orphans()
        await self._deliver_leftovers()
        await self._register(first=True)

    async def _capabilities(self) -> Capabilities:
        attempt = 0
        while not self._halt.is_set():
            try:
                return await self._client.capabilities()
            except ApiError as exc:
                if exc.auth_failure:
                    raise WorkerError(
                        f"server {self._client.base_url} refused the token: {exc.detail}"
                    ) from exc
                self._warn(
                    "caps", "server %s not reachable yet (%s); retrying", self._client.base_url, exc
                )
            attempt += 1
            await self._sleep(min(self.settings.delivery_backoff_cap_s, 0.5 * 2**attempt))
        return Capabilities.plain_antenna()

    async def _deliver_leftovers(self) -> None:
        rejected = await self._outbox.entries("rejected")
        if rejected:
            logger.warning(
                "%d result batch(es) the server refused earlier are kept in %s (images: %s)",
                len(rejected),
                self._outbox.path,
                ", ".join(i for e in rejected for i in e.image_ids)[:2000],
            )
        pending = await self._outbox.entries("pending")
        if not pending:
            return
        logger.info(
            "delivering %d result batch(es) left in the outbox by an earlier run", len(pending)
        )
        # One deadline for all leftovers: a dead server costs one deadline, not one per batch.
        deadline = time.monotonic() + self.settings.delivery_deadline_s
        for entry in pending:
            if self._halt.is_set():
                self._kept_entry_ids.append(entry.id)
                continue
            self._apply(await self._deliverer.deliver(entry, deadline=deadline))

    async def _register(self, *, first: bool = False) -> None:
        configs = [p.config() for p in self._pipelines.values()]
        try:
            await self._client.register_pipelines(
                self.settings.project_id, self.settings.service_name, configs
            )
        except ApiError as exc:
            self._warn(
                "register",
                "could not register pipelines with project %s: %s",
                self.settings.project_id,
                exc,
            )
        else:
            if first:
                logger.info(
                    "registered pipelines %s as %r in project %s",
                    ", ".join(self._pipelines),
                    self.settings.service_name,
                    self.settings.project_id,
                )

    async def _register_loop(self) -> None:
        while True:
            await asyncio.sleep(REGISTER_INTERVAL_S)
            await self._register()

    async def _stats_loop(self) -> None:
        assert self._on_stats is not None
        while True:
            self._on_stats(self.stats())
            await asyncio.sleep(self._stats_interval_s)

    # -- reserve ------------------------------------------------------------------------------

    async def _reserve_loop(self) -> None:
        slugs = list(self._pipelines)
        attempt = 0
        while not self._halt.is_set():
            try:
                jobs = await self._client.list_jobs(slugs)
            except ApiError as exc:
                if exc.auth_failure or (exc.status == 404 and not self._listed_once):
                    self._fail(f"cannot list jobs at {self._client.base_url}: {exc}")
                    return
                self._warn("list", "cannot list jobs: %s; retrying", exc)
                attempt += 1
                await self._sleep(min(self.settings.poll_interval_s, 0.5 * 2**attempt))
                continue
            attempt = 0
            self._listed_once = True
            self._on_job_list(jobs)
            got_any = await self._reserve_pass(jobs)
            if self._halt.is_set():
                return
            if got_any:
                continue
            if self._drain:
                if len(self.held) == 0 and self._deliver_q.empty() and self._handoff is None:
                    logger.info("drain: no job has tasks and nothing is held; finishing")
                    self._halt.set()
                    return
                # Wake as soon as held work settles, to confirm the drain promptly.
                await self.held.wait_changed(self.settings.poll_interval_s)
            else:
                await self._sleep(self.settings.poll_interval_s)

    def _on_job_list(self, jobs: list[JobRef]) -> None:
        listed = {j.id for j in jobs}
        self._active_jobs = jobs
        # A job listed again (e.g. retried) is served again.
        self._gone -= listed
        for job_id in self.held.jobs() - listed:
            self._job_gone(job_id, "no longer listed (finished or cancelled)")
        for tally in self.held.tallies():
            if tally.job_id in listed or tally.job_id in self.held.jobs():
                continue
            if self._summarized.get(tally.job_id) != tally.settled:
                self._summarized[tally.job_id] = tally.settled
                log_job_summary(JobReport.from_tally(tally), leaving=True)

    def _job_gone(self, job_id: int, why: str) -> None:
        """Stop work on a job: release its tasks not yet in compute; the rest is delivered."""
        if job_id in self._gone:
            return
        self._gone.add(job_id)
        held = self.held.for_job(job_id)
        logger.info("job %s %s; stopping work on it (%d tasks held)", job_id, why, len(held))
        waiting = [
            t
            for t in held
            if t.state in (TaskState.RESERVED, TaskState.DOWNLOADING, TaskState.WAITING)
        ]
        if waiting:
            task = asyncio.create_task(self._release(waiting, f"job {job_id} {why}"))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _still_held(self, batch: Batch) -> bool:
        """Drop tasks released meanwhile (job gone); False if none is left."""
        batch.tasks = [t for t in batch.tasks if t.reply_subject in self.held]
        return bool(batch.tasks)

    async def _acquire_prefetch(self, limit_s: float) -> bool:
        """Take a prefetch permit; False when halting or after ``limit_s`` without one."""
        acquire = asyncio.ensure_future(self._prefetch.acquire())
        halt = asyncio.ensure_future(self._halt.wait())
        try:
            await asyncio.wait(
                {acquire, halt}, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            halt.cancel()
        if not acquire.done():
            acquire.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acquire
        if acquire.done() and not acquire.cancelled():
            if self._halt.is_set():
                self._prefetch.release()
                return False
            return True
        return False

    async def _reserve_pass(self, jobs: list[JobRef]) -> bool:
        """Reserve from each job, lowest id first, until each is empty; True if any had tasks."""
        got_any = False
        started = time.monotonic()
        for job in jobs:
            if job.id in self._gone or job.id in self._skipped:
                continue
            while not self._halt.is_set():
                # Waiting for room while the pipeline is busy: re-list now and then,
                # so a cancelled job's prefetched tasks are released promptly.
                waited = max(0.0, RELIST_INTERVAL_S - (time.monotonic() - started))
                if not await self._acquire_prefetch(waited):
                    return got_any
                try:
                    raw = await self._client.reserve(job.id, self.settings.batch_size)
                except ApiError as exc:
                    self._prefetch.release()
                    if exc.status == 404:
                        self._job_gone(job.id, "not found")
                    elif exc.status == 403:
                        self._skipped.add(job.id)
                        logger.warning(
                            "job %s: not allowed to reserve (%s); skipping it", job.id, exc.detail
                        )
                    elif exc.auth_failure:
                        self._fail(f"server refused the token: {exc}")
                        return got_any
                    else:
                        self._warn(
                            f"reserve-{job.id}", "job %s: cannot reserve tasks: %s", job.id, exc
                        )
                        await self._sleep(min(self.settings.poll_interval_s, 1.0))
                    break
                batch = self._make_batch(job, raw)
                if batch is None:
                    self._prefetch.release()
                    break
                got_any = True
                await self._reserved_q.put(batch)
                if time.monotonic() - started > RELIST_INTERVAL_S:
                    return got_any
        return got_any

    def _make_batch(self, job: JobRef, raw: list[Any]) -> Batch | None:
        if not raw:
            return None
        parsed = parse_tasks(job.id, raw)
        self._malformed += parsed.dropped
        if not parsed.tasks:
            return None
        self.held.add(parsed.tasks)
        logger.debug("job %s: reserved %d tasks", job.id, len(parsed.tasks))
        return Batch(job=job, tasks=parsed.tasks, errors=parsed.errors)

    # -- download -------------------------------------------------------------------------------

    async def _download_loop(self) -> None:
        while True:
            batch = await self._reserved_q.get()
            if self._halt.is_set():
                # Shutting down: the batch stays registered and is released from there.
                self._prefetch.release()
                continue
            if batch.job.id in self._gone or not self._still_held(batch):
                self._prefetch.release()
                await self._release(batch.tasks, f"job {batch.job.id} ended")
                continue
            if self._pipelines[batch.job.pipeline_slug].needs_pixels:
                await self._download(batch)
            self.held.set_state(batch.subjects, TaskState.WAITING)
            await self._ready_q.put(batch)

    async def _download(self, batch: Batch) -> None:
        runnable = batch.runnable()
        self.held.set_state((t.reply_subject for t in runnable), TaskState.DOWNLOADING)

        async def one(task: HeldTask) -> None:
            try:
                data = await self._downloader.fetch(task.image_url)
                batch.pixels[task.reply_subject] = await asyncio.to_thread(decode_rgb, data)
                self._downloaded += 1
            except DownloadFailed as exc:
                batch.errors[task.reply_subject] = exc.reason
                logger.info("job %s image %s: %s", batch.job.id, task.image_id, exc.reason)

        await asyncio.gather(*(one(t) for t in runnable))

    # -- compute ---------------------------------------------------------------------------------

    async def _compute_loop(self) -> None:
        while True:
            batch = await self._ready_q.get()
            self._prefetch.release()
            if self._halt.is_set():
                # Only the batch already in compute is finished at shutdown.
                continue
            if batch.job.id in self._gone or not self._still_held(batch):
                await self._release(batch.tasks, f"job {batch.job.id} ended")
                continue
            self._computing = batch
            self.held.set_state(batch.subjects, TaskState.COMPUTING)
            items = await self._compute(batch)
            entry = await self._to_outbox(batch, items)
            self.held.set_state(batch.subjects, TaskState.DELIVERING)
            self._computing = None
            self._handoff = entry
            await self._deliver_q.put(entry)
            self._handoff = None

    async def _compute(self, batch: Batch) -> list[dict[str, Any]]:
        slug = batch.job.pipeline_slug
        pipeline = self._pipelines[slug]
        inputs = batch_inputs(batch)
        results: list[ImageResult] | None = None
        failure: str | None = None
        if inputs:
            try:
                results = await self._compute_thread.run(lambda: pipeline.process(inputs))
                self._pipeline_failures = 0
            except Exception as exc:
                failure = f"pipeline {slug} failed: {type(exc).__name__}: {exc}"
                logger.warning(
                    "job %s: %s; retrying its %d images one by one",
                    batch.job.id,
                    failure,
                    len(inputs),
                    exc_info=exc,
                )
                results = await self._compute_one_by_one(batch, slug, inputs)
                if all(r.error is not None for r in results):
                    # Not one poison image: the pipeline itself is broken.
                    self._pipeline_failures += 1
                    if self._pipeline_failures >= MAX_CONSECUTIVE_PIPELINE_FAILURES:
                        self._fail(
                            f"pipeline {slug} failed on {self._pipeline_failures} batches in a row"
                        )
                else:
                    self._pipeline_failures = 0
                failure = None
        batch.pixels.clear()  # the largest thing a batch holds; not needed any more
        self._computed += len(inputs)
        return build_items(batch, results, self._converters[slug], failure)

    async def _compute_one_by_one(
        self, batch: Batch, slug: str, inputs: list[ImageInput]
    ) -> list[ImageResult]:
        """Isolate a poison image: only the images the pipeline fails on are reported failed."""
        pipeline = self._pipelines[slug]
        results: list[ImageResult] = []
        for one in inputs:
            try:
                got = await self._compute_thread.run(functools.partial(pipeline.process, [one]))
                results.extend(
                    got[:1] or [ImageResult(one.id, error="pipeline returned no result")]
                )
            except Exception as exc:
                reason = f"pipeline {slug} failed on this image: {type(exc).__name__}: {exc}"
                logger.error("job %s image %s: %s", batch.job.id, one.id, reason)
                results.append(ImageResult(image_id=one.id, error=reason))
        return results

    async def _to_outbox(self, batch: Batch, items: list[dict[str, Any]]) -> OutboxEntry:
        try:
            return await self._outbox.add(batch.job.id, items)
        except ValueError:
            # Should not happen (items are checked one by one); never lose the batch over it.
            logger.exception(
                "job %s: result batch could not be encoded; reporting errors", batch.job.id
            )
            fallback = [
                error_item(t.reply_subject, t.image_id, "result could not be encoded")
                for t in batch.tasks
            ]
            return await self._outbox.add(batch.job.id, fallback)

    # -- deliver ----------------------------------------------------------------------------------

    async def _deliver_loop(self) -> None:
        while True:
            entry = await self._deliver_q.get()
            if entry is None:
                return
            self._apply(await self._deliverer.deliver(entry))

    def _apply(self, result: DeliveryResult) -> None:
        """Record the outcome of each receipt of a delivery in the registry."""
        groups: list[tuple[Outcome, list[str]]] = [
            (Outcome.DELIVERED, list(result.delivered)),
            (Outcome.FAILED, list(result.failed)),
            (Outcome.REJECTED, list(result.rejected)),
            (Outcome.KEPT, list(result.kept)),
        ]
        for outcome, subjects in groups:
            for subject in subjects:
                if self.held.settle([subject], outcome):
                    continue
                if self.held.resettle_kept(subject, outcome):
                    continue
                if outcome in (Outcome.DELIVERED, Outcome.FAILED):
                    self._recovered += 1
        self._kept_entry_ids.extend(result.kept_entry_ids)

    async def _sweep_loop(self) -> None:
        """Retry batches kept in the outbox after their deadline (the server may be back).

        Ends by itself when the run halts (never cancelled mid-delivery, so each
        outcome is recorded); the shutdown cutoff bounds a delivery in progress.
        """
        while not self._halt.is_set():
            await self._sleep(OUTBOX_SWEEP_INTERVAL_S)
            ids, self._kept_entry_ids = self._kept_entry_ids, []
            for entry_id in ids:
                entry = await asyncio.to_thread(self._outbox.get_sync, entry_id)
                if entry is None or entry.status != "pending":
                    continue
                if self._halt.is_set():
                    self._kept_entry_ids.append(entry_id)
                    continue
                self._apply(await self._deliverer.deliver(entry))

    # -- release ----------------------------------------------------------------------------------

    async def _release(self, tasks: list[HeldTask], why: str) -> None:
        """Give tasks back to the server for immediate redelivery (NAK), one call per job."""
        by_job: dict[int, list[HeldTask]] = {}
        for task in tasks:
            if task.reply_subject in self.held:
                by_job.setdefault(task.job_id, []).append(task)
        for job_id, job_tasks in by_job.items():
            subjects = [t.reply_subject for t in job_tasks]
            ids = ", ".join(t.image_id for t in job_tasks)
            if not self._caps.release:
                self.held.settle(subjects, Outcome.ABANDONED)
                logger.warning(
                    "job %s: %d tasks not processed (%s) cannot be released (the server has no "
                    "release); they return to the queue when their lease expires: %s",
                    job_id,
                    len(subjects),
                    why,
                    ids,
                )
                continue
            try:
                async with asyncio.timeout(RELEASE_TIMEOUT_S):
                    await self._client.release(job_id, subjects)
            except (ApiError, TimeoutError) as exc:
                self.held.settle(subjects, Outcome.ABANDONED)
                logger.warning(
                    "job %s: could not release %d tasks (%s: %s); they return to the queue when "
                    "their lease expires: %s",
                    job_id,
                    len(subjects),
                    why,
                    exc,
                    ids,
                )
            else:
                # Receipts the server answered "unknown" are no longer ours either.
                self.held.settle(subjects, Outcome.RELEASED)
                logger.info("job %s: released %d tasks (%s)", job_id, len(subjects), why)

    def _held_in(self, *states: TaskState) -> list[HeldTask]:
        return [t for job in self.held.jobs() for t in self.held.for_job(job) if t.state in states]

    # -- shutdown --------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Stop reserving, release what is not computed, finish compute, deliver the rest."""
        grace = self.settings.grace_s
        if self._stop.is_set() and not self._abort.is_set():
            logger.info(
                "stopping: releasing tasks not yet computed, letting the batch in compute finish "
                "(up to %g s) and delivering its results; signal again to stop at once",
                grace,
            )
        # 1. Stop reserving. A reserve already sent is awaited (briefly, even on abort),
        #    so what it returns is registered and released instead of stranded.
        limit = min(self.settings.http_timeout_s, RESERVE_WAIT_ON_ABORT_S)
        if self._abort.is_set() or not await self._wait_task(
            "reserve", self.settings.http_timeout_s
        ):
            await self._wait_task("reserve", limit, abortable=False)
        await self._cancel("reserve")
        await self._cancel("download")
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        # 2. Everything reserved but not in compute goes back to the queue now.
        for q in (self._reserved_q, self._ready_q):
            while not q.empty():
                q.get_nowait()
        await self._release(
            self._held_in(TaskState.RESERVED, TaskState.DOWNLOADING, TaskState.WAITING),
            "shutting down",
        )
        # 3. The batch in compute gets the grace period.
        if self._computing is not None and not await self._wait_compute(grace):
            batch = self._computing
            await self._cancel("compute")
            if batch is not None:
                logger.warning(
                    "job %s: batch of %d images still computing %s; releasing it",
                    batch.job.id,
                    len(batch.tasks),
                    "at abort" if self._abort.is_set() else f"after {grace:g} s",
                )
                await self._release(
                    self._held_in(TaskState.COMPUTING), "compute overran the grace period"
                )
        await self._cancel("compute")
        # 4. Deliver what was computed, within a bounded time; the rest stays in the outbox.
        self._deliverer.set_cutoff(time.monotonic() + (0 if self._abort.is_set() else grace))
        # Bounded puts: a delivery stage that died (internal error) consumes nothing;
        # what it leaves queued is in the outbox and counted as kept below.
        if self._handoff is not None:
            handoff, self._handoff = self._handoff, None
            await self._put_delivery(handoff, grace + 5)
        for _ in range(DELIVERY_CONCURRENCY):
            await self._put_delivery(None, grace + 5)
        for i in range(DELIVERY_CONCURRENCY):
            # The cutoff bounds each delivery; the margin covers the last POST's cancel.
            if not await self._wait_task(f"deliver-{i}", grace + 5):
                self._deliverer.abort()
                await self._wait_task(f"deliver-{i}", 5)
            await self._cancel(f"deliver-{i}")
        # 5. Tasks whose delivery was cut off have their results in the outbox; anything
        #    else still held has no result on its way and goes back to the queue.
        delivering = self._held_in(TaskState.DELIVERING)
        self.held.settle([t.reply_subject for t in delivering], Outcome.KEPT)
        leftover = self._held_in(*TaskState)
        if leftover:
            await self._release(leftover, "not delivered at shutdown")
        if not await self._wait_task("sweep", grace + 5):
            self._deliverer.abort()
            await self._wait_task("sweep", 5)
        for name in ("extend", "register", "sweep", "stats"):
            await self._cancel(name)
        # Results kept in the outbox: give their tasks back so another worker can redo
        # them now; if the kept result arrives later the server stores it as valid.
        if self._caps.release:
            for job_id, subjects in self.held.kept_subjects().items():
                with contextlib.suppress(ApiError, TimeoutError):
                    async with asyncio.timeout(RELEASE_TIMEOUT_S):
                        await self._client.release(job_id, subjects)

    async def _put_delivery(self, entry: OutboxEntry | None, limit_s: float) -> bool:
        alive = any(not t.done() for n, t in self._tasks.items() if n.startswith("deliver-"))
        if not alive:
            return False
        try:
            await asyncio.wait_for(self._deliver_q.put(entry), limit_s)
        except TimeoutError:
            return False
        return True

    async def _wait_compute(self, limit_s: float) -> bool:
        """Wait until the compute stage has handed its batch on; False on timeout/abort."""
        deadline = time.monotonic() + limit_s
        compute = self._tasks.get("compute")
        while self._computing is not None:
            if compute is None or compute.done():
                return False  # the stage died: nothing will hand the batch on
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._abort.is_set():
                return False
            await self.held.wait_changed(min(remaining, 0.2))
        return True

    # -- report ------------------------------------------------------------------------------------

    def stats(self) -> WorkerStats:
        tallies = self.held.tallies()
        states = self.held.states()
        return WorkerStats(
            elapsed_s=time.monotonic() - self._started,
            reserved=sum(t.reserved for t in tallies),
            downloaded=self._downloaded,
            computed=self._computed,
            delivered=sum(t.counts[Outcome.DELIVERED] for t in tallies),
            failed=sum(t.counts[Outcome.FAILED] for t in tallies),
            released=sum(t.counts[Outcome.RELEASED] for t in tallies),
            kept=sum(t.counts[Outcome.KEPT] for t in tallies),
            held=len(self.held),
            states={str(k): v for k, v in states.items()},
            prefetched_batches=self._reserved_q.qsize() + self._ready_q.qsize(),
            deliver_queue=self._deliver_q.qsize(),
            jobs=[j.id for j in self._active_jobs],
        )

    async def _report(self) -> WorkerReport:
        report = WorkerReport.from_tallies(self.held.tallies())
        report.recovered = self._recovered
        report.malformed = self._malformed
        report.fatal = self._fatal
        report.outbox_path = str(self._outbox.path)
        pending = await self._outbox.entries("pending")
        report.outbox_pending = sum(len(e.items) for e in pending)
        # Jobs whose summary was logged when the worker left them are not repeated.
        repeat = {
            job_id
            for job_id, tally in ((t.job_id, t) for t in self.held.tallies())
            if self._summarized.get(job_id) != tally.settled
        }
        log_final_summary(report, jobs=repeat)
        return report
