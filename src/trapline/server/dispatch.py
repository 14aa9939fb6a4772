"""Handing tasks to workers: reserve, extend and release, all checked against the ledger."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from trapline.errors import QueueError, ReceiptError
from trapline.ledger import transitions
from trapline.ledger.models import Job, JobStatus, utcnow
from trapline.ledger.transitions import Holder
from trapline.queue import Receipt, naming, parse_receipt
from trapline.server.context import AppContext

log = logging.getLogger(__name__)


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
    offers = [
        transitions.Offer(d.stream_seq, d.payload.get("image_id"), d.delivered, d.reply_subject)
        for d in deliveries
    ]
    try:
        async with ctx.sessions() as session, session.begin():
            leasing = await transitions.lease(
                session,
                job.id,
                offers,
                holder,
                now=utcnow(),
                lease_s=ctx.settings.ack_wait_s,
                max_deliver=ctx.settings.max_deliver,
            )
    except Exception:
        # Not recorded as leased: hand the messages straight back, then report.
        await ctx.queue.release([d.reply_subject for d in deliveries])
        raise
    count_lapses(ctx, leasing.lapsed)
    if leasing.leased:
        ctx.metrics.reserves.inc()
        ctx.metrics.tasks_reserved.inc(len(leasing.leased))
    payloads = {d.reply_subject: d.payload for d in deliveries}
    for stray in leasing.strays:
        log.warning(
            "job %s: message seq %s (%s) has no ledger row; terminating it",
            job.id,
            stray.seq,
            payloads[stray.receipt],
        )
    if leasing.settled:
        await ctx.queue.ack(leasing.settled)
    to_term = {
        "no ledger row for this message": [o.receipt for o in leasing.strays],
        "max deliveries exhausted": leasing.exhausted,
    }
    for reason, subjects in to_term.items():
        if subjects:
            await ctx.queue.term(subjects, reason)
    return [
        Task(
            f"{job.id}:{t.image_id}",
            t.image_id,
            t.url or ctx.signer.url(base_url, job.id, t.image_id),
            t.receipt,
        )
        for t in leasing.leased
    ]


def count_lapses(ctx: AppContext, lapsed: transitions.Lapsed) -> None:
    """Metrics of leases a transition ended (the reserve path's or the reconciler's)."""
    if lapsed.count:
        ctx.metrics.lease_expiries.inc(lapsed.count)
    if lapsed.exhausted:
        ctx.metrics.images_failed.labels("max deliveries exhausted").inc(len(lapsed.exhausted))


def _held_receipts(
    ctx: AppContext, job: Job, reply_subjects: Sequence[object]
) -> tuple[dict[tuple[int, int], str], list[str]]:
    """Receipts of the job's current queue generation by (stream seq, delivery number),
    and the rest; the ledger then acts only on those naming the current delivery."""
    held: dict[tuple[int, int], str] = {}
    unknown: list[str] = []
    for s in reply_subjects:
        try:
            r = receipt_of_job(ctx.queue.names, job, s)
        except ReceiptError:
            unknown.append(str(s)[:512])
            continue
        if is_current(ctx.queue.names, job, r):
            held[(r.stream_seq, r.delivered)] = r.subject
        else:
            unknown.append(r.subject)
    return held, unknown


async def extend(
    ctx: AppContext, job: Job, reply_subjects: Sequence[object]
) -> tuple[list[str], list[str]]:
    """Reset the lease of each task the caller still holds (JetStream in-progress ack)."""
    receipts, unknown = _held_receipts(ctx, job, reply_subjects)
    if not receipts:
        return [], unknown
    async with ctx.sessions() as session, session.begin():
        extended = await transitions.extend(
            session, job.id, list(receipts), now=utcnow(), lease_s=ctx.settings.ack_wait_s
        )
    held = [s for key, s in receipts.items() if key in extended]
    unknown += [s for key, s in receipts.items() if key not in extended]
    if held:
        await ctx.queue.extend(held)
    return held, unknown


async def release(
    ctx: AppContext, job: Job, reply_subjects: Sequence[object], delay_s: float
) -> tuple[list[str], list[str]]:
    """Give held tasks back for redelivery (JetStream NAK)."""
    receipts, unknown = _held_receipts(ctx, job, reply_subjects)
    if not receipts:
        return [], unknown
    async with ctx.sessions() as session, session.begin():
        released = await transitions.release(session, job.id, list(receipts), now=utcnow())
    held = [s for key, s in receipts.items() if key in released]
    unknown += [s for key, s in receipts.items() if key not in released]
    if not held:
        return [], unknown
    try:
        await ctx.queue.release(held, delay_s)
    except QueueError:
        # The ledger says queued; JetStream redelivers after ack_wait anyway.
        log.warning("job %s: release not sent; tasks come back after their lease", job.id)
    return held, unknown
