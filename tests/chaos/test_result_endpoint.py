"""Faults on the result endpoint between a real worker process and the real server.

The seed's failure: the worker's last result POSTs fail and are abandoned. Here
the endpoint answers 503, resets connections after committing, or is down for
20 s while the last batches are posted; every image still ends done, once, and
the job finishes on the worker's first retries after the endpoint comes back.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.chaos.helpers import (
    BATCH,
    JOB_IMAGES,
    RESULT_PATH,
    RESULT_POSTS,
    at_rest,
    create_job,
    detections_per_image,
    images,
    job_logs,
    result_totals,
    ts,
    wait_finished,
)
from tests.chaos.pipelines import ONE_BOX
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.processes import Processes
from trapline.queue import EmbeddedNats

pytestmark = pytest.mark.chaos

ACK_WAIT_S = 3.0
# The worker's cap on the wait between two delivery attempts (its default, set here so
# the bound below follows it).
RETRY_CAP_S = 4.0
# A loaded machine delays a timer and a POST by this much at most.
SCHEDULING_SLACK_S = 3.0
# The server's timestamps and the proxy's are both the host's wall clock, stored to the
# microsecond; this covers rounding, not a delay.
CLOCK_SLACK_S = 0.01


async def test_result_endpoint_503_on_30pc_and_reset_after_commit_on_10pc_counts_each_image_once(
    database_url: str,
    nats_server: EmbeddedNats,
    procs: Processes,
    proxies: Callable[..., FaultProxy],
    measure: Callable[..., None],
) -> None:
    server = await procs.server(
        database_url=database_url, nats_url=nats_server.url, ack_wait_s=ACK_WAIT_S
    )
    proxy = proxies(("127.0.0.1", server.port), seed=20261128)
    unavailable = proxy.add_rule(Fault.STATUS, RESULT_PATH, method="POST", rate=0.3, status=503)
    dropped = proxy.add_rule(Fault.RESET_AFTER, RESULT_PATH, method="POST", rate=0.1)
    job = await create_job(server, JOB_IMAGES, pipeline=ONE_BOX)
    worker = procs.worker(
        server_url=proxy.url,
        token=server.worker_token,
        name="w503",
        pipeline=ONE_BOX,
        test_pipeline=True,
        batch_size=BATCH,
        drain=True,
    )
    code = await worker.wait(120)
    view = await wait_finished(server, job["id"], 10)
    totals = await result_totals(server, job["id"])
    per_image = await detections_per_image(server, job["id"])
    measure(
        backend=database_url.split(":")[0],
        answered_503=unavailable.fired,
        reset_after_commit=dropped.fired,
        result_posts_seen_by_server=totals["posts"],
        accepted=totals["accepted"],
        duplicates_answered=totals["duplicate"],
        job_s=round(ts(view["finished_at"]) - ts(view["started_at"]), 2),
    )
    assert code == 0, worker.log_tail()
    # The seeded draws hit both faults, more than once each.
    assert unavailable.fired >= 3 and dropped.fired >= 2, (unavailable.fired, dropped.fired)
    assert view["status"] == "SUCCESS"
    at_rest(view)
    assert view["counts"]["done"] == JOB_IMAGES and view["counts"]["failed"] == 0
    # Counted once: one detection per image stored, never two, for every image.
    assert view["detections"] == JOB_IMAGES
    assert len(per_image) == JOB_IMAGES and set(per_image.values()) == {1}
    # The server's result log: each image accepted exactly once; the batches whose
    # answer was dropped after commit came back and were answered as duplicates.
    assert totals["accepted"] == JOB_IMAGES and totals["rejected"] == 0
    assert totals["duplicate"] >= dropped.fired  # at least one item per re-sent batch
    # Every POST that reached the server is in its log: first sends, plus one re-send
    # for each batch that was reset after commit (503s never reached it).
    # Each batch got exactly one answer through (then left the outbox).
    forwarded = proxy.count("forwarded", "POST", RESULT_PATH)
    assert forwarded == RESULT_POSTS
    assert totals["posts"] == forwarded + dropped.fired


async def test_result_endpoint_down_20s_while_the_last_batches_post_finishes_on_their_first_retry_after(
    database_url: str,
    nats_server: EmbeddedNats,
    procs: Processes,
    proxies: Callable[..., FaultProxy],
    measure: Callable[..., None],
) -> None:
    """The seed's case: the last batches' POSTs fail; here they are kept and retried, not
    dropped, on the leases they were handed, and none of their images is processed again."""
    server = await procs.server(
        database_url=database_url, nats_url=nats_server.url, ack_wait_s=ACK_WAIT_S
    )
    proxy = proxies(("127.0.0.1", server.port), seed=1)
    last_batches = 3
    outage = proxy.add_outage(
        RESULT_PATH, method="POST", after=RESULT_POSTS - last_batches, duration_s=20.0
    )
    job = await create_job(server, JOB_IMAGES, pipeline=ONE_BOX)
    worker = procs.worker(
        server_url=proxy.url,
        token=server.worker_token,
        name="wdown",
        pipeline=ONE_BOX,
        test_pipeline=True,
        batch_size=BATCH,
        drain=True,
        extra_env={"TRAPLINE_DELIVERY_BACKOFF_CAP_S": RETRY_CAP_S},
    )
    code = await worker.wait(120)
    view = await wait_finished(server, job["id"], 10)
    totals = await result_totals(server, job["id"])
    rows = await images(server, job["id"])
    logs = await job_logs(server, job["id"])
    assert outage.began_at is not None and outage.ended_at is not None, outage
    finished = ts(view["finished_at"])
    posts = proxy.events_matching("POST", RESULT_PATH)
    forwarded_during = [
        e
        for e in posts
        if e.action == "forwarded" and outage.began_at <= e.arrived_at < outage.ended_at
    ]
    after = [e for e in posts if e.arrived_at >= outage.ended_at]
    # Events are listed as they complete; order by arrival for "first" and "last".
    arrivals = sorted(e.arrived_at for e in after)
    # Images whose result the server took after the endpoint came back: the kept batches'.
    late = [r for r in rows if r["result_at"] and ts(r["result_at"]) > outage.ended_at]
    redelivered = [
        r["image_id"] for r in rows if (r["deliveries"], r["leases"], r["expiries"]) != (1, 1, 0)
    ]
    lapse_lines = [line["message"] for line in logs if "lease expired" in line["message"]]
    measure(
        backend=database_url.split(":")[0],
        posts_refused=outage.refused,
        first_retry_after_outage_s=round(arrivals[0] - outage.ended_at, 2) if after else None,
        finalized_after_outage_s=round(finished - outage.ended_at, 2),
        images_redelivered=len(redelivered),
        duplicates_answered=totals["duplicate"],
    )
    assert code == 0, worker.log_tail()
    # The outage caught the last batches: each of them failed at least once, and no
    # result reached the server while it lasted.
    assert outage.refused >= last_batches
    assert forwarded_during == []
    # Nothing was redelivered: every image was leased once, on its first JetStream
    # delivery, and no lease lapsed, though the last batches' results waited 20 s
    # (almost seven lease lengths) in the worker's outbox.
    assert redelivered == [], f"{len(redelivered)} images redelivered: {redelivered[:20]}"
    assert lapse_lines == []
    # Kept, not dropped: once the endpoint was back, each kept batch was sent once and
    # accepted (one POST each, none refused), and those were the last batches' images.
    assert [e.action for e in after] == ["forwarded"] * last_batches, after
    assert len(late) == JOB_IMAGES - (RESULT_POSTS - last_batches) * BATCH
    # Every batch reached the server exactly once: nothing to answer as a duplicate.
    assert totals == {
        "accepted": JOB_IMAGES,
        "duplicate": 0,
        "rejected": 0,
        "posts": RESULT_POSTS,
    }
    assert view["status"] == "SUCCESS"
    at_rest(view)
    assert view["counts"]["done"] == JOB_IMAGES and view["counts"]["failed"] == 0
    assert view["detections"] == JOB_IMAGES
    # In order: the endpoint came back, the kept batches were re-sent on their next
    # retry (each waits at most the backoff cap), and their commits finished the job:
    # not before the endpoint was back, and by the time the last re-send was answered.
    assert arrivals[-1] <= outage.ended_at + RETRY_CAP_S + SCHEDULING_SLACK_S, arrivals
    last_answer = max(e.at for e in after)
    assert arrivals[0] - CLOCK_SLACK_S <= finished <= last_answer + CLOCK_SLACK_S, (
        outage.ended_at,
        arrivals,
        finished,
    )


async def test_result_endpoint_hanging_after_commit_on_10pc_is_retried_after_the_client_timeout(
    database_url: str,
    nats_server: EmbeddedNats,
    procs: Processes,
    proxies: Callable[..., FaultProxy],
    measure: Callable[..., None],
) -> None:
    """The server commits but its answer never comes: the worker times out and re-sends."""
    server = await procs.server(
        database_url=database_url, nats_url=nats_server.url, ack_wait_s=ACK_WAIT_S
    )
    proxy = proxies(("127.0.0.1", server.port), seed=4)
    hung = proxy.add_rule(Fault.HANG_AFTER, RESULT_PATH, method="POST", rate=0.1)
    job = await create_job(server, JOB_IMAGES, pipeline=ONE_BOX)
    worker = procs.worker(
        server_url=proxy.url,
        token=server.worker_token,
        name="whang",
        pipeline=ONE_BOX,
        test_pipeline=True,
        batch_size=BATCH,
        drain=True,
        extra_env={"TRAPLINE_HTTP_TIMEOUT_S": 2},
    )
    code = await worker.wait(120)
    view = await wait_finished(server, job["id"], 10)
    totals = await result_totals(server, job["id"])
    measure(
        backend=database_url.split(":")[0],
        hung_after_commit=hung.fired,
        duplicates_answered=totals["duplicate"],
        job_s=round(ts(view["finished_at"]) - ts(view["started_at"]), 2),
    )
    assert code == 0, worker.log_tail()
    assert hung.fired >= 2
    assert view["status"] == "SUCCESS"
    at_rest(view)
    assert view["counts"]["done"] == JOB_IMAGES and view["counts"]["failed"] == 0
    assert view["detections"] == JOB_IMAGES
    assert totals["accepted"] == JOB_IMAGES and totals["rejected"] == 0
    assert totals["duplicate"] >= hung.fired
    assert proxy.count("forwarded", "POST", RESULT_PATH) == RESULT_POSTS
    assert totals["posts"] == RESULT_POSTS + hung.fired
