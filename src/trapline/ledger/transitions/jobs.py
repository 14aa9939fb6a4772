"""Job-level transitions: finalize (exactly one caller wins), re-evaluate after a late
result, fail what remains (cancel, deadline), revoke.

Lock order everywhere: image rows first, the job row last, so concurrent transitions
on one job queue up instead of deadlocking (PostgreSQL; SQLite serializes writers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import exists, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from trapline.ledger.events import Journal
from trapline.ledger.models import ImageState, JobStatus
from trapline.ledger.queries import Counts, job_counts
from trapline.ledger.transitions.common import IMAGES, JOBS, lock_images

_FINISHED = [s.value for s in JobStatus if s.finished]


@dataclass(frozen=True)
class Finalized:
    status: JobStatus
    counts: Counts
    generation: int  # the queue generation to delete now that the job is over


def final_status(failed: int, total: int, threshold: float) -> JobStatus:
    if total and failed / total > threshold:
        return JobStatus.FAILURE
    return JobStatus.SUCCESS


async def conclude(session: AsyncSession, job_id: int, *, now: datetime) -> Finalized | None:
    """After this transaction recorded outcomes: finish the job if none is open any more,
    or re-apply the threshold to a job already finished (a late result).

    The job row is locked first (PostgreSQL): of two transactions committing a job's
    last outcomes at once, the second then sees the first's, so one of them finishes
    the job instead of each seeing the other's image still open. ``FOR NO KEY UPDATE``,
    not ``FOR UPDATE``: the rows this transaction inserted (results, history) already
    hold a key-share lock on the job through their foreign keys, and so may another
    poster's; a full ``FOR UPDATE`` would wait on each other's key-share: a deadlock.
    """
    status = await session.scalar(
        select(JOBS.c.status).where(JOBS.c.id == job_id).with_for_update(key_share=True)
    )
    if status == JobStatus.STARTED:
        return await finalize(session, job_id, now=now)
    if status in (JobStatus.SUCCESS, JobStatus.FAILURE):
        await reevaluate(session, job_id, now=now)
    return None


async def finalize(session: AsyncSession, job_id: int, *, now: datetime) -> Finalized | None:
    """Finish a STARTED job whose every image has an outcome; exactly one caller wins."""
    any_open = await session.scalar(
        select(exists().where(IMAGES.c.job_id == job_id, IMAGES.c.state.in_(ImageState.OPEN)))
    )
    if any_open:
        return None
    job = (
        await session.execute(
            select(JOBS.c.failure_threshold, JOBS.c.queue_generation).where(
                JOBS.c.id == job_id, JOBS.c.status == JobStatus.STARTED
            )
        )
    ).first()
    if job is None:
        return None
    counts = await job_counts(session, job_id)
    status = final_status(counts.failed, counts.total, job.failure_threshold)
    won = await session.scalar(
        update(JOBS)
        .where(JOBS.c.id == job_id, JOBS.c.status == JobStatus.STARTED)
        .values(status=status, finished_at=now)
        .returning(JOBS.c.id)
    )
    if won is None:
        return None
    journal = Journal(now)
    summary = f"finished {status}: {counts.done} done, {counts.failed} failed of {counts.total}"
    if counts.failed:
        failed = await session.scalars(
            select(IMAGES.c.image_id).where(
                IMAGES.c.job_id == job_id, IMAGES.c.state == ImageState.FAILED
            )
        )
        journal.line(
            job_id, f"{summary}; failed images", level=logging.WARNING, image_ids=failed.all()
        )
    else:
        journal.line(job_id, summary)
    await journal.write(session)
    return Finalized(status, counts, job.queue_generation)


async def reevaluate(session: AsyncSession, job_id: int, *, now: datetime) -> JobStatus | None:
    """Re-apply the threshold rule to a finished job (REVOKED stays); the new status if
    it changed."""
    job = (
        await session.execute(
            select(JOBS.c.status, JOBS.c.failure_threshold).where(JOBS.c.id == job_id)
        )
    ).first()
    if job is None or job.status not in (JobStatus.SUCCESS, JobStatus.FAILURE):
        return None
    counts = await job_counts(session, job_id)
    status = final_status(counts.failed, counts.total, job.failure_threshold)
    if status == job.status:
        return None
    won = await session.scalar(
        update(JOBS)
        .where(JOBS.c.id == job_id, JOBS.c.status == job.status)
        .values(status=status)
        .returning(JOBS.c.id)
    )
    if won is None:
        return None
    journal = Journal(now)
    journal.line(job_id, f"status re-evaluated after a late result: {status}")
    await journal.write(session)
    return status


async def fail_open(
    session: AsyncSession, job_id: int, reason: str, *, level: int, now: datetime
) -> list[str]:
    """Fail every image of the job still without an outcome, naming each in the log."""
    await lock_images(session, IMAGES.c.job_id == job_id, IMAGES.c.state.in_(ImageState.OPEN))
    failed = (
        await session.scalars(
            update(IMAGES)
            .where(IMAGES.c.job_id == job_id, IMAGES.c.state.in_(ImageState.OPEN))
            .values(
                state=ImageState.FAILED,
                reason=reason,
                failed_at=now,
                lease_deadline=None,
                updated_at=now,
            )
            .returning(IMAGES.c.image_id)
        )
    ).all()
    if failed:
        journal = Journal(now)
        journal.images(job_id, failed, f"failed: {reason}:", level=level)
        await journal.write(session)
    return list(failed)


# Delta rows a job may gather before the reconciler folds them into one per name.
_COMPACT_AFTER_ROWS = 64

_COMPACT = text(
    """
    WITH busy AS (
        SELECT job_id FROM job_counts GROUP BY job_id HAVING count(*) > :after
    ), folded AS (
        DELETE FROM job_counts c USING busy WHERE c.job_id = busy.job_id
        RETURNING c.job_id, c.name, c.n, c.changed_at
    )
    INSERT INTO job_counts (job_id, name, n, changed_at)
    SELECT job_id, name, sum(n), max(changed_at) FROM folded GROUP BY job_id, name
    """
)


async def compact_counts(session: AsyncSession) -> None:
    """Fold each busy job's count deltas into one row per name (PostgreSQL only: SQLite
    keeps one row per name to begin with).

    One statement: the DELETE takes the rows its snapshot sees and the INSERT puts back
    their sums, so deltas committed meanwhile stay as they are, and two replicas
    folding at once each put back only what they took.
    """
    await session.execute(_COMPACT, {"after": _COMPACT_AFTER_ROWS})


async def revoke(session: AsyncSession, job_id: int, *, now: datetime) -> int | None:
    """REVOKED, unless the job finished meanwhile; its queue generation when this won."""
    generation: int | None = await session.scalar(
        update(JOBS)
        .where(JOBS.c.id == job_id, JOBS.c.status.not_in(_FINISHED))
        .values(status=JobStatus.REVOKED, finished_at=now)
        .returning(JOBS.c.queue_generation)
    )
    if generation is not None:
        journal = Journal(now)
        journal.line(job_id, "cancelled (REVOKED)", level=logging.WARNING)
        await journal.write(session)
    return generation
