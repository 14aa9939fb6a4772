"""The ledger's transitions driven directly, on SQLite and PostgreSQL: what each one
changes, what it records in the history, and what it reports to the caller."""

from __future__ import annotations

from datetime import timedelta

from tests.support.ledger import (
    LEASE_S,
    Ledger,
    conclude,
    count,
    failure,
    history,
    image,
    job_status,
    lease,
    new_job,
    offer,
    record,
    success,
)
from trapline.ledger import transitions
from trapline.ledger.models import Detection, ImageResultRow, JobStatus, utcnow


async def test_a_batch_is_leased_with_its_holder_and_a_history_line_per_image(
    ledger: Ledger,
) -> None:
    job_id = await new_job(ledger, 3)
    leasing = await lease(ledger, job_id, [offer(1), offer(2), offer(3, delivered=2)])
    row = await image(ledger, job_id, "3")
    assert [(t.image_id, t.delivered) for t in leasing.leased] == [("1", 1), ("2", 1), ("3", 2)]
    assert leasing.leased[0].url == "https://images.example.org/1.jpg"
    assert (row.state, row.leases, row.deliveries, row.receipt) == (
        "reserved",
        1,
        2,
        offer(3, delivered=2).receipt,
    )
    assert (row.holder_name, row.holder_id, row.holder_token) == ("gpu-box", "w1", "worker-token")
    assert row.lease_deadline is not None
    assert await history(ledger, job_id, "3") == ["reserved by gpu-box (w1) (JetStream delivery 2)"]
    assert await history(ledger, job_id, None) == [
        "reserved 3 task(s) to gpu-box (w1); redeliveries [3]"
    ]


async def test_a_message_whose_image_has_an_outcome_is_settled_and_one_without_a_row_is_a_stray(
    ledger: Ledger,
) -> None:
    job_id = await new_job(ledger, 2)
    await lease(ledger, job_id, [offer(1)])
    await record(ledger, job_id, success(1))
    again = offer(1, delivered=2)
    unknown = offer(9)
    wrong_image = offer(2, image_id="not-2")
    leasing = await lease(ledger, job_id, [again, unknown, wrong_image])
    assert leasing.leased == []
    assert leasing.settled == [again.receipt]
    assert leasing.strays == [unknown, wrong_image]
    assert (await image(ledger, job_id, "1")).state == "done"
    assert (await image(ledger, job_id, "2")).state == "queued"


async def test_a_redelivery_lapses_the_lease_it_replaces_and_the_last_one_fails_the_image(
    ledger: Ledger,
) -> None:
    job_id = await new_job(ledger, 1)
    await lease(ledger, job_id, [offer(1)], max_deliver=2)
    second = await lease(ledger, job_id, [offer(1, delivered=2)], max_deliver=2)
    after_second = await image(ledger, job_id, "1")
    third = await lease(ledger, job_id, [offer(1, delivered=3)], max_deliver=2)
    row = await image(ledger, job_id, "1")
    assert [h.image_id for h in second.lapsed.requeued] == ["1"]
    assert [t.image_id for t in second.leased] == ["1"]
    assert (after_second.leases, after_second.expiries, after_second.deliveries) == (2, 1, 2)
    assert third.leased == [] and third.exhausted == [offer(1, delivered=3).receipt]
    assert [h.image_id for h in third.lapsed.exhausted] == ["1"]
    assert row.state == "failed"
    assert row.reason == "max deliveries exhausted (2 of 2; last holder gpu-box (w1))"
    assert await history(ledger, job_id, "1") == [
        "reserved by gpu-box (w1) (JetStream delivery 1)",
        "lease expired without a result (holder gpu-box (w1), delivery 1 of 2);"
        " will be redelivered:",
        "reserved by gpu-box (w1) (JetStream delivery 2)",
        "failed: max deliveries exhausted (last holder gpu-box (w1)):",
    ]


