"""Job lifecycle: create, queue (and re-queue from the ledger), finalize, cancel, retry.

Order of effects everywhere: the ledger commits first, the queue follows. A
crash between the two leaves the ledger ahead of the queue, and the reconciler
repairs the queue from the ledger (never the other way round).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from trapline.errors import Conflict, InvalidRequest, NotFound, QueueError
from trapline.ledger import events
from trapline.ledger.models import ImageState, Job, JobImage, JobStatus, utcnow
from trapline.ledger.queries import job_counts, remaining_images
from trapline.server.context import AppContext
from trapline.server.metrics import Metrics

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp"}
MAX_IMAGE_ID_LEN = 200


@dataclass
class NewImage:
    image_id: str
    url: str | None = None
    path: str | None = None


def images_from_urls(raw: Sequence[dict[str, Any]]) -> list[NewImage]:
    """Validate a list of ``{"id"?, "url"}``; every offending image is named in one error."""
    errors: list[dict[str, object]] = []
    images: list[NewImage] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        url = item.get("url")
        image_id = item.get("id")
        image_id = str(index + 1) if image_id is None else str(image_id)
        reason = None
        if not isinstance(url, str) or not url.strip():
            reason = "missing url"
        else:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc or " " in url:
                reason = f"malformed url {url[:200]!r} (need http:// or https://)"
        if not image_id.strip() or len(image_id) > MAX_IMAGE_ID_LEN:
            reason = reason or f"image id must be 1-{MAX_IMAGE_ID_LEN} characters"
        elif image_id in seen:
            reason = reason or f"duplicate image id {image_id!r}"
        if reason:
            errors.append({"index": index, "id": image_id, "reason": reason})
            continue
        seen.add(image_id)
        images.append(NewImage(image_id=image_id, url=str(url)))
    if errors:
        raise InvalidRequest(f"{len(errors)} image(s) refused: see errors", errors=errors)
    if not images:
        raise InvalidRequest("a job needs at least one image")
    return images


def images_from_dir(directory: str) -> list[NewImage]:
    """Every image file under ``directory`` (recursive, sorted); ids are relative paths."""
    root = Path(directory)
    if not root.is_absolute():
        raise InvalidRequest(f"images_dir must be an absolute path, got {directory!r}")
    if not root.is_dir():
        raise InvalidRequest(f"images_dir {directory!r} is not a readable directory on the server")
    images = [
        NewImage(image_id=p.relative_to(root).as_posix(), path=str(p))
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not images:
        raise InvalidRequest(f"images_dir {directory!r} holds no image files")
    too_long = [i.image_id for i in images if len(i.image_id) > MAX_IMAGE_ID_LEN]
    if too_long:
        raise InvalidRequest(f"image paths too long to use as ids: {too_long[:5]}")
    return images


async def create_job(
    ctx: AppContext,
    *,
    name: str,
    project_id: int,
    pipeline_slug: str,
    images: list[NewImage],
    failure_threshold: float,
    images_dir: str | None,
    deadline_at: datetime | None,
    start_now: bool,
) -> int:
    async with ctx.sessions() as session, session.begin():
        job = Job(
            name=name,
            project_id=project_id,
            pipeline_slug=pipeline_slug,
            status=JobStatus.CREATED,
            failure_threshold=failure_threshold,
            total=len(images),
            images_dir=images_dir,
            deadline_at=deadline_at,
            created_at=utcnow(),
        )
        session.add(job)
        await session.flush()
        job_id = job.id
        now = utcnow()
        await session.execute(
            insert(JobImage),
            [
                {
                    "job_id": job_id,
                    "image_id": i.image_id,
                    "url": i.url,
                    "path": i.path,
                    "state": ImageState.QUEUED.value,
                    "deliveries": 0,
                    "leases": 0,
                    "expiries": 0,
                    "updated_at": now,
                }
                for i in images
            ],
        )
        events.record(
            session,
            job_id,
            f"created with {len(images)} images for pipeline {pipeline_slug!r}",
        )
    if start_now:
        await queue_job(ctx, job_id)
    return job_id


async def _get_job(session: AsyncSession, job_id: int) -> Job:
    job = await session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


async def queue_job(ctx: AppContext, job_id: int, *, include_failed: bool = False) -> int:
    """(Re)build the job's queue from the ledger under a new generation; returns images queued.

    Publishes every image without an outcome (plus failed ones for a retry). Used
    to start a job, retry it, and repair a queue lost with the NATS store.
    """
    async with ctx.sessions() as session, session.begin():
        job = await _get_job(session, job_id)
        old_gen = job.queue_generation
        bumped = await session.execute(
            update(Job)
            .where(Job.id == job_id, Job.queue_generation == old_gen)
            .values(queue_generation=old_gen + 1, status=JobStatus.PENDING, queued_at=utcnow())
        )
        if bumped.rowcount != 1:  # type: ignore[attr-defined]
            raise Conflict(f"job {job_id} is being re-queued by another server")
        gen = old_gen + 1
    states = [ImageState.QUEUED, ImageState.RESERVED]
    if include_failed:
        states.append(ImageState.FAILED)
    async with ctx.sessions() as session:
        rows = (
            await session.execute(
                select(JobImage.id, JobImage.image_id, JobImage.state)
                .where(JobImage.job_id == job_id, JobImage.state.in_(states))
                .order_by(JobImage.id)
            )
        ).all()
    await ctx.queue.create_job_queue(job_id, gen)
    seqs = await ctx.queue.publish_tasks(job_id, gen, [{"image_id": r.image_id} for r in rows])
    now = utcnow()
    async with ctx.sessions() as session, session.begin():
        await session.execute(
            update(JobImage),
            [
                {
                    "id": r.id,
                    "msg_seq": seq,
                    "state": ImageState.QUEUED.value,
                    "deliveries": 0,
                    "leases": 0,
                    "receipt": None,
                    "lease_deadline": None,
                    "updated_at": now,
                }
                for r, seq in zip(rows, seqs, strict=True)
            ],
        )
        retried = [r.image_id for r in rows if r.state == ImageState.FAILED]
        if retried:
            await session.execute(
                update(JobImage)
                .where(JobImage.job_id == job_id, JobImage.image_id.in_(retried))
                .values(reason=None, failed_at=None)
            )
            events.record_images(session, job_id, retried, "re-queued for retry")
        await session.execute(
            update(Job)
            .where(Job.id == job_id, Job.queue_generation == gen)
            .values(status=JobStatus.STARTED, finished_at=None)
        )
        job = await _get_job(session, job_id)
        if job.started_at is None:
            job.started_at = now
        events.record(session, job_id, f"queued {len(rows)} images (queue generation {gen})")
    if old_gen:
        await _delete_queue_quietly(ctx, job_id, old_gen)
    if not rows:
        await finalize_if_complete(ctx, job_id)
    return len(rows)


async def _delete_queue_quietly(ctx: AppContext, job_id: int, generation: int) -> None:
    try:
        await ctx.queue.delete_job_queue(job_id, generation)
    except QueueError as exc:
        # The reconciler removes streams of finished jobs; nothing is lost meanwhile.
        log.warning("job %s: could not delete queue generation %s: %s", job_id, generation, exc)


def final_status(failed: int, total: int, threshold: float) -> JobStatus:
    if total and failed / total > threshold:
        return JobStatus.FAILURE
    return JobStatus.SUCCESS


async def finalize_if_complete(ctx: AppContext, job_id: int) -> str | None:
    """Finish a STARTED job whose every image has an outcome; exactly one caller wins."""
    async with ctx.sessions() as session, session.begin():
        if await remaining_images(session, job_id):
            return None
        job = await _get_job(session, job_id)
        if job.status != JobStatus.STARTED:
            return None
        counts = await job_counts(session, job_id)
        status = final_status(counts.failed, counts.total, job.failure_threshold)
        won = await session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.STARTED)
            .values(status=status, finished_at=utcnow())
        )
        if won.rowcount != 1:  # type: ignore[attr-defined]
            return None
        ctx.metrics.finalizations.labels(status.value).inc()
        summary = f"finished {status}: {counts.done} done, {counts.failed} failed of {counts.total}"
        if counts.failed:
            failed_ids = (
                await session.scalars(
                    select(JobImage.image_id).where(
                        JobImage.job_id == job_id, JobImage.state == ImageState.FAILED
                    )
                )
            ).all()
            events.record(
                session,
                job_id,
                f"{summary}; failed images",
                level=logging.WARNING,
                image_ids=failed_ids,
            )
        else:
            events.record(session, job_id, summary)
        generation = job.queue_generation
    await _delete_queue_quietly(ctx, job_id, generation)
    return status


async def reevaluate_finished(session: AsyncSession, job_id: int) -> None:
    """After a late result: re-apply the threshold rule to a finished job (REVOKED stays)."""
    job = await _get_job(session, job_id)
    if job.status not in (JobStatus.SUCCESS, JobStatus.FAILURE):
        return
    counts = await job_counts(session, job_id)
    status = final_status(counts.failed, counts.total, job.failure_threshold)
    if status != job.status:
        job.status = status
        events.record(session, job_id, f"status re-evaluated after a late result: {status}")


async def fail_remaining(
    session: AsyncSession, job_id: int, reason: str, *, level: int, metrics: Metrics
) -> list[str]:
    """Fail every image of the job still without an outcome, naming each in the log."""
    now = utcnow()
    failed = (
        await session.scalars(
            update(JobImage)
            .where(
                JobImage.job_id == job_id,
                JobImage.state.in_([ImageState.QUEUED, ImageState.RESERVED]),
            )
            .values(
                state=ImageState.FAILED,
                reason=reason,
                failed_at=now,
                lease_deadline=None,
                updated_at=now,
            )
            .returning(JobImage.image_id)
            .execution_options(synchronize_session=False)
        )
    ).all()
    if failed:
        metrics.images_failed.labels(reason).inc(len(failed))
        events.record_images(session, job_id, failed, f"failed: {reason}:", level=level)
    return list(failed)


async def cancel_job(ctx: AppContext, job_id: int) -> None:
    """REVOKED; committed results stay, images without an outcome fail with ``cancelled``."""
    async with ctx.sessions() as session, session.begin():
        job = await _get_job(session, job_id)
        if JobStatus(job.status).finished:
            if job.status == JobStatus.REVOKED:
                return
            raise Conflict(f"job {job_id} already finished ({job.status})")
        now = utcnow()
        await fail_remaining(
            session, job_id, "cancelled", level=logging.WARNING, metrics=ctx.metrics
        )
        job.status = JobStatus.REVOKED
        job.finished_at = now
        ctx.metrics.finalizations.labels(JobStatus.REVOKED.value).inc()
        events.record(session, job_id, "cancelled (REVOKED)", level=logging.WARNING)
        generation = job.queue_generation
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
