"""Two callers racing on the same rows, each on its own connection (on SQLite, its own
engine, so the race is for the database's write lock): exactly one of them wins."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from tests.support.ledger import (
    LEASE_S,
    Ledger,
    count,
    history,
    image,
    job_status,
    lease,
    lease_in,
    new_job,
    offer,
    race,
    record,
    record_in,
    success,
)
from trapline.ledger import transitions
from trapline.ledger.models import ImageResultRow, JobStatus, utcnow


async def test_of_two_results_for_one_image_racing_exactly_one_is_accepted(
    ledger: Ledger, other: Ledger
) -> None:
    job_id = await new_job(ledger, 1)
    await lease(ledger, job_id, [offer(1)])
    first, second = await race(
        ledger,
        other,
        lambda s: record_in(s, job_id, [success(1)]),
        lambda s: record_in(s, job_id, [success(1)]),
    )
    assert first.accepted == {0: "1"}
    assert second.accepted == {} and second.duplicates == {0: "1"}
    assert await count(ledger, ImageResultRow, job_id, "1") == 1
    assert (await history(ledger, job_id, "1")).count("result accepted from gpu-box (w1)") == 1


async def test_a_lapse_racing_a_result_changes_nothing_once_the_result_is_in(
    ledger: Ledger, other: Ledger
) -> None:
    job_id = await new_job(ledger, 1)
    await lease(ledger, job_id, [offer(1)], now=utcnow() - timedelta(seconds=LEASE_S * 2))
    result, expired = await race(
        ledger,
        other,
        lambda s: record_in(s, job_id, [success(1)]),
        lambda s: transitions.expire_leases(s, now=utcnow(), max_deliver=3, limit=100),
    )
    row = await image(ledger, job_id, "1")
    assert result.accepted == {0: "1"}
    assert expired.lapsed.count == 0
    assert (row.state, row.expiries) == ("done", 0)
    assert not any("lease expired" in m for m in await history(ledger, job_id, "1"))


async def test_a_lapse_racing_an_extension_leaves_the_extended_lease_alone(
    ledger: Ledger, other: Ledger
) -> None:
    job_id = await new_job(ledger, 1)
    await lease(ledger, job_id, [offer(1)], now=utcnow() - timedelta(seconds=LEASE_S * 2))
    extended, expired = await race(
        ledger,
        other,
        lambda s: transitions.extend(s, job_id, [(1, 1)], now=utcnow(), lease_s=LEASE_S),
        lambda s: transitions.expire_leases(s, now=utcnow(), max_deliver=3, limit=100),
    )
    row = await image(ledger, job_id, "1")
    assert extended == {(1, 1)}
    assert expired.lapsed.count == 0
    assert (row.state, row.expiries) == ("reserved", 0)


async def test_a_redelivery_racing_a_result_is_settled_not_leased_again(
    ledger: Ledger, other: Ledger
) -> None:
    job_id = await new_job(ledger, 1)
    await lease(ledger, job_id, [offer(1)])
    again = offer(1, delivered=2)
    result, leasing = await race(
        ledger,
        other,
        lambda s: record_in(s, job_id, [success(1)]),
        lambda s: lease_in(s, job_id, [again]),
    )
    row = await image(ledger, job_id, "1")
    assert result.accepted == {0: "1"}
    assert leasing.leased == [] and leasing.settled == [again.receipt]
    assert leasing.lapsed.count == 0
    assert (row.state, row.leases, row.expiries) == ("done", 1, 0)


async def test_a_result_racing_the_lapse_that_failed_its_image_upgrades_it(
    ledger: Ledger, other: Ledger
) -> None:
    job_id = await new_job(ledger, 1)
    await lease(ledger, job_id, [offer(1)], now=utcnow() - timedelta(seconds=LEASE_S * 2))
    expired, result = await race(
        ledger,
        other,
        lambda s: transitions.expire_leases(s, now=utcnow(), max_deliver=1, limit=100),
        lambda s: record_in(s, job_id, [success(1)]),
    )
    exhausted = "max deliveries exhausted (1 of 1; last holder gpu-box (w1))"
    assert [h.image_id for h in expired.lapsed.exhausted] == ["1"]
    assert result.accepted == {0: "1"} and result.upgraded == [("1", exhausted)]
    assert (await image(ledger, job_id, "1")).state == "done"


async def test_of_two_finalizers_exactly_one_wins(ledger: Ledger, other: Ledger) -> None:
    job_id = await new_job(ledger, 1)
    await record(ledger, job_id, success(1))
    first, second = await race(
        ledger,
        other,
        lambda s: transitions.finalize(s, job_id, now=utcnow()),
        lambda s: transitions.finalize(s, job_id, now=utcnow()),
    )
    assert first is not None and first.status == JobStatus.SUCCESS
    assert second is None
    finished = [m for m in await history(ledger, job_id, None) if m.startswith("finished")]
    assert finished == ["finished SUCCESS: 1 done, 0 failed of 1"]


async def test_of_two_posts_committing_a_jobs_last_outcomes_at_once_one_finishes_it(
    ledger: Ledger, other: Ledger
) -> None:
    job_id = await new_job(ledger, 2)

    async def post(s: AsyncSession, seq: int) -> transitions.Finalized | None:
        await record_in(s, job_id, [success(seq)])
        return await transitions.conclude(s, job_id, now=utcnow())

    first, second = await race(ledger, other, lambda s: post(s, 1), lambda s: post(s, 2))
    assert first is None
    assert second is not None and second.status == JobStatus.SUCCESS
    assert await job_status(ledger, job_id) == "SUCCESS"
