"""Driving the ledger's transitions directly: a job made in the database, the calls a
server makes, what the rows and the history then say, and two callers racing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import event, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from tests.support.polling import until
from trapline.ledger import transitions
from trapline.ledger.models import (
    Detection,
    ImageState,
    Job,
    JobEvent,
    JobImage,
    JobStatus,
    utcnow,
)
from trapline.ledger.queries import job_counts
from trapline.ledger.transitions import Holder, Offer, Result

GPU = Holder("worker-token", "gpu-box", "w1")
LEASE_S = 30.0
A = TypeVar("A")
B = TypeVar("B")


@dataclass
class Ledger:
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]


async def new_job(ledger: Ledger, images: int, *, failure_threshold: float = 0.5) -> int:
    """A STARTED job in queue generation 1; image ``n`` is message ``n`` of its stream."""
    now = utcnow()
    async with ledger.sessions() as s, s.begin():
        job_id: int | None = await s.scalar(
            insert(Job)
            .values(
                name="t",
                project_id=1,
                pipeline_slug="null",
                status=JobStatus.STARTED,
                failure_threshold=failure_threshold,
                total=images,
                queue_generation=1,
                created_at=now,
            )
            .returning(Job.id)
        )
        assert job_id is not None
        await s.execute(
            insert(JobImage),
            [
                {
                    "job_id": job_id,
                    "image_id": str(n),
                    "url": f"https://images.example.org/{n}.jpg",
                    "state": ImageState.QUEUED,
                    "msg_seq": n,
                    "updated_at": now,
                }
                for n in range(1, images + 1)
            ],
        )
    return job_id


def offer(seq: int, delivered: int = 1, image_id: object = None) -> Offer:
    image = str(seq) if image_id is None else image_id
    return Offer(seq, image, delivered, f"$JS.ACK.s.c.{delivered}.{seq}.{seq}.0.0")


def success(seq: int | None, image_id: str | None = None, *, key: int = 0) -> Result:
    detection = {"x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0, "classifications": []}
    return Result(
        key,
        image_id or str(seq),
        seq,
        f"receipt-{seq}",
        envelope={"pipeline": "null", "algorithms": {}, "total_time": 0.1},
        detections=[detection],
    )


def failure(seq: int, reason: str, *, key: int = 0) -> Result:
    return Result(key, str(seq), seq, f"receipt-{seq}", error=reason)


async def lease_in(
    session: AsyncSession,
    job_id: int,
    offers: Sequence[Offer],
    *,
    max_deliver: int = 3,
    now: datetime | None = None,
) -> transitions.Leasing:
    return await transitions.lease(
        session,
        job_id,
        offers,
        GPU,
        now=now or utcnow(),
        lease_s=LEASE_S,
        max_deliver=max_deliver,
    )


async def lease(
    ledger: Ledger,
    job_id: int,
    offers: Sequence[Offer],
    *,
    max_deliver: int = 3,
    now: datetime | None = None,
) -> transitions.Leasing:
    async with ledger.sessions() as s, s.begin():
        return await lease_in(s, job_id, offers, max_deliver=max_deliver, now=now)


async def record_in(
    session: AsyncSession, job_id: int, results: Sequence[Result]
) -> transitions.Recorded:
    return await transitions.record_results(session, job_id, results, GPU, refused={}, now=utcnow())


async def record(ledger: Ledger, job_id: int, *results: Result) -> transitions.Recorded:
    async with ledger.sessions() as s, s.begin():
        return await record_in(s, job_id, results)


async def conclude(ledger: Ledger, job_id: int, *results: Result) -> transitions.Finalized | None:
    """Record results and conclude in one transaction, as a result post does."""
    async with ledger.sessions() as s, s.begin():
        await record_in(s, job_id, results)
        return await transitions.conclude(s, job_id, now=utcnow())


async def image(ledger: Ledger, job_id: int, image_id: str) -> Any:
    async with ledger.sessions() as s:
        row = (
            await s.execute(
                select(JobImage).where(JobImage.job_id == job_id, JobImage.image_id == image_id)
            )
        ).scalar_one()
    return row


async def job_status(ledger: Ledger, job_id: int) -> str:
    async with ledger.sessions() as s:
        status = await s.scalar(select(Job.status).where(Job.id == job_id))
    assert status is not None
    return status


async def history(ledger: Ledger, job_id: int, image_id: str | None) -> list[str]:
    """An image's history, or (``None``) the job-level lines, oldest first."""
    held = JobEvent.image_id.is_(None) if image_id is None else JobEvent.image_id == image_id
    async with ledger.sessions() as s:
        lines = await s.scalars(
            select(JobEvent.message).where(JobEvent.job_id == job_id, held).order_by(JobEvent.id)
        )
        return list(lines.all())


async def count(ledger: Ledger, table: type[Any], job_id: int, image_id: str) -> int:
    async with ledger.sessions() as s:
        n = await s.scalar(
            select(func.count())
            .select_from(table)
            .where(table.job_id == job_id, table.image_id == image_id)
        )
    return int(n or 0)


async def _waiting(ledger: Ledger, other: Ledger, issued: list[str]) -> bool:
    """Whether ``other``'s transaction is under way and blocked: on PostgreSQL, a backend
    waiting for a lock; on SQLite (one writer at a time), one that has issued its first
    statement (BEGIN IMMEDIATE), which then waits for the write lock."""
    if other.engine.dialect.name == "sqlite":
        return bool(issued)
    async with ledger.engine.connect() as conn:
        n = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        )
    return bool(n)


async def race(
    ledger: Ledger,
    other: Ledger,
    first: Callable[[AsyncSession], Awaitable[A]],
    second: Callable[[AsyncSession], Awaitable[B]],
) -> tuple[A, B]:
    """``first`` runs in a transaction held open until ``second``, in a transaction on
    another connection, is blocked by it (or done, if nothing blocked it); then
    ``first`` commits and ``second`` goes on."""

    issued: list[str] = []

    @event.listens_for(other.engine.sync_engine, "before_cursor_execute")
    def _issued(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        issued.append(statement)

    async def in_other() -> B:
        async with other.sessions() as s, s.begin():
            return await second(s)

    async with ledger.sessions() as s, s.begin():
        a = await first(s)
        task = asyncio.create_task(in_other())

        async def blocked_or_done() -> bool:
            return task.done() or await _waiting(ledger, other, issued)

        await until(blocked_or_done, "the second caller to wait for the first", 20)
    return a, await task


async def counts_by_scan(ledger: Ledger, job_id: int) -> dict[str, int]:
    """A job's counts the slow way, from its image and detection rows."""
    async with ledger.sessions() as s:
        rows = await s.execute(
            select(JobImage.state, func.count())
            .where(JobImage.job_id == job_id)
            .group_by(JobImage.state)
        )
        counts = dict.fromkeys(ImageState, 0) | {state: int(n) for state, n in rows.all()}
        detections = await s.scalar(
            select(func.count()).select_from(Detection).where(Detection.job_id == job_id)
        )
    return {**counts, "detections": int(detections or 0)}


async def counts_kept(ledger: Ledger, job_id: int) -> dict[str, int]:
    """A job's counts as the server reads them (kept by the database's triggers)."""
    async with ledger.sessions() as s:
        counts = await job_counts(s, job_id)
    return {**{s: getattr(counts, s) for s in ImageState}, "detections": counts.detections}


async def every_job(ledger: Ledger) -> list[int]:
    async with ledger.sessions() as s:
        return list((await s.scalars(select(Job.id).order_by(Job.id))).all())
