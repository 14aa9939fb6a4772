"""Read-side queries over the ledger shared by the server, the reconciler and the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from trapline.ledger.models import ImageState, JobImage


@dataclass
class Counts:
    """Images of a job by state. At rest ``queued + reserved + done + failed == total``."""

    total: int = 0
    queued: int = 0
    reserved: int = 0
    done: int = 0
    failed: int = 0

    @property
    def remaining(self) -> int:
        return self.queued + self.reserved

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def job_counts(session: AsyncSession, job_id: int) -> Counts:
    rows = await session.execute(
        select(JobImage.state, func.count())
        .where(JobImage.job_id == job_id)
        .group_by(JobImage.state)
    )
    counts = Counts()
    for state, n in rows.all():
        setattr(counts, ImageState(state).value, int(n))
    counts.total = counts.queued + counts.reserved + counts.done + counts.failed
    return counts


async def remaining_images(session: AsyncSession, job_id: int) -> int:
    n = await session.scalar(
        select(func.count())
        .select_from(JobImage)
        .where(
            JobImage.job_id == job_id,
            JobImage.state.in_([ImageState.QUEUED, ImageState.RESERVED]),
        )
    )
    return int(n or 0)