async def test_expired_leases_past_the_budget_fail_and_an_extended_one_is_left_alone(
    ledger: Ledger,
) -> None:
    job_id = await new_job(ledger, 3)
    long_ago = utcnow() - timedelta(seconds=LEASE_S * 3)
    await lease(ledger, job_id, [offer(1), offer(2), offer(3)], now=long_ago)
    async with ledger.sessions() as s, s.begin():
        extended = await transitions.extend(s, job_id, [(2, 1)], now=utcnow(), lease_s=LEASE_S)
    async with ledger.sessions() as s, s.begin():
        expired = await transitions.expire_leases(s, now=utcnow(), max_deliver=1, limit=100)
    assert extended == {(2, 1)}
    assert expired.lapsed.requeued == []
    assert sorted(h.image_id for h in expired.lapsed.exhausted) == ["1", "3"]
    assert expired.oldest_deadline is not None
    assert expired.oldest_deadline < utcnow() - timedelta(seconds=LEASE_S)
    assert (await image(ledger, job_id, "2")).state == "reserved"
    assert (await image(ledger, job_id, "3")).state == "failed"


async def test_expired_leases_within_the_budget_go_back_to_the_queue(ledger: Ledger) -> None:
    job_id = await new_job(ledger, 1)
    await lease(ledger, job_id, [offer(1)], now=utcnow() - timedelta(seconds=LEASE_S * 2))
    async with ledger.sessions() as s, s.begin():
        expired = await transitions.expire_leases(s, now=utcnow(), max_deliver=3, limit=100)
    row = await image(ledger, job_id, "1")
    assert [h.image_id for h in expired.lapsed.requeued] == ["1"]
    assert (row.state, row.expiries, row.lease_deadline) == ("queued", 1, None)
    assert any("lease expired without a result" in m for m in await history(ledger, job_id, None))


async def test_extend_and_release_act_only_on_the_current_delivery(ledger: Ledger) -> None:
    job_id = await new_job(ledger, 1)
    await lease(ledger, job_id, [offer(1, delivered=2)])
    async with ledger.sessions() as s, s.begin():
        stale_extend = await transitions.extend(s, job_id, [(1, 1)], now=utcnow(), lease_s=1.0)
        stale_release = await transitions.release(s, job_id, [(1, 1)], now=utcnow())
    still = await image(ledger, job_id, "1")
    async with ledger.sessions() as s, s.begin():
        released = await transitions.release(s, job_id, [(1, 2)], now=utcnow())
    row = await image(ledger, job_id, "1")
    assert stale_extend == set() and stale_release == set()
    assert still.state == "reserved"
    assert released == {(1, 2)}
    assert (row.state, row.lease_deadline) == ("queued", None)
    assert (await history(ledger, job_id, None))[-1] == "released 1 task(s) by gpu-box [1]"


async def test_outcomes_are_set_once_replays_are_duplicates_and_an_error_never_downgrades_done(
    ledger: Ledger,
) -> None:
    job_id = await new_job(ledger, 3)
    await lease(ledger, job_id, [offer(1), offer(2), offer(3)])
    first = await record(ledger, job_id, success(1, key=0), failure(2, "boom", key=1))
    replay = await record(
        ledger, job_id, success(1, key=0), failure(2, "boom", key=1), failure(1, "late", key=2)
    )
    one, two = await image(ledger, job_id, "1"), await image(ledger, job_id, "2")
    assert first.accepted == {0: "1", 1: "2"} and first.done == ["1"] and first.failed == ["2"]
    assert replay.accepted == {} and replay.duplicates == {0: "1", 1: "2", 2: "1"}
    assert not replay.changed
    assert (one.state, one.reason) == ("done", None)
    assert (two.state, two.reason) == ("failed", "boom")
    assert await count(ledger, ImageResultRow, job_id, "1") == 1
    assert await count(ledger, Detection, job_id, "1") == 1
    assert await history(ledger, job_id, "1") == [
        "reserved by gpu-box (w1) (JetStream delivery 1)",
        "result accepted from gpu-box (w1)",
    ]
    assert (await history(ledger, job_id, None))[-1] == (
        "results from gpu-box (w1): 0 accepted, 3 duplicate, 0 rejected"
    )


