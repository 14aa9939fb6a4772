"""The reserve stage: job rotation and reserving batches of tasks.

Jobs are listed, then reserved from lowest id first until each is empty. A
prefetch permit is taken before each reserve, so at most ``prefetch_batches``
batches are between the reserve and the compute stage. A job that is no longer
listed (finished, cancelled) or not found is *gone*: its tasks not yet in
compute are released, and the later stages drop its batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from trapline.settings import WorkerSettings
from trapline.worker.client import ApiError, JobRef, WorkerClient
from trapline.worker.leases import HeldTasks, Releaser, TaskState
from trapline.worker.lifecycle import Halt
from trapline.worker.report import JobReport, RateLimitedWarning, log_job_summary
from trapline.worker.tasks import Batch, parse_tasks

logger = logging.getLogger(__name__)

# Re-list jobs at least this often while busy, to notice cancelled or older jobs.
RELIST_INTERVAL_S = 10.0


class ReserveStage:
    """Lists jobs and reserves their tasks into ``out_q``; knows which jobs are gone.

    With ``drain``, the run halts once no job has tasks and ``all_settled()``
    says nothing is held or on its way to the server.
    """

    def __init__(
        self,
        client: WorkerClient,
        settings: WorkerSettings,
        pipeline_slugs: list[str],
        held: HeldTasks,
        *,
        halt: Halt,
        releaser: Releaser,
        prefetch: asyncio.Semaphore,
        out_q: asyncio.Queue[Batch],
        drain: bool,
        all_settled: Callable[[], bool],
    ) -> None:
        self._client = client
        self.settings = settings
        self._slugs = pipeline_slugs
        self.held = held
        self._halt = halt
        self._releaser = releaser
        self._prefetch = prefetch
        self._out_q = out_q
        self._drain = drain
        self._all_settled = all_settled
        self._warn = RateLimitedWarning(logger)
        self._gone: set[int] = set()
        self._skipped: set[int] = set()
        self._listed_once = False
        self._background: set[asyncio.Task[None]] = set()
        # The jobs of the last listing, for progress displays.
        self.active_jobs: list[JobRef] = []
        # Job id -> settled count when its summary was logged on leaving it.
        self.summarized: dict[int, int] = {}
        # Tasks without a usable receipt, ignored.
        self.malformed = 0

    def is_gone(self, job_id: int) -> bool:
        return job_id in self._gone

    async def wait_background(self) -> None:
        """Wait for releases started when jobs went away."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def run(self) -> None:
        attempt = 0
        while not self._halt.is_set():
            try:
                jobs = await self._client.list_jobs(self._slugs)
            except ApiError as exc:
                if exc.auth_failure or (exc.status == 404 and not self._listed_once):
                    self._halt.fail(f"cannot list jobs at {self._client.base_url}: {exc}")
                    return
                self._warn("list", "cannot list jobs: %s; retrying", exc)
                attempt += 1
                await self._halt.sleep(min(self.settings.poll_interval_s, 0.5 * 2**attempt))
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
                if self._all_settled():
                    logger.info("drain: no job has tasks and nothing is held; finishing")
                    self._halt.set()
                    return
                # Wake as soon as held work settles, to confirm the drain promptly.
                await self.held.wait_changed(self.settings.poll_interval_s)
            else:
                await self._halt.sleep(self.settings.poll_interval_s)

    def _on_job_list(self, jobs: list[JobRef]) -> None:
        listed = {j.id for j in jobs}
        self.active_jobs = jobs
        # A job listed again (e.g. retried) is served again.
        self._gone -= listed
        for job_id in self.held.jobs() - listed:
            self.job_gone(job_id, "no longer listed (finished or cancelled)")
        for tally in self.held.tallies():
            if tally.job_id in listed or tally.job_id in self.held.jobs():
                continue
            if self.summarized.get(tally.job_id) != tally.settled:
                self.summarized[tally.job_id] = tally.settled
                log_job_summary(JobReport.from_tally(tally), leaving=True)

    def job_gone(self, job_id: int, why: str) -> None:
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
            task = asyncio.create_task(self._releaser.release(waiting, f"job {job_id} {why}"))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

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
                        self.job_gone(job.id, "not found")
                    elif exc.status == 403:
                        self._skipped.add(job.id)
                        logger.warning(
                            "job %s: not allowed to reserve (%s); skipping it", job.id, exc.detail
                        )
                    elif exc.auth_failure:
                        self._halt.fail(f"server refused the token: {exc}")
                        return got_any
                    else:
                        self._warn(
                            f"reserve-{job.id}", "job %s: cannot reserve tasks: %s", job.id, exc
                        )
                        await self._halt.sleep(min(self.settings.poll_interval_s, 1.0))
                    break
                batch = self._make_batch(job, raw)
                if batch is None:
                    self._prefetch.release()
                    break
                got_any = True
                await self._out_q.put(batch)
                if time.monotonic() - started > RELIST_INTERVAL_S:
                    return got_any
        return got_any

    def _make_batch(self, job: JobRef, raw: list[Any]) -> Batch | None:
        if not raw:
            return None
        parsed = parse_tasks(job.id, raw)
        self.malformed += parsed.dropped
        if not parsed.tasks:
            return None
        self.held.add(parsed.tasks)
        logger.debug("job %s: reserved %d tasks", job.id, len(parsed.tasks))
        return Batch(job=job, tasks=parsed.tasks, errors=parsed.errors)
