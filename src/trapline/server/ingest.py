"""Result ingestion: validate → one transaction → commit → ACK → a status per item.

A 2xx means every item answered ``accepted`` or ``duplicate`` is committed. The
ledger decides each outcome (:func:`trapline.ledger.transitions.record_results`),
and in the same transaction whether the job is now finished; the queue hears of
it only after the commit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trapline.errors import QueueError, ReceiptError
from trapline.ledger import transitions
from trapline.ledger.models import Job, utcnow
from trapline.ledger.transitions import Holder
from trapline.server import lifecycle
from trapline.server.context import AppContext
from trapline.server.dispatch import is_current, receipt_of_job
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
    refused: dict[int, str] = {}
    results: list[transitions.Result] = []
    to_ack: list[str] = []
    # Receipts of the current generation name their row by stream sequence; those of
    # earlier generations (queue rebuilt since) reach it by the image id the result names.
    for item in checked:
        if item.rejected:
            refused[item.index] = item.rejected
            continue
        try:
            receipt = receipt_of_job(ctx.queue.names, job, item.reply_subject)
        except ReceiptError as exc:
            refused[item.index] = str(exc)
            continue
        seq = None
        if is_current(ctx.queue.names, job, receipt):
            seq = receipt.stream_seq
            to_ack.append(receipt.subject)
        results.append(_result(item, seq))
    now = utcnow()
    async with ctx.sessions() as session, session.begin():
        recorded = await transitions.record_results(
            session, job.id, results, holder, refused=refused, now=now
        )
        finalized = None
        if recorded.changed:
            finalized = await transitions.conclude(session, job.id, now=now)
    # Committed. Now, and only now, acknowledge: an ACK lost here is repaired when
    # the message comes back and the reserve path finds the image settled.
    report = _report(job, checked, recorded)
    for s in report.items:
        ctx.metrics.results.labels(s.status).inc()
    if recorded.failed:
        ctx.metrics.images_failed.labels("worker error").inc(len(recorded.failed))
    settled = {s.reply_subject for s in report.items if s.status in ("accepted", "duplicate")}
    acks = [s for s in to_ack if s in settled]
    try:
        await ctx.queue.ack(acks)
    except QueueError as exc:
        log.warning("job %s: ACK of %d committed results not sent: %s", job.id, len(acks), exc)
    if finalized is not None:
        await lifecycle.finished(ctx, job.id, finalized)
    return report


def _report(
    job: Job, checked: Sequence[CheckedItem], recorded: transitions.Recorded
) -> IngestReport:
    """A status per item, in the order posted; every rejection logged with its reason."""
    report = IngestReport()
    for item in checked:
        i = item.index
        if i in recorded.rejected:
            reason = recorded.rejected[i]
            report.items.append(ItemStatus(item.reply_subject, "rejected", reason=reason))
            log.warning(
                "job %s: rejected result item for image %s (%s): %s",
                job.id,
                item.image_id or "unknown",
                item.reply_subject or "no reply_subject",
                reason,
            )
        elif i in recorded.accepted:
            task_id = f"{job.id}:{recorded.accepted[i]}"
            report.items.append(ItemStatus(item.reply_subject, "accepted", task_id))
        else:
            task_id = f"{job.id}:{recorded.duplicates[i]}"
            report.items.append(ItemStatus(item.reply_subject, "duplicate", task_id))
    return report


def _result(item: CheckedItem, seq: int | None) -> transitions.Result:
    assert item.image_id is not None
    if item.error is not None or item.success is None:
        return transitions.Result(item.index, item.image_id, seq, item.reply_subject, item.error)
    success = item.success
    return transitions.Result(
        item.index,
        item.image_id,
        seq,
        item.reply_subject,
        envelope={
            "pipeline": success.pipeline,
            "algorithms": success.algorithms,
            "total_time": success.total_time,
        },
        detections=[
            {
                "x1": d.bbox.x1 if d.bbox else 0.0,
                "y1": d.bbox.y1 if d.bbox else 0.0,
                "x2": d.bbox.x2 if d.bbox else 0.0,
                "y2": d.bbox.y2 if d.bbox else 0.0,
                "algorithm_key": d.algorithm.key if d.algorithm else None,
                "inference_time": d.inference_time,
                "timestamp": d.timestamp,
                "classifications": [
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
            }
            for d in success.detections
        ],
    )
