"""Job lifecycle: queue (and re-queue from the ledger), finalize, cancel, retry.

Order of effects everywhere: the ledger commits first, the queue follows. A
crash between the two leaves the ledger ahead of the queue, and the reconciler
repairs the queue from the ledger (never the other way round).

Queuing works a page at a time (``PAGE`` images), so the server's memory is
bounded by the page, not by the job (creation is :mod:`trapline.server.creation`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import Row, Table, bindparam, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from trapline.errors import Conflict, NotFound, QueueError
from trapline.ledger import events, transitions
from trapline.ledger.db import refresh_statistics
from trapline.ledger.models import ImageState, Job, JobImage, JobStatus, utcnow
from trapline.ledger.queries import job_counts
from trapline.server.context import AppContext
from trapline.server.metrics import Metrics

log = logging.getLogger(__name__)

# Images inserted, read, published and recorded at a time; also the most one request
# may append to a job (bounded by the database drivers' limit of ~32k bound values).
PAGE = 10_000
JOB_IMAGES = cast(Table, JobImage.__table__)
# A row of a page being queued: id, image id, state, msg_seq, deliveries, leases,
# receipt, lease deadline.
_PageRow = Row[int, str, str, int | None, int, int, str | None, datetime | None]


async def _get_job(session: AsyncSession, job_id: int) -> Job:
    job = await session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


async def start_job(ctx: AppContext, job_id: int) -> int:
    """Queue a CREATED job (409 if it was started already or has no images)."""
    return await queue_job(ctx, job_id, first_start=True)


async def _new_generation(ctx: AppContext, job_id: int, *, first_start: bool) -> tuple[int, int]:
    """(new, old) queue generation; the job is PENDING until its queue is built."""
    async with ctx.sessions() as session, session.begin():
        job = await _get_job(session, job_id)
        old_gen = job.queue_generation
        if first_start and (job.status != JobStatus.CREATED or old_gen):
            raise Conflict(f"job {job_id} was already started ({job.status})")
        if first_start and not job.total:
            raise Conflict(
                f"job {job_id} has no images yet: add them with"
                f" POST /api/v2/jobs/{job_id}/images/ before starting it"
            )
        bumped = await session.execute(
            update(Job)
            .where(Job.id == job_id, Job.queue_generation == old_gen)
            .values(queue_generation=old_gen + 1, status=JobStatus.PENDING, queued_at=utcnow())
        )
        if bumped.rowcount != 1:  # type: ignore[attr-defined]
            if first_start:
                raise Conflict(f"job {job_id} was already started")
            raise Conflict(f"job {job_id} is being re-queued by another server")
        if old_gen:
            # Stream sequences restart at 1 in the new stream: rows left out of it
            # must not keep an old one that a new message's lookup could hit.
            await session.execute(
                update(JOB_IMAGES)
                .where(
                    JOB_IMAGES.c.job_id == job_id,
                    JOB_IMAGES.c.msg_seq.is_not(None),
                    JOB_IMAGES.c.state.in_([ImageState.DONE, ImageState.FAILED]),
                )
                .values(msg_seq=None)
            )
    return old_gen + 1, old_gen


async def queue_job(
    ctx: AppContext, job_id: int, *, include_failed: bool = False, first_start: bool = False
) -> int:
    """(Re)build the job's queue from the ledger under a new generation; returns images queued.

    Publishes every image without an outcome (plus failed ones for a retry), a page
    at a time: read the page (keyset on the row id), publish it, record its stream
    sequences, so memory is bounded by the page. The job stays PENDING (nothing is
    reserved) until every page is recorded; each page also renews ``queued_at``, so
    the reconciler re-queues only a build that stopped making progress. Used to
    start a job, retry it, and repair a queue lost with the NATS store.
    """
    gen, old_gen = await _new_generation(ctx, job_id, first_start=first_start)
    await refresh_statistics(ctx.engine)
    states = [*ImageState.OPEN, *([ImageState.FAILED] if include_failed else [])]
    await ctx.queue.create_job_queue(job_id, gen)
    queued = 0
    after_id = 0
    while True:
        async with ctx.reads() as session:
            rows = (
                await session.execute(
                    select(
                        JobImage.id,
                        JobImage.image_id,
                        JobImage.state,
                        JobImage.msg_seq,
                        JobImage.deliveries,
                        JobImage.leases,
                        JobImage.receipt,
                        JobImage.lease_deadline,
                    )
                    .where(
                        JobImage.job_id == job_id,
                        JobImage.state.in_(states),
                        JobImage.id > after_id,
                    )
                    .order_by(JobImage.id)
                    .limit(PAGE)
                )
            ).all()
        if not rows:
            break
        seqs = await ctx.queue.publish_tasks(job_id, gen, [{"image_id": r.image_id} for r in rows])
        await _record_page(ctx, job_id, gen, rows, seqs)
        queued += len(rows)
        after_id = rows[-1].id
    now = utcnow()
    async with ctx.sessions() as session, session.begin():
        started = await session.execute(
            update(Job)
            .where(Job.id == job_id, Job.queue_generation == gen)
            .values(
                status=JobStatus.STARTED,
                finished_at=None,
                started_at=func.coalesce(Job.started_at, now),
            )
        )
        if started.rowcount != 1:  # type: ignore[attr-defined]
            raise Conflict(f"job {job_id} was re-queued by another server meanwhile")
        events.record(session, job_id, f"queued {queued} images (queue generation {gen})")
    if old_gen:
        await _delete_queue_quietly(ctx, job_id, old_gen)
    if not queued:
        await finalize_if_complete(ctx, job_id)
    return queued


async def _record_page(
    ctx: AppContext, job_id: int, gen: int, rows: Sequence[_PageRow], seqs: Sequence[int]
) -> None:
    """Record a published page: its rows queued under their new stream sequences.

    Only rows that differ are written (a fresh job's rows already hold their
    sequence, see :func:`_insert_images`), and only while they have no outcome:
    a result that landed since the page was read stays.
    """
    now = utcnow()
    async with ctx.sessions() as session, session.begin():
        alive = await session.execute(
            update(Job).where(Job.id == job_id, Job.queue_generation == gen).values(queued_at=now)
        )
        if alive.rowcount != 1:  # type: ignore[attr-defined]
            raise Conflict(f"job {job_id} was re-queued by another server meanwhile")
        failed = [r.id for r in rows if r.state == ImageState.FAILED]
        if failed:
            retried = (
                await session.scalars(
                    update(JOB_IMAGES)
                    .where(
                        JOB_IMAGES.c.id.in_(failed), JOB_IMAGES.c.state == ImageState.FAILED.value
                    )
                    .values(state=ImageState.QUEUED.value, reason=None, failed_at=None)
                    .returning(JOB_IMAGES.c.image_id)
                )
            ).all()
            if retried:
                journal = events.Journal(now)
                journal.images(job_id, retried, "re-queued for retry")
                await journal.write(session)
        stale = [
            {"row_id": r.id, "seq": seq}
            for r, seq in zip(rows, seqs, strict=True)
            if r.msg_seq != seq
            or r.state != ImageState.QUEUED
            or r.deliveries
            or r.leases
            or r.receipt is not None
            or r.lease_deadline is not None
        ]
        if stale:
            await session.execute(
                update(JOB_IMAGES)
                .where(
                    JOB_IMAGES.c.id == bindparam("row_id"),
                    # Not IN (…): an expanding parameter cannot go with executemany.
                    or_(*(JOB_IMAGES.c.state == s.value for s in ImageState.OPEN)),
                )
                .values(
                    msg_seq=bindparam("seq"),
                    state=ImageState.QUEUED.value,
                    deliveries=0,
                    leases=0,
                    receipt=None,
                    lease_deadline=None,
                    updated_at=now,
                ),
                stale,
            )


async def _delete_queue_quietly(ctx: AppContext, job_id: int, generation: int) -> None:
    try:
        await ctx.queue.delete_job_queue(job_id, generation)
    except QueueError as exc:
        # The reconciler removes streams of finished jobs; nothing is lost meanwhile.
        log.warning("job %s: could not delete queue generation %s: %s", job_id, generation, exc)


async def finalize_if_complete(ctx: AppContext, job_id: int) -> str | None:
    """Finish a STARTED job whose every image has an outcome; exactly one caller wins."""
    async with ctx.sessions() as session, session.begin():
        finalized = await transitions.finalize(session, job_id, now=utcnow())
    if finalized is None:
        return None
    return await finished(ctx, job_id, finalized)


async def finished(ctx: AppContext, job_id: int, finalized: transitions.Finalized) -> str:
    """After the commit that finalized the job: count it, then delete its queue."""
    ctx.metrics.finalizations.labels(finalized.status.value).inc()
    await _delete_queue_quietly(ctx, job_id, finalized.generation)
    return finalized.status


async def fail_remaining(
    session: AsyncSession, job_id: int, reason: str, *, level: int, metrics: Metrics
) -> list[str]:
    """Fail every image of the job still without an outcome, naming each in the log."""
    failed = await transitions.fail_open(session, job_id, reason, level=level, now=utcnow())
    if failed:
        metrics.images_failed.labels(reason).inc(len(failed))
    return failed


async def cancel_job(ctx: AppContext, job_id: int) -> None:
    """REVOKED; committed results stay, images without an outcome fail with ``cancelled``."""
    async with ctx.sessions() as session, session.begin():
        job = await _get_job(session, job_id)
        if JobStatus(job.status).finished:
            if job.status == JobStatus.REVOKED:
                return
            raise Conflict(f"job {job_id} already finished ({job.status})")
        now = utcnow()
        failed = await transitions.fail_open(
            session, job_id, "cancelled", level=logging.WARNING, now=now
        )
        generation = await transitions.revoke(session, job_id, now=now)
        if generation is None:  # it finished meanwhile: the failures roll back with this
            raise Conflict(f"job {job_id} finished while being cancelled")
    if failed:
        ctx.metrics.images_failed.labels("cancelled").inc(len(failed))
    ctx.metrics.finalizations.labels(JobStatus.REVOKED.value).inc()
    await _delete_queue_quietly(ctx, job_id, generation)


async def retry_job(ctx: AppContext, job_id: int) -> int:
    """Re-queue the job's failed images (and anything still without an outcome)."""
    async with ctx.sessions() as session:
        job = await _get_job(session, job_id)
        counts = await job_counts(session, job_id)
    if job.status == JobStatus.CREATED:
        raise Conflict(f"job {job_id} has not been started")
    if counts.failed == 0:
        raise Conflict(f"job {job_id} has no failed images to retry")
    return await queue_job(ctx, job_id, include_failed=True)
