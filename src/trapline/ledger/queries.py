"""Read-side queries over the ledger shared by the server, the reconciler and the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from trapline.errors import NotFound
from trapline.ledger.models import Detection, ImageState, JobCount, JobImage


@dataclass
class Counts:
    """Images of a job by state. At rest ``queued + reserved + done + failed == total``."""

    total: int = 0
    queued: int = 0
    reserved: int = 0
    done: int = 0
    failed: int = 0
    detections: int = field(default=0, compare=False)
    # When an image last changed state (None before the first change).
    changed_at: datetime | None = field(default=None, compare=False)

    @property
    def remaining(self) -> int:
        return self.queued + self.reserved

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k in _STATE_KEYS}


_STATES = frozenset(s.value for s in ImageState)
_STATE_KEYS = ("total", *_STATES)


async def job_counts(session: AsyncSession, job_id: int) -> Counts:
    """The job's counts as the triggers keep them (``job_counts``): a few rows per job,
    however many images it has."""
    rows = await session.execute(
        select(JobCount.name, func.sum(JobCount.n), func.max(JobCount.changed_at))
        .where(JobCount.job_id == job_id)
        .group_by(JobCount.name)
    )
    counts = Counts()
    for name, n, changed_at in rows.all():
        setattr(counts, name, int(n or 0))
        if name in _STATES and changed_at is not None:
            counts.changed_at = max(filter(None, [counts.changed_at, changed_at]))
    counts.total = counts.queued + counts.reserved + counts.done + counts.failed
    return counts


async def image_row(session: AsyncSession, job_id: int, image_id: str) -> JobImage:
    """The ledger row of one image of a job; NotFound names both."""
    row = await session.scalar(
        select(JobImage).where(JobImage.job_id == job_id, JobImage.image_id == image_id)
    )
    if row is None:
        raise NotFound(f"image {image_id!r} is not in job {job_id}")
    return row


async def image_detections(session: AsyncSession, job_id: int, image_id: str) -> list[Detection]:
    """One image's detections in the order the pipeline gave them."""
    rows = await session.scalars(
        select(Detection)
        .where(Detection.job_id == job_id, Detection.image_id == image_id)
        .order_by(Detection.idx)
    )
    return list(rows.all())
