"""What every transition shares: the tables it writes and who holds a lease."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import ColumnElement, Select, Table, select
from sqlalchemy.ext.asyncio import AsyncSession

from trapline.ledger.models import Job, JobImage

IMAGES = cast(Table, JobImage.__table__)
JOBS = cast(Table, Job.__table__)


@dataclass(frozen=True)
class Holder:
    """Who asked: recorded with every lease so an operator can see who held an image."""

    token_name: str
    worker_name: str | None = None
    worker_id: str | None = None

    def describe(self) -> str:
        name = self.worker_name or self.token_name
        return f"{name} ({self.worker_id})" if self.worker_id else name


def holder_label(name: str | None, token: str | None, worker_id: str | None) -> str:
    """Who held an image's lease, as stored on its row, for log lines and reasons."""
    holder = name or token or "unknown"
    return f"{holder} ({worker_id})" if worker_id else holder


def locking_in_order(session: AsyncSession, query: Select[Any]) -> Select[Any]:
    """``query`` that also locks the image rows it reads, in id order, on PostgreSQL.

    A set-based UPDATE locks rows in whatever order its plan visits them, so two
    batches sharing images (the same results posted to two replicas, a lapse and a
    late result) could each hold a row the other waits for: a deadlock. Every
    transition that changes several image rows first reads them through this, so
    all of them take their locks in one order. SQLite has one writer at a time.
    """
    if session.get_bind().dialect.name != "postgresql":
        return query
    return query.order_by(IMAGES.c.id).with_for_update(of=IMAGES)


async def lock_images(session: AsyncSession, *where: ColumnElement[bool]) -> None:
    """Lock (PostgreSQL) the image rows matching ``where`` in id order; see above."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(locking_in_order(session, select(IMAGES.c.id).where(*where)))
