"""Handing tasks to workers: reserve, extend and release, all checked against the ledger."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from trapline.errors import QueueError, ReceiptError
from trapline.ledger import events
from trapline.ledger.models import ImageState, Job, JobImage, JobStatus, utcnow
from trapline.queue import Delivery, Receipt, naming, parse_receipt
from trapline.server.context import AppContext
from trapline.server.expiry import Lapses

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Holder:
    """Who asked: recorded with every lease so an operator can see who held an image."""

    token_name: str
    worker_name: str | None = None
    worker_id: str | None = None

    def describe(self) -> str:
        name = self.worker_name or self.token_name
        return f"{name} ({self.worker_id})" if self.worker_id else name


@dataclass(frozen=True)
class Task:
    id: str
    image_id: str
    image_url: str
    reply_subject: str


def receipt_of_job(names: naming.QueueNames, job: Job, subject: object) -> Receipt:
    """Parse a receipt and check it belongs to this job's consumer (any generation)."""
    receipt = parse_receipt(subject)
    parsed = names.parse_stream(receipt.stream)
    if parsed is None or parsed[0] != job.id or receipt.consumer != naming.CONSUMER:
        raise ReceiptError(f"reply_subject does not belong to job {job.id}")
    if parsed[1] > job.queue_generation:
        raise ReceiptError(f"reply_subject does not belong to job {job.id}")
    return receipt


def is_current(names: naming.QueueNames, job: Job, receipt: Receipt) -> bool:
    return receipt.stream == names.stream(job.id, job.queue_generation)


async def reserve(
    ctx: AppContext, job: Job, batch_size: int, holder: Holder, base_url: str
) -> list[Task]:
    """Lease up to ``batch_size`` tasks to the caller; [] when the job is not running."""
    if job.status != JobStatus.STARTED:
        return []
    batch = min(batch_size, ctx.settings.reserve_cap)
    deliveries = await ctx.queue.reserve(
        job.id, job.queue_generation, batch, ctx.settings.reserve_wait_s
    )
    if not deliveries:
        return []
    try:
        tasks, settled, to_term = await _lease(ctx, job, deliveries, holder, base_url)
    except Exception:
        # Not recorded as leased: hand the messages straight back, then report.
        await ctx.queue.release([d.reply_subject for d in deliveries])
        raise
    if tasks:
        ctx.metrics.reserves.inc()
        ctx.metrics.tasks_reserved.inc(len(tasks))
    if settled:
        await ctx.queue.ack(settled)
    for reason, subjects in to_term.items():
        if subjects:
            await ctx.queue.term(subjects, reason)
    return tasks


async def _lease(
    ctx: AppContext, job: Job, deliveries: Sequence[Delivery], holder: Holder, base_url: str
) -> tuple[list[Task], list[str], dict[str, list[str]]]:
    """Record the leases of ``deliveries``; (tasks to hand out, receipts to ACK, to TERM)."""
    now = utcnow()
    deadline = now + timedelta(seconds=ctx.settings.ack_wait_s)
    tasks: list[Task] = []
    settled: list[str] = []  # images that already have an outcome: ACK, don't hand out
    strays: list[str] = []
    async with ctx.sessions() as session, session.begin():
        rows = {
            r.msg_seq: r
            for r in (
                await session.scalars(
                    select(JobImage).where(
                        JobImage.job_id == job.id,
                        JobImage.msg_seq.in_([d.stream_seq for d in deliveries]),
                    )
                )
            ).all()
        }
        leased: list[str] = []
        redelivered: list[str] = []
        lapses = Lapses(session, ctx.settings.max_deliver, ctx.metrics)
        exhausted: list[str] = []
        delivery_numbers: list[int] = []
        for d in deliveries:
            row = rows.get(d.stream_seq)
            if row is None or row.image_id != d.payload.get("image_id"):
                log.warning(
                    "job %s: message seq %s (%s) has no ledger row; terminating it",
                    job.id,
                    d.stream_seq,
                    d.payload,
                )
                strays.append(d.reply_subject)
                continue
            if row.state in (ImageState.DONE, ImageState.FAILED):
                settled.append(d.reply_subject)
                continue
            if row.state == ImageState.RESERVED and d.delivered > row.deliveries:
                # JetStream redelivered before the reconciler saw the lease lapse:
                # apply the same rule here, so the budget holds whoever is faster.
                await lapses.apply(row, now)
                # Whoever applied the lapse (this server or another), read its result.
                await session.refresh(row)
                if row.state == ImageState.FAILED:
                    exhausted.append(d.reply_subject)
                    continue
                if row.state == ImageState.DONE:  # its result landed meanwhile
                    settled.append(d.reply_subject)
                    continue
            row.state = ImageState.RESERVED
            row.leases += 1
            row.deliveries = d.delivered
            row.receipt = d.reply_subject
            row.holder_name = holder.worker_name
            row.holder_id = holder.worker_id
            row.holder_token = holder.token_name
            row.leased_at = now
            row.lease_deadline = deadline
            row.updated_at = now
            leased.append(row.image_id)
            if d.delivered > 1:
                redelivered.append(row.image_id)
            delivery_numbers.append(d.delivered)
            url = row.url or ctx.signer.url(base_url, job.id, row.image_id)
            tasks.append(Task(f"{job.id}:{row.image_id}", row.image_id, url, d.reply_subject))
        lapses.record()
        if leased:
            events.record_history(
                session,
                job.id,
                [
                    (t.image_id, f"reserved by {holder.describe()} (JetStream delivery {n})")
                    for t, n in zip(tasks, delivery_numbers, strict=True)
                ],
            )
            events.record(
                session,
                job.id,
                f"reserved {len(leased)} task(s) to {holder.describe()}"
                + (f"; redeliveries {events.format_ids(redelivered)}" if redelivered else ""),
            )
    return (
        tasks,
        settled,
        {"no ledger row for this message": strays, "max deliveries exhausted": exhausted},
    )