async def test_a_late_success_upgrades_a_failed_image_and_keeps_the_failure_in_its_history(
    ledger: Ledger,
) -> None:
    job_id = await new_job(ledger, 1)
    await record(ledger, job_id, failure(1, "image download failed: HTTP 404"))
    late = await record(ledger, job_id, success(1))
    row = await image(ledger, job_id, "1")
    assert late.accepted == {0: "1"} and late.done == ["1"]
    assert late.upgraded == [("1", "image download failed: HTTP 404")]
    assert row.state == "done"
    assert await count(ledger, ImageResultRow, job_id, "1") == 1
    assert await history(ledger, job_id, "1") == [
        "worker reported failure for",
        "late result stored: failed image upgraded to done (was: image download failed: HTTP 404)",
        "result accepted from gpu-box (w1)",
    ]


async def test_items_naming_another_image_or_none_of_the_job_are_rejected_with_why(
    ledger: Ledger,
) -> None:
    job_id = await new_job(ledger, 2)
    recorded = await record(
        ledger,
        job_id,
        success(1, "2", key=0),
        success(None, "nope", key=1),
        success(99, "1", key=2),
        success(2, key=3),
        success(2, key=4),
    )
    assert recorded.rejected == {
        0: "reply_subject is the receipt of image '1', result is for '2'",
        1: f"image 'nope' is not in job {job_id}",
        2: "reply_subject does not match a task of this job",
    }
    assert recorded.accepted == {3: "2"} and recorded.duplicates == {4: "2"}
    assert (await image(ledger, job_id, "1")).state == "queued"
    assert await count(ledger, ImageResultRow, job_id, "2") == 1


async def test_a_result_through_an_earlier_generations_receipt_reaches_its_image_by_id(
    ledger: Ledger,
) -> None:
    job_id = await new_job(ledger, 2)
    recorded = await record(ledger, job_id, success(None, "2"))
    assert recorded.accepted == {0: "2"}
    assert (await image(ledger, job_id, "2")).state == "done"


async def test_the_last_outcome_finishes_the_job_and_a_late_one_re_evaluates_it(
    ledger: Ledger,
) -> None:
    job_id = await new_job(ledger, 2, failure_threshold=0.0)
    assert await conclude(ledger, job_id, success(1)) is None
    finished = await conclude(ledger, job_id, failure(2, "boom"))
    failed_status = await job_status(ledger, job_id)
    assert await conclude(ledger, job_id, success(2)) is None
    assert finished is not None
    assert (finished.status, finished.generation) == (JobStatus.FAILURE, 1)
    assert (finished.counts.done, finished.counts.failed, finished.counts.total) == (1, 1, 2)
    assert failed_status == "FAILURE"
    assert await job_status(ledger, job_id) == "SUCCESS"
    assert (await history(ledger, job_id, None))[-3:] == [
        "finished FAILURE: 1 done, 1 failed of 2; failed images [2]",
        "results from gpu-box (w1): 1 accepted, 0 duplicate, 0 rejected",
        "status re-evaluated after a late result: SUCCESS",
    ]


async def test_cancel_fails_what_remains_keeps_outcomes_and_revokes_once(ledger: Ledger) -> None:
    job_id = await new_job(ledger, 3)
    await record(ledger, job_id, success(1))
    async with ledger.sessions() as s, s.begin():
        failed = await transitions.fail_open(s, job_id, "cancelled", level=30, now=utcnow())
        generation = await transitions.revoke(s, job_id, now=utcnow())
        again = await transitions.revoke(s, job_id, now=utcnow())
        finalized = await transitions.finalize(s, job_id, now=utcnow())
    assert sorted(failed) == ["2", "3"]
    assert (generation, again, finalized) == (1, None, None)
    assert await job_status(ledger, job_id) == "REVOKED"
    assert (await image(ledger, job_id, "1")).state == "done"
    assert (await image(ledger, job_id, "3")).reason == "cancelled"
    assert await history(ledger, job_id, "3") == ["failed: cancelled:"]
