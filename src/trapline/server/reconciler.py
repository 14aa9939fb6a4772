"""The reconciler: a background task on every server replica, driven by the ledger.

JetStream's max-deliver is lazy on pull consumers (nothing happens after the
last lease expires until someone pulls), so the ledger's own lease deadlines
decide outcomes. Every change is a conditional UPDATE on the state it read, so
several replicas sweeping the same database never do anything twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import timedelta

from nats.aio.msg import Msg
from sqlalchemy import exists, select

from trapline.errors import QueueError, TraplineError
from trapline.ledger import transitions
from trapline.ledger.db import is_sqlite
from trapline.ledger.models import ImageState, Job, JobImage, JobStatus, utcnow
from trapline.server import dispatch, lifecycle
from trapline.server.context import AppContext

log = logging.getLogger(__name__)

_SWEEP_LIMIT = 2000


class Reconciler:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self.sweeps = 0
        self._queue_checked_at: float | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="trapline-reconciler")

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _watch_advisories(self) -> None:
        """Fast path: JetStream's max-delivery and termination advisories wake a sweep now.

        They are never the only path (max-deliver is lazy on pull consumers and
        advisories are not stored), so the sweep itself decides from the ledger.
        """
        names = self.ctx.queue.names

        async def on_advisory(msg: Msg) -> None:
            try:
                stream = json.loads(msg.data).get("stream", "")
            except ValueError:
                return
            if names.parse_stream(str(stream)) is not None:
                self._wake.set()

        nc = self.ctx.queue.nc
        for kind in ("MAX_DELIVERIES", "MSG_TERMINATED"):
            await nc.subscribe(f"$JS.EVENT.ADVISORY.CONSUMER.{kind}.>", cb=on_advisory)

    async def _run(self) -> None:
        interval = self.ctx.settings.reconcile_interval_s
        try:
            await self._watch_advisories()
        except TraplineError as exc:
            log.warning("JetStream advisories not watched (sweeps still run): %s", exc)
        while not self._stop.is_set():
            try:
                await self.sweep()
            except TraplineError as exc:
                log.warning("reconciler sweep incomplete: %s", exc)
            except Exception:
                log.exception("reconciler sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            self._wake.clear()

    async def sweep(self) -> None:
        """One pass: expired leases, deadlines, finalization, queue repair."""
        with self.ctx.metrics.reconciler_sweep.time():
            await self._sweep()

    async def _sweep(self) -> None:
        await self.expire_leases()
        await self.apply_deadlines()
        await self.finalize_complete()
        if not is_sqlite(self.ctx.engine):  # SQLite's counts never need folding
            async with self.ctx.sessions() as session, session.begin():
                await transitions.compact_counts(session)
        if self._queue_check_due() and self.ctx.queue.connected:
            self._queue_checked_at = asyncio.get_running_loop().time()
            await self.repair_queues()
        self.sweeps += 1

    def _queue_check_due(self) -> bool:
        """The first sweep checks the queues, then one every ``queue_check_interval_s``."""
        if self._queue_checked_at is None:
            return True
        since = asyncio.get_running_loop().time() - self._queue_checked_at
        return since >= self.ctx.settings.queue_check_interval_s

    async def expire_leases(self) -> int:
        """Leases past their deadline: back to queued, or failed after the last delivery."""
        ctx = self.ctx
        now = utcnow()
        async with ctx.sessions() as session, session.begin():
            expired = await transitions.expire_leases(
                session, now=now, max_deliver=ctx.settings.max_deliver, limit=_SWEEP_LIMIT
            )
        oldest = expired.oldest_deadline or now
        ctx.metrics.reconciler_lag.set((now - oldest).total_seconds())
        dispatch.count_lapses(ctx, expired.lapsed)
        to_term = [h.receipt for h in expired.lapsed.exhausted if h.receipt]
        if to_term:
            try:
                await ctx.queue.term(to_term, "max deliveries exhausted")
            except QueueError as exc:
                log.warning("could not TERM %d exhausted messages: %s", len(to_term), exc)
        return expired.lapsed.count

    async def apply_deadlines(self) -> None:
        """Jobs past their optional deadline: what remains fails with ``deadline passed``."""
        ctx = self.ctx
        now = utcnow()
        async with ctx.sessions() as session:
            job_ids = (
                await session.scalars(
                    select(Job.id).where(
                        Job.status == JobStatus.STARTED,
                        Job.deadline_at.is_not(None),
                        Job.deadline_at < now,
                    )
                )
            ).all()
        for job_id in job_ids:
            async with ctx.sessions() as session, session.begin():
                await lifecycle.fail_remaining(
                    session, job_id, "deadline passed", level=logging.ERROR, metrics=ctx.metrics
                )
            await lifecycle.finalize_if_complete(ctx, job_id)

    async def finalize_complete(self) -> None:
        """Safety net: finalize STARTED jobs whose every image has an outcome."""
        async with self.ctx.sessions() as session:
            open_images = exists().where(
                JobImage.job_id == Job.id,
                JobImage.state.in_(ImageState.OPEN),
            )
            job_ids = (
                await session.scalars(
                    select(Job.id).where(Job.status == JobStatus.STARTED, ~open_images)
                )
            ).all()
        for job_id in job_ids:
            await lifecycle.finalize_if_complete(self.ctx, job_id)

    async def repair_queues(self) -> None:
        """Delete streams of finished jobs; rebuild running jobs' queues that vanished."""
        ctx = self.ctx
        now = utcnow()
        # Running jobs first: a job STARTED now had its stream created before it
        # became STARTED, so listing streams afterwards cannot miss a new one.
        async with ctx.sessions() as session:
            running = (
                await session.scalars(
                    select(Job).where(Job.status.in_([JobStatus.STARTED, JobStatus.PENDING]))
                )
            ).all()
        streams = set(await ctx.queue.list_job_streams())
        # And jobs of listed streams after listing: a stream created meanwhile has its job.
        async with ctx.sessions() as session:
            jobs = (
                {
                    j.id: j
                    for j in (
                        await session.scalars(
                            select(Job).where(Job.id.in_({job_id for job_id, _ in streams}))
                        )
                    ).all()
                }
                if streams
                else {}
            )
        for job_id, gen in streams:
            job = jobs.get(job_id)
            stale = job is None or JobStatus(job.status).finished or gen < job.queue_generation
            if stale:
                log.info("removing leftover queue %s", ctx.queue.names.stream(job_id, gen))
                await ctx.queue.delete_job_queue(job_id, gen)
        for job in running:
            if job.status == JobStatus.PENDING:
                queued_at = job.queued_at or job.created_at
                if now - queued_at < timedelta(seconds=ctx.settings.pending_requeue_after_s):
                    continue
            elif (job.id, job.queue_generation) in streams:
                continue
            log.warning(
                "job %s: queue %s is missing; re-queuing from the ledger",
                job.id,
                ctx.queue.names.stream(job.id, job.queue_generation),
            )
            try:
                await lifecycle.queue_job(ctx, job.id)
            except TraplineError as exc:
                log.warning("job %s: re-queue failed: %s", job.id, exc)
