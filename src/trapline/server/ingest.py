"""Result ingestion: validate → one transaction → commit → ACK → a status per item.

A 2xx means every item answered ``accepted`` or ``duplicate`` is committed.
Outcomes are set only where an image has none yet (a success may also upgrade
a failed image), so replays, redeliveries and concurrent duplicate POSTs change
nothing: the rows an UPDATE actually changed are what counts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from trapline.errors import QueueError, ReceiptError
from trapline.ledger import events
from trapline.ledger.models import (
    Detection,
    ImageResultRow,
    ImageState,
    Job,
    JobImage,
    JobStatus,
    utcnow,
)
from trapline.server import lifecycle
from trapline.server.context import AppContext
from trapline.server.dispatch import Holder, is_current, receipt_of_job
from trapline.server.results import CheckedItem, check_item

log = logging.getLogger(__name__)


@dataclass
class ItemStatus:
    reply_subject: str
    status: str  # accepted | duplicate | rejected
    task_id: str | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"reply_subject": self.reply_subject, "status": self.status}
        if self.task_id is not None:
            d["task_id"] = self.task_id
        if self.reason is not None:
            d["reason"] = self.reason
        return d


@dataclass
class IngestReport:
    items: list[ItemStatus] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for i in self.items if i.status == status)


async def ingest(
    ctx: AppContext, job: Job, raw_items: Sequence[Any], holder: Holder
) -> IngestReport:
    checked = [check_item(i, item) for i, item in enumerate(raw_items)]
    statuses: list[ItemStatus | None] = [None] * len(checked)
    to_ack: list[str] = []
    # Map receipts to ledger rows: current generation by stream sequence, earlier
    # generations (queue rebuilt since) by the image id the result names.
    by_seq: dict[int, CheckedItem] = {}
    for item in checked:
        if item.rejected:
            continue
        try:
            receipt = receipt_of_job(ctx.queue.names, job, item.reply_subject)
        except ReceiptError as exc:
            item.rejected = str(exc)
            continue
        if is_current(ctx.queue.names, job, receipt):
            by_seq[receipt.stream_seq] = item
            to_ack.append(receipt.subject)
    touched_late = False
    async with ctx.sessions() as session, session.begin():
        seq_rows = (
            {
                r.msg_seq: r
                for r in (
                    await session.scalars(
                        select(JobImage).where(
                            JobImage.job_id == job.id, JobImage.msg_seq.in_(list(by_seq))
                        )
                    )
                ).all()
            }
            if by_seq
            else {}
        )
        ids_needed = {i.image_id for i in checked if not i.rejected and i.image_id}
        id_rows = (
            {
                r.image_id: r
                for r in (
                    await session.scalars(
                        select(JobImage).where(
                            JobImage.job_id == job.id, JobImage.image_id.in_(ids_needed)
                        )
                    )
                ).all()
            }
            if ids_needed
            else {}
        )
        seq_of_item = {id(item): seq for seq, item in by_seq.items()}
        accepted_ids: list[str] = []
        failed_ids: list[str] = []
        for item in checked:
            if item.rejected:
                continue
            seq = seq_of_item.get(id(item))
            row = seq_rows.get(seq) if seq is not None else id_rows.get(item.image_id or "")
            if row is None:
                item.rejected = (
                    "reply_subject does not match a task of this job"
                    if seq is not None
                    else f"image {item.image_id!r} is not in job {job.id}"
                )
                continue
            if item.image_id != row.image_id:
                item.rejected = (
                    f"reply_subject is the receipt of image {row.image_id!r}, "
                    f"result is for {item.image_id!r}"
                )
                continue
            status = await _apply(session, job, row, item, holder)
            statuses[item.index] = ItemStatus(
                item.reply_subject, status, f"{job.id}:{row.image_id}"
            )
            if status == "accepted":
                if item.error is not None:
                    failed_ids.append(row.image_id)
                else:
                    accepted_ids.append(row.image_id)
        for item in checked:
            if item.rejected:
                statuses[item.index] = ItemStatus(
                    item.reply_subject, "rejected", reason=item.rejected
                )
                log.warning(
                    "job %s: rejected result item for image %s (%s): %s",
                    job.id,
                    item.image_id or "unknown",
                    item.reply_subject or "no reply_subject",
                    item.rejected,
                )
        report = IngestReport([s for s in statuses if s is not None])
        for s in report.items:
            ctx.metrics.results.labels(s.status).inc()
        if failed_ids:
            ctx.metrics.images_failed.labels("worker error").inc(len(failed_ids))
        touched_late = JobStatus(job.status).finished and (accepted_ids or failed_ids) != []
        rejected = [s for s in report.items if s.status == "rejected"]
        events.record(
            session,
            job.id,
            f"results from {holder.describe()}: {report.count('accepted')} accepted, "
            f"{report.count('duplicate')} duplicate, {len(rejected)} rejected",
            level=logging.WARNING if rejected else logging.INFO,
        )
        events.record_history(
            session,
            job.id,
            [(i, f"result accepted from {holder.describe()}") for i in accepted_ids],
        )
        if failed_ids:
            events.record_images(
                session, job.id, failed_ids, "worker reported failure for", level=logging.WARNING
            )
        if touched_late:
            await lifecycle.reevaluate_finished(session, job.id)
    # Committed. Now, and only now, acknowledge: an ACK lost here is repaired when
    # the message comes back and the reserve path finds the image settled.
    settled = {s.reply_subject for s in report.items if s.status in ("accepted", "duplicate")}
    acks = [s for s in to_ack if s in settled]
    try:
        await ctx.queue.ack(acks)
    except QueueError as exc:
        log.warning("job %s: ACK of %d committed results not sent: %s", job.id, len(acks), exc)
    if job.status == JobStatus.STARTED and report.count("accepted"):
        await lifecycle.finalize_if_complete(ctx, job.id)
    return report


async def _apply(
    session: AsyncSession, job: Job, row: JobImage, item: CheckedItem, holder: Holder
) -> str:
    now = utcnow()
    if item.error is not None:
        changed = await session.execute(
            update(JobImage)
            .where(
                JobImage.id == row.id,
                JobImage.state.in_([ImageState.QUEUED, ImageState.RESERVED]),
            )
            .values(
                state=ImageState.FAILED,
                reason=item.error,
                failed_at=now,
                lease_deadline=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        return "accepted" if changed.rowcount == 1 else "duplicate"  # type: ignore[attr-defined]
    # A success sets the outcome where none is known yet; failing that, it upgrades a
    # failed image. Two conditional UPDATEs tell which, exactly, without a read first;
    # the common case (queued or reserved) costs one statement.
    upgraded = False
    for from_states in ([ImageState.QUEUED, ImageState.RESERVED], [ImageState.FAILED]):
        changed = await session.execute(
            update(JobImage)
            .where(JobImage.id == row.id, JobImage.state.in_(from_states))
            .values(state=ImageState.DONE, result_at=now, lease_deadline=None, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if changed.rowcount == 1:  # type: ignore[attr-defined]
            upgraded = from_states == [ImageState.FAILED]
            break
    else:
        return "duplicate"
    assert item.success is not None
    success = item.success
    session.add(
        ImageResultRow(
            job_id=job.id,
            image_id=row.image_id,
            pipeline=success.pipeline,
            algorithms=success.algorithms,
            total_time=success.total_time,
            detections_count=len(success.detections),
            received_at=now,
        )
    )
    session.add_all(
        Detection(
            job_id=job.id,
            image_id=row.image_id,
            idx=n,
            x1=d.bbox.x1 if d.bbox else 0.0,
            y1=d.bbox.y1 if d.bbox else 0.0,
            x2=d.bbox.x2 if d.bbox else 0.0,
            y2=d.bbox.y2 if d.bbox else 0.0,
            algorithm_key=(d.algorithm.key if d.algorithm else None),
            inference_time=d.inference_time,
            timestamp=d.timestamp,
            classifications=[
                {
                    "classification": c.classification,
                    "labels": c.labels,
                    "scores": c.scores,
                    "algorithm": c.algorithm.key if c.algorithm else None,
                    "terminal": c.terminal,
                    "timestamp": c.timestamp,
                }
                for c in d.classifications
            ],
        )
        for n, d in enumerate(success.detections)
    )
    if upgraded:
        events.record(
            session,
            job.id,
            f"late result stored: failed image upgraded to done (was: {row.reason})",
            level=logging.WARNING,
            image_id=row.image_id,
        )
    return "accepted"