async def _held_receipts(
    ctx: AppContext, job: Job, reply_subjects: Sequence[object]
) -> tuple[dict[str, JobImage], list[str]]:
    """Receipts that are the *current* delivery of a reserved image, and the rest."""
    parsed: dict[str, Receipt] = {}
    unknown: list[str] = []
    for s in reply_subjects:
        try:
            r = receipt_of_job(ctx.queue.names, job, s)
        except ReceiptError:
            unknown.append(str(s)[:512])
            continue
        if is_current(ctx.queue.names, job, r):
            parsed[r.subject] = r
        else:
            unknown.append(r.subject)
    held: dict[str, JobImage] = {}
    if parsed:
        async with ctx.sessions() as session:
            rows = (
                await session.scalars(
                    select(JobImage).where(
                        JobImage.job_id == job.id,
                        JobImage.msg_seq.in_([r.stream_seq for r in parsed.values()]),
                    )
                )
            ).all()
        by_seq = {row.msg_seq: row for row in rows}
        for subject, r in parsed.items():
            row = by_seq.get(r.stream_seq)
            # A stale receipt would act on the current delivery: refuse it.
            if row and row.state == ImageState.RESERVED and row.deliveries == r.delivered:
                held[subject] = row
            else:
                unknown.append(subject)
    return held, unknown


async def _update_held(session: AsyncSession, rows: Iterable[JobImage], **values: object) -> None:
    """Update leases only while they are still the delivery the caller proved it holds."""
    by_delivery: dict[int, list[int]] = {}
    for row in rows:
        by_delivery.setdefault(row.deliveries, []).append(row.id)
    # One statement per delivery number (nearly always one), not one per task.
    for delivered, ids in by_delivery.items():
        await session.execute(
            update(JobImage)
            .where(
                JobImage.id.in_(ids),
                JobImage.state == ImageState.RESERVED,
                JobImage.deliveries == delivered,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )


async def extend(
    ctx: AppContext, job: Job, reply_subjects: Sequence[object]
) -> tuple[list[str], list[str]]:
    """Reset the lease of each task the caller still holds (JetStream in-progress ack)."""
    held, unknown = await _held_receipts(ctx, job, reply_subjects)
    if not held:
        return [], unknown
    await ctx.queue.extend(list(held))
    now = utcnow()
    deadline = now + timedelta(seconds=ctx.settings.ack_wait_s)
    async with ctx.sessions() as session, session.begin():
        await _update_held(session, held.values(), lease_deadline=deadline, updated_at=now)
    return list(held), unknown


async def release(
    ctx: AppContext, job: Job, reply_subjects: Sequence[object], delay_s: float
) -> tuple[list[str], list[str]]:
    """Give held tasks back for redelivery (JetStream NAK)."""
    held, unknown = await _held_receipts(ctx, job, reply_subjects)
    if not held:
        return [], unknown
    now = utcnow()
    async with ctx.sessions() as session, session.begin():
        await _update_held(
            session, held.values(), state=ImageState.QUEUED, lease_deadline=None, updated_at=now
        )
        events.record(
            session,
            job.id,
            f"released {len(held)} task(s) by {held[next(iter(held))].holder_name or 'worker'}",
            image_ids=[r.image_id for r in held.values()],
        )
    try:
        await ctx.queue.release(list(held), delay_s)
    except QueueError:
        # The ledger says queued; JetStream redelivers after ack_wait anyway.
        log.warning("job %s: release not sent; tasks come back after their lease", job.id)
    return list(held), unknown
