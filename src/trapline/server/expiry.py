"""One rule for a lease that lapsed without a result, used by the reconciler and by
the reserve path (which can see a redelivery before the reconciler's next sweep).

The retry budget counts leases actually handed to a worker (``JobImage.leases``),
not JetStream deliveries: a delivery that never reached a worker must not use it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import datetime

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from trapline.ledger import events
from trapline.ledger.models import ImageState, JobImage
from trapline.server.metrics import Metrics


def holder_label(row: JobImage) -> str:
    """Who held an image's lease, for log lines and reasons."""
    holder = row.holder_name or row.holder_token or "unknown"
    return f"{holder} ({row.holder_id})" if row.holder_id else holder


class Lapses:
    """Lapsed leases of one transaction, applied with conditional updates and logged once."""

    def __init__(self, session: AsyncSession, max_deliver: int, metrics: Metrics) -> None:
        self.session = session
        self.max_deliver = max_deliver
        self.metrics = metrics
        self.requeued: dict[tuple[int, str], list[JobImage]] = defaultdict(list)
        self.exhausted: dict[tuple[int, str], list[JobImage]] = defaultdict(list)

    async def apply(self, row: JobImage, now: datetime) -> str | None:
        """Apply the lapse of ``row``'s current lease: "queued", "failed", or None if
        another server already did (the row changed since it was read)."""
        holder = holder_label(row)
        last = row.leases >= self.max_deliver
        values: dict[str, object] = {"lease_deadline": None, "updated_at": now}
        if last:
            values.update(
                state=ImageState.FAILED,
                reason=f"max deliveries exhausted ({row.leases} of {self.max_deliver}; "
                f"last holder {holder})",
                failed_at=now,
            )
        else:
            values.update(state=ImageState.QUEUED, expiries=row.expiries + 1)
        won = await self.session.execute(
            update(JobImage)
            .where(
                JobImage.id == row.id,
                JobImage.state == ImageState.RESERVED,
                JobImage.deliveries == row.deliveries,
                JobImage.lease_deadline == row.lease_deadline,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if won.rowcount != 1:  # type: ignore[attr-defined]
            return None
        self.metrics.lease_expiries.inc()
        if last:
            self.metrics.images_failed.labels("max deliveries exhausted").inc()
        (self.exhausted if last else self.requeued)[(row.job_id, holder)].append(row)
        return ImageState.FAILED if last else ImageState.QUEUED

    def record(self) -> None:
        """The WARNING/ERROR lines naming every image, per job and holder."""
        for (job_id, holder), batch in self.requeued.items():
            events.record_images(
                self.session,
                job_id,
                [r.image_id for r in batch],
                f"lease expired without a result (holder {holder}, delivery "
                f"{batch[0].leases} of {self.max_deliver}); will be redelivered:",
                level=logging.WARNING,
            )
        for (job_id, holder), batch in self.exhausted.items():
            events.record_images(
                self.session,
                job_id,
                [r.image_id for r in batch],
                f"failed: max deliveries exhausted (last holder {holder}):",
                level=logging.ERROR,
            )
