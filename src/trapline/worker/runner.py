"""The worker's stages and their orchestration.

::

    reserve ─► reserved_q ─► download+decode ─► ready_q ─► compute ─► outbox ─► deliver_q ─► deliver
    (prefetch permits: at most prefetch_batches batches between reserve and compute)

Every queue is bounded, so a slow stage holds back the ones before it and
memory stays bounded. Every reserved task is in :class:`HeldTasks` from the
reserve until its outcome; shutdown and error paths work from that registry
(release what was not computed, deliver what was), so no path strands a task.

The stages live in their own modules (``reserve_stage``, ``download_stage``,
``compute_stage``, ``delivery_stage``); this one wires them together, starts
them, and runs the start-up and the shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from trapline.pipelines.base import Pipeline
from trapline.settings import WorkerSettings
from trapline.worker.client import Capabilities, WorkerClient
from trapline.worker.compute import ComputeThread
from trapline.worker.compute_stage import ComputeStage
from trapline.worker.delivery import Deliverer
from trapline.worker.delivery_stage import DELIVER_QUEUE_SIZE, DELIVERY_CONCURRENCY, DeliveryStage
from trapline.worker.download import Downloader
from trapline.worker.download_stage import DownloadStage
from trapline.worker.handshake import Handshake
from trapline.worker.leases import HeldTasks, LeaseExtender, Outcome, Releaser, TaskState
from trapline.worker.lifecycle import Halt, StageTasks
from trapline.worker.outbox import Outbox, OutboxEntry
from trapline.worker.report import WorkerReport, WorkerStats, log_final_summary
from trapline.worker.reserve_stage import ReserveStage
from trapline.worker.tasks import Batch

logger = logging.getLogger(__name__)

# On abort, an in-flight reserve still gets this long: its tasks are then released.
RESERVE_WAIT_ON_ABORT_S = 5.0


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
        self._client = client
        self._outbox = outbox
        self._stop = stop
        self._abort = abort
        self._on_stats = on_stats
        self._stats_interval_s = stats_interval_s

        self.held = HeldTasks()
        # Set when the run must end: stop/abort, drained, or fatal.
        self._halt = Halt()
        self._tasks = StageTasks(self._halt, abort)
        self._releaser = Releaser(client, self.held)
        self._deliverer = Deliverer(
            client,
            outbox,
            deadline_s=settings.delivery_deadline_s,
            backoff_cap_s=settings.delivery_backoff_cap_s,
        )
        self._handshake = Handshake(client, settings, pipelines, self._halt)
        self._caps = Capabilities.plain_antenna()
        prefetch = max(1, settings.prefetch_batches)
        self._prefetch = asyncio.Semaphore(prefetch)
        self._reserved_q: asyncio.Queue[Batch] = asyncio.Queue(prefetch)
        self._ready_q: asyncio.Queue[Batch] = asyncio.Queue(prefetch)
        self._deliver_q: asyncio.Queue[OutboxEntry | None] = asyncio.Queue(DELIVER_QUEUE_SIZE)
        self._reserve = ReserveStage(
            client,
            settings,
            list(pipelines),
            self.held,
            halt=self._halt,
            releaser=self._releaser,
            prefetch=self._prefetch,
            out_q=self._reserved_q,
            drain=drain,
            all_settled=self._all_settled,
        )
        self._download = DownloadStage(
            pipelines,
            downloader,
            self.held,
            halt=self._halt,
            releaser=self._releaser,
            is_gone=self._reserve.is_gone,
            prefetch=self._prefetch,
            in_q=self._reserved_q,
            out_q=self._ready_q,
        )
        self._compute = ComputeStage(
            pipelines,
            compute_thread,
            outbox,
            self.held,
            halt=self._halt,
            releaser=self._releaser,
            is_gone=self._reserve.is_gone,
            prefetch=self._prefetch,
            in_q=self._ready_q,
            out_q=self._deliver_q,
        )
        self._delivery = DeliveryStage(
            self._deliverer, outbox, self.held, halt=self._halt, in_q=self._deliver_q
        )
        self._started = time.monotonic()
        self._starting = False

    def _all_settled(self) -> bool:
        """Nothing is held, and no computed result is on its way to delivery."""
        return len(self.held) == 0 and self._deliver_q.empty() and self._compute.handoff is None

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
                self._tasks.spawn("reserve", self._reserve.run())
                self._tasks.spawn("download", self._download.run())
                self._tasks.spawn("compute", self._compute.run())
                for i in range(DELIVERY_CONCURRENCY):
                    self._tasks.spawn(f"deliver-{i}", self._delivery.run())
                if self._caps.lease_extension and self._caps.ack_wait_s:
                    extender = LeaseExtender(
                        self._client,
                        self.held,
                        max(0.5, self._caps.ack_wait_s / 3),
                        on_job_gone=lambda job_id: self._reserve.job_gone(job_id, "job not found"),
                    )
                    self._tasks.spawn("extend", extender.run())
                self._tasks.spawn("register", self._handshake.register_loop())
                self._tasks.spawn("sweep", self._delivery.sweep())
                if self._on_stats is not None:
                    self._tasks.spawn("stats", self._stats_loop())
                await self._halt.wait()
            await self._shutdown()
            if self._on_stats is not None:
                self._on_stats(self.stats())  # the final state, after the last delivery
        finally:
            for watcher in watchers:
                watcher.cancel()
            await self._tasks.cancel_all()
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
        self._caps = await self._handshake.capabilities()
        self._releaser.supported = self._caps.release
        if self._halt.is_set():
            return
        self._handshake.warn_missing(self._caps)
        await self._outbox.adopt_orphans()
        await self._delivery.deliver_leftovers(self.settings.delivery_deadline_s)
        await self._handshake.register(first=True)

    async def _stats_loop(self) -> None:
        assert self._on_stats is not None
        while True:
            self._on_stats(self.stats())
            await asyncio.sleep(self._stats_interval_s)

    # -- shutdown --------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Stop reserving, release what is not computed, finish compute, deliver the rest."""
        grace = self.settings.grace_s
        tasks = self._tasks
        if self._stop.is_set() and not self._abort.is_set():
            logger.info(
                "stopping: releasing tasks not yet computed, letting the batch in compute finish "
                "(up to %g s) and delivering its results; signal again to stop at once",
                grace,
            )
        # 1. Stop reserving. A reserve already sent is awaited (briefly, even on abort),
        #    so what it returns is registered and released instead of stranded.
        limit = min(self.settings.http_timeout_s, RESERVE_WAIT_ON_ABORT_S)
        if self._abort.is_set() or not await tasks.wait("reserve", self.settings.http_timeout_s):
            await tasks.wait("reserve", limit, abortable=False)
        await tasks.cancel("reserve")
        await tasks.cancel("download")
        await self._reserve.wait_background()
        # 2. Everything reserved but not in compute goes back to the queue now.
        for q in (self._reserved_q, self._ready_q):
            while not q.empty():
                q.get_nowait()
        await self._releaser.release(
            self.held.in_states(TaskState.RESERVED, TaskState.DOWNLOADING, TaskState.WAITING),
            "shutting down",
        )
        # 3. The batch in compute gets the grace period.
        if self._compute.computing is not None and not await self._wait_compute(grace):
            batch = self._compute.computing
            await tasks.cancel("compute")
            if batch is not None:
                logger.warning(
                    "job %s: batch of %d images still computing %s; releasing it",
                    batch.job.id,
                    len(batch.tasks),
                    "at abort" if self._abort.is_set() else f"after {grace:g} s",
                )
                await self._releaser.release(
                    self.held.in_states(TaskState.COMPUTING), "compute overran the grace period"
                )
        await tasks.cancel("compute")
        # 4. Deliver what was computed, within a bounded time; the rest stays in the outbox.
        self._deliverer.set_cutoff(time.monotonic() + (0 if self._abort.is_set() else grace))
        # Bounded puts: a delivery stage that died (internal error) consumes nothing;
        # what it leaves queued is in the outbox and counted as kept below.
        handoff = self._compute.take_handoff()
        if handoff is not None:
            await self._put_delivery(handoff, grace + 5)
        for _ in range(DELIVERY_CONCURRENCY):
            await self._put_delivery(None, grace + 5)
        for i in range(DELIVERY_CONCURRENCY):
            # The cutoff bounds each delivery; the margin covers the last POST's cancel.
            if not await tasks.wait(f"deliver-{i}", grace + 5):
                self._deliverer.abort()
                await tasks.wait(f"deliver-{i}", 5)
            await tasks.cancel(f"deliver-{i}")
        # 5. Tasks whose delivery was cut off have their results in the outbox; anything
        #    else still held has no result on its way and goes back to the queue.
        delivering = self.held.in_states(TaskState.DELIVERING)
        self.held.settle([t.reply_subject for t in delivering], Outcome.KEPT)
        leftover = self.held.in_states(*TaskState)
        if leftover:
            await self._releaser.release(leftover, "not delivered at shutdown")
        if not await tasks.wait("sweep", grace + 5):
            self._deliverer.abort()
            await tasks.wait("sweep", 5)
        for name in ("extend", "register", "sweep", "stats"):
            await tasks.cancel(name)
        # Results kept in the outbox: give their tasks back so another worker can redo
        # them now; if the kept result arrives later the server stores it as valid.
        await self._releaser.release_kept()

    async def _put_delivery(self, entry: OutboxEntry | None, limit_s: float) -> bool:
        if not self._tasks.any_alive("deliver-"):
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
        while self._compute.computing is not None:
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
            downloaded=self._download.downloaded,
            computed=self._compute.computed,
            delivered=sum(t.counts[Outcome.DELIVERED] for t in tallies),
            failed=sum(t.counts[Outcome.FAILED] for t in tallies),
            released=sum(t.counts[Outcome.RELEASED] for t in tallies),
            kept=sum(t.counts[Outcome.KEPT] for t in tallies),
            held=len(self.held),
            states={str(k): v for k, v in states.items()},
            prefetched_batches=self._reserved_q.qsize() + self._ready_q.qsize(),
            deliver_queue=self._deliver_q.qsize(),
            jobs=[j.id for j in self._reserve.active_jobs],
        )

    async def _report(self) -> WorkerReport:
        report = WorkerReport.from_tallies(self.held.tallies())
        report.recovered = self._delivery.recovered
        report.malformed = self._reserve.malformed
        report.fatal = self._halt.fatal
        report.outbox_path = str(self._outbox.path)
        pending = await self._outbox.entries("pending")
        report.outbox_pending = sum(len(e.items) for e in pending)
        # Jobs whose summary was logged when the worker left them are not repeated.
        repeat = {
            job_id
            for job_id, tally in ((t.job_id, t) for t in self.held.tallies())
            if self._reserve.summarized.get(job_id) != tally.settled
        }
        log_final_summary(report, jobs=repeat)
        return report
