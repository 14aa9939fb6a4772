"""A job's counts are kept by the database as its images change state: reading them
costs a few rows whatever the job's size, and they always equal what the rows say."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from tests.support.ledger import (
    LEASE_S,
    Ledger,
    counts_by_scan,
    counts_kept,
    failure,
    lease,
    new_job,
    offer,
    record,
    record_in,
    success,
)
from trapline.ledger import transitions
from trapline.ledger.models import JobCount, utcnow
from trapline.ledger.queries import job_counts


async def test_counts_follow_every_transition_of_a_job(ledger: Ledger) -> None:
    job_id = await new_job(ledger, 6)
    seen = [await counts_kept(ledger, job_id)]
    await lease(ledger, job_id, [offer(1), offer(2), offer(3), offer(4)])
    seen.append(await counts_kept(ledger, job_id))
    await record(ledger, job_id, success(1, key=0), failure(2, "not an image", key=1))
    seen.append(await counts_kept(ledger, job_id))
    async with ledger.sessions() as s, s.begin():
        await transitions.release(s, job_id, [(3, 1)], now=utcnow())
        await transitions.extend(s, job_id, [(4, 1)], now=utcnow(), lease_s=LEASE_S)
    seen.append(await counts_kept(ledger, job_id))
    await record(ledger, job_id, success(2))  # a late success upgrades the failure
    async with ledger.sessions() as s, s.begin():
        await transitions.fail_open(s, job_id, "cancelled", level=30, now=utcnow())
    seen.append(await counts_kept(ledger, job_id))
    assert [(c["queued"], c["reserved"], c["done"], c["failed"]) for c in seen] == [
        (6, 0, 0, 0),
        (2, 4, 0, 0),
        (2, 2, 1, 1),
        (3, 1, 1, 1),
        (0, 0, 2, 4),
    ]
    assert seen[-1]["detections"] == 2
    assert seen[-1] == await counts_by_scan(ledger, job_id)


async def test_waiting_since_is_when_an_image_last_changed_state(ledger: Ledger) -> None:
    job_id = await new_job(ledger, 2)
    async with ledger.sessions() as s:
        before = (await job_counts(s, job_id)).changed_at
    when = utcnow() - timedelta(seconds=LEASE_S * 2)
    await lease(ledger, job_id, [offer(1)], now=when)
    async with ledger.sessions() as s, s.begin():
        await transitions.extend(s, job_id, [(1, 1)], now=utcnow(), lease_s=LEASE_S)
    async with ledger.sessions() as s:
        after_lease = (await job_counts(s, job_id)).changed_at
    assert before is None
    # The lease changed a state; the extension changed none.
    assert after_lease is not None
    assert abs((after_lease - when).total_seconds()) < 1


async def test_concurrent_transactions_count_without_losing_an_update(
    ledger: Ledger, other: Ledger
) -> None:
    job_id = await new_job(ledger, 40)
    await lease(ledger, job_id, [offer(n) for n in range(1, 41)])

    async def post(engine: Ledger, first: int) -> None:
        for n in range(first, 41, 2):
            async with engine.sessions() as s, s.begin():
                await record_in(s, job_id, [success(n)])

    await asyncio.gather(post(ledger, 1), post(other, 2))
    kept = await counts_kept(ledger, job_id)
    assert (kept["reserved"], kept["done"], kept["detections"]) == (0, 40, 40)
    assert kept == await counts_by_scan(ledger, job_id)


async def test_folding_the_deltas_keeps_every_sum_and_leaves_uncommitted_ones_alone(
    ledger: Ledger, other: Ledger, database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite keeps one row per count and never folds them")
    job_id = await new_job(ledger, 100)
    for n in range(1, 101):  # one statement each: a delta row each
        await lease(ledger, job_id, [offer(n)])
    async with other.sessions() as open_tx, open_tx.begin():
        await record_in(open_tx, job_id, [success(1)])  # deltas not committed yet
        async with ledger.sessions() as s, s.begin():
            await transitions.compact_counts(s)
        async with ledger.sessions() as s:
            rows = await s.scalar(
                select(func.count()).select_from(JobCount).where(JobCount.job_id == job_id)
            )
    kept = await counts_kept(ledger, job_id)
    assert rows is not None and rows <= 5  # folded: one row per name
    assert (kept["queued"], kept["reserved"], kept["done"]) == (0, 99, 1)
    assert kept == await counts_by_scan(ledger, job_id)
