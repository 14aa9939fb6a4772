"""The worker end to end against the real server over HTTP: drain, faults, shutdown.

Faults on the way to the server come from the fault proxy in front of it; what
happened is read back from the server (its job counts, image states and
reasons, detections). The fake server is used only for what the real one never
does: answer as plain Antenna, and hand out malformed tasks.
"""

from __future__ import annotations

import logging
import re
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.helpers import outbox_pending
from tests.support.faultproxy import Fault, FaultProxy, Rule
from tests.support.polling import until
from tests.support.servers import RunningServer
from tests.worker import server_api as api
from tests.worker.fake_antenna import TOKEN, FakeAntenna
from tests.worker.pipelines import GatedPipeline, factory
from tests.worker.running import drained, running_worker
from tests.worker.server_api import image_list, names
from tests.worker.worker_settings import make_settings
from trapline.errors import PipelineError, WorkerError
from trapline.settings import WorkerSettings
from trapline.worker import WorkerReport, WorkerStats, delivery_stage, reserve_stage
from trapline.worker.outbox import Outbox
from trapline.worker.results import error_item

RESULT_PATH = r"^/api/v2/jobs/\d+/result/$"
RESERVE_PATH = r"^/api/v2/jobs/\d+/tasks/$"
RELEASE_PATH = r"^/api/v2/jobs/\d+/tasks/release/$"


def extend_path(job_id: int) -> str:
    return rf"^/api/v2/jobs/{job_id}/tasks/extend/$"


def settings(
    url: str, server: RunningServer, tmp_path: Path, **overrides: object
) -> WorkerSettings:
    return make_settings(url, server.worker_token, tmp_path / "state", **overrides)


def forwarded(proxy: FaultProxy, path: str, method: str = "POST") -> int:
    """Requests the proxy passed to the server and got an answer for."""
    return proxy.count("forwarded", method, path)


def reserved_jobs(proxy: FaultProxy) -> list[int]:
    """The job of each reserve the server answered, in order."""
    return [
        int(re.findall(r"\d+", e.path)[-1])
        for e in proxy.events_matching("POST", RESERVE_PATH)
        if e.action == "forwarded"
    ]


def has_fired(rule: Rule) -> bool:
    return rule.fired >= 1


def finished(total: int, done: int = 0, failed: int = 0) -> dict[str, int]:
    return {"total": total, "queued": 0, "reserved": 0, "done": done, "failed": failed}


def assert_accounted(report: WorkerReport) -> None:
    """Every reserved task has exactly one outcome."""
    assert report.unsettled == 0
    assert report.reserved == (
        report.delivered
        + report.failed
        + report.released
        + report.kept_in_outbox
        + report.rejected
        + report.abandoned
    )


async def reserved_on_server(server: RunningServer, job_id: int, n: int) -> None:
    async def holds() -> bool:
        return (await api.counts(server, job_id))["reserved"] == n

    await until(holds, f"job {job_id} to have {n} images reserved")


# -- draining -------------------------------------------------------------------------------


async def test_drain_delivers_every_image_of_every_job_oldest_first(
    server: RunningServer, proxy_to: Any, tmp_path: Path
) -> None:
    proxy: FaultProxy = proxy_to(server)
    older = await api.create_job(server, "null", image_list(names(7)))
    newer = await api.create_job(server, "null", image_list(names(10)))
    other = await api.create_job(server, "other-pipeline", image_list(names(3)))

    report = await drained(settings(proxy.url, server, tmp_path), ["null"], factory())

    assert report.ok and report.exit_code == 0
    assert (report.reserved, report.delivered, report.failed) == (17, 17, 0)
    assert_accounted(report)
    assert await api.counts(server, older) == finished(7, done=7)
    assert await api.counts(server, newer) == finished(10, done=10)
    assert (await api.job_view(server, newer))["status"] == "SUCCESS"
    assert (await api.counts(server, other))["queued"] == 3
    order = reserved_jobs(proxy)
    assert other not in order
    # The older job is served until it runs dry before the newer one is touched.
    last_older = max(i for i, job in enumerate(order) if job == older)
    assert last_older < order.index(newer)
    services = await api.registered_services(server)
    assert [s["pipelines"] for s in services] == [["null"]]
    assert report.outbox_pending == 0
    assert outbox_pending(tmp_path / "state") == []


async def test_result_endpoint_failures_are_retried_until_accepted(
    server: RunningServer, proxy_to: Any, tmp_path: Path
) -> None:
    proxy: FaultProxy = proxy_to(server)
    job = await api.create_job(server, "null", image_list(names(8)))
    # One fault after the other, each until it has hit a result POST at least once;
    # reset_after: the server commits, the worker never hears of it and sends again.
    faults = [
        proxy.add_rule(Fault.STATUS, RESULT_PATH, status=503),
        proxy.add_rule(Fault.RESET_BEFORE, RESULT_PATH),
        proxy.add_rule(Fault.RESET_AFTER, RESULT_PATH),
        proxy.add_rule(Fault.STATUS, RESULT_PATH, status=500),
        proxy.add_rule(Fault.STATUS, RESULT_PATH, status=429),
    ]
    for rule in faults[1:]:
        rule.enabled = False
    async with running_worker(
        settings(proxy.url, server, tmp_path), ["null"], factory(), drain=True
    ) as worker:
        for current, following in zip(faults, [*faults[1:], None], strict=True):
            await until(partial(has_fired, current), f"{current.fault} to hit a POST")
            if following is not None:
                following.enabled = True
            current.enabled = False
        report = await worker.report()

    assert report.ok and report.delivered == 8
    assert await api.counts(server, job) == finished(8, done=8)
    # Nothing was handed out twice: each image got its one result on its first lease.
    assert {row["deliveries"] for row in (await api.images(server, job)).values()} == {1}
    # A batch committed behind a reset was sent again and counted once.
    totals = await api.result_totals(server, job)
    assert totals["accepted"] == 8 and totals["duplicate"] >= 4 and totals["rejected"] == 0


async def test_malformed_tasks_become_error_results_and_the_loop_goes_on(
    fake: FakeAntenna, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The fake: a real server never hands out tasks like these.
    fake.add_job(1, "null", names(4))
    fake.inject_task(
        1,
        {"id": 5, "image_id": "img0", "image_url": "http://x/0.jpg", "reply_subject": "S0"},
        "img0",
    )
    fake.inject_task(
        1, {"id": "1:img1", "image_id": "img1", "image_url": None, "reply_subject": "S1"}, "img1"
    )
    fake.inject_task(1, {"id": "1:img9", "image_id": "img9"})
    caplog.set_level(logging.WARNING)

    report = await drained(make_settings(fake.url, TOKEN, tmp_path), ["null"], factory())

    outcomes = fake.outcomes(1)
    assert outcomes["img0"] == {
        "error": "malformed task: id is int, not a string",
        "image_id": "img0",
    }
    assert outcomes["img1"]["error"] == "malformed task: image_url is null, not a URL"
    assert outcomes["img2"]["detections"] == [] and outcomes["img3"]["detections"] == []
    assert (report.failed, report.delivered, report.malformed) == (2, 2, 1)
    assert report.ok
    assert "task without a reply_subject ignored" in caplog.text


async def test_downloads_pixels_and_reports_failed_images_with_reasons(
    server: RunningServer, image_host: Any, tmp_path: Path
) -> None:
    photos = ["ok1", "missing1", "gone1", "junk1", "flaky1"]
    job = await api.create_job(server, "pixels", image_list(photos, image_host.url))

    report = await drained(settings(server.url, server, tmp_path), ["pixels"], factory())

    assert (report.delivered, report.failed) == (2, 3)
    assert report.ok
    reasons = await api.reasons(server, job)
    assert reasons.keys() == {"missing1", "gone1", "junk1"}
    assert reasons["missing1"] == "image download failed: HTTP 404"
    assert reasons["gone1"] == "image download failed: HTTP 410"
    assert reasons["junk1"].startswith("image could not be decoded")
    detections = {d["image_id"]: d for d in await api.detections(server, job)}
    assert detections.keys() == {"ok1", "flaky1"}  # flaky: 503 once, then served
    for detection in detections.values():
        assert detection["bbox"] == {"x1": 0.0, "y1": 0.0, "x2": 32.0, "y2": 24.0}
        assert detection["algorithm"] == "box"
        assert detection["classifications"][0]["classification"] == "big"
    assert await api.counts(server, job) == finished(5, done=2, failed=3)
    # Image URLs are fetched without the worker's token.
    assert image_host.auth_headers and set(image_host.auth_headers) == {None}


# -- start-up -------------------------------------------------------------------------------


async def test_pipeline_that_cannot_load_reserves_nothing(
    server: RunningServer, proxy_to: Any, tmp_path: Path
) -> None:
    proxy: FaultProxy = proxy_to(server)
    job = await api.create_job(server, "broken", image_list(names(4)))
    with pytest.raises(PipelineError, match="model weights not found"):
        await drained(settings(proxy.url, server, tmp_path), ["broken"], factory())
    assert proxy.counts["requests"] == 0
    assert (await api.counts(server, job))["queued"] == 4


async def test_refused_token_is_a_start_error(server: RunningServer, tmp_path: Path) -> None:
    job = await api.create_job(server, "null", image_list(names(4)))
    with pytest.raises(WorkerError, match="refused the token"):
        await drained(
            make_settings(server.url, "not-a-token", tmp_path), ["null"], factory(), limit_s=20
        )
    assert (await api.counts(server, job))["queued"] == 4


async def test_plain_antenna_works_without_extend_and_release(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The fake: a server without capabilities, extend or release that lists jobs two per page.
    fake = FakeAntenna(trapline=False, page_size=2)
    fake.server.start()
    try:
        for job_id in (1, 2, 3):
            fake.add_job(job_id, "null", names(3))
        caplog.set_level(logging.WARNING)
        # The AMI worker's form of the base URL is accepted too.
        report = await drained(
            make_settings(fake.url + "/api/v2", TOKEN, tmp_path), ["null"], factory()
        )
    finally:
        fake.server.stop()
    assert report.ok and report.delivered == 9
    assert [fake.at_rest(job_id) for job_id in (1, 2, 3)] == [(0, 0, 3)] * 3
    assert 2 in fake.list_offsets  # the third job was on the second page
    assert fake.count("extend") == fake.count("release") == 0
    assert "lease extension and release are off" in caplog.text


async def test_results_left_in_the_outbox_are_delivered_first_on_start(
    server: RunningServer, proxy_to: Any, tmp_path: Path
) -> None:
    proxy: FaultProxy = proxy_to(server)
    job = await api.create_job(server, "null", image_list(names(3)))
    async with server.worker_client(worker_id="earlier-run") as earlier:
        r = await earlier.post(f"/api/v2/jobs/{job}/tasks/", json={"batch_size": 1})
    [task] = r.json()["tasks"]
    outbox = Outbox.open(tmp_path / "state")
    outbox.add_sync(
        job,
        [error_item(task["reply_subject"], task["image_id"], "image download failed: HTTP 404")],
    )
    outbox.close()

    report = await drained(settings(proxy.url, server, tmp_path), ["null"], factory())

    assert report.ok and report.recovered == 1 and report.delivered == 2
    assert await api.reasons(server, job) == {task["image_id"]: "image download failed: HTTP 404"}
    assert await api.counts(server, job) == finished(3, done=2, failed=1)
    posts = [e.path for e in proxy.events if e.action == "forwarded" and e.method == "POST"]
    first_result = next(i for i, p in enumerate(posts) if re.search(RESULT_PATH, p))
    first_reserve = next(i for i, p in enumerate(posts) if re.search(RESERVE_PATH, p))
    assert first_result < first_reserve


# -- stopping -------------------------------------------------------------------------------


async def test_graceful_stop_finishes_the_batch_in_compute_and_releases_the_rest(
    server: RunningServer, proxy_to: Any, tmp_path: Path, gated: GatedPipeline
) -> None:
    proxy: FaultProxy = proxy_to(server)
    job = await api.create_job(server, "gated", image_list(names(20)))
    async with running_worker(
        settings(proxy.url, server, tmp_path), ["gated"], factory(gated)
    ) as worker:
        await until(gated.started.is_set, "a batch in compute")
        # One batch computing, two prefetched (prefetch_batches=2).
        await reserved_on_server(server, job, 12)
        worker.stop.set()
        # The prefetched batches go back while the batch in compute is still held.
        await until(lambda: forwarded(proxy, RELEASE_PATH) >= 1, "the prefetched tasks released")
        assert await api.counts(server, job) == {
            "total": 20,
            "queued": 16,
            "reserved": 4,
            "done": 0,
            "failed": 0,
        }
        gated.open()
        report = await worker.report()

    assert report.ok and report.exit_code == 0
    assert report.delivered == 4
    assert report.released == report.reserved - 4 == 8
    assert_accounted(report)
    assert gated.batches == 1
    assert await api.counts(server, job) == {
        "total": 20,
        "queued": 16,
        "reserved": 0,
        "done": 4,
        "failed": 0,
    }


async def test_abort_releases_the_batch_in_compute_without_waiting(
    server: RunningServer, tmp_path: Path, gated: GatedPipeline
) -> None:
    job = await api.create_job(server, "gated", image_list(names(8)))
    async with running_worker(
        settings(server.url, server, tmp_path, grace_s=30), ["gated"], factory(gated)
    ) as worker:
        await until(gated.started.is_set, "a batch in compute")
        await reserved_on_server(server, job, 8)
        started = time.monotonic()
        worker.stop.set()
        worker.abort.set()
        report = await worker.report(limit_s=10)
        took_s = time.monotonic() - started

    assert took_s < 5  # not the 30 s grace period
    assert report.released == report.reserved == 8
    assert report.ok
    assert await api.counts(server, job) == {
        "total": 8,
        "queued": 8,
        "reserved": 0,
        "done": 0,
        "failed": 0,
    }


async def test_cancelled_job_releases_prefetched_tasks(
    server: RunningServer,
    proxy_to: Any,
    tmp_path: Path,
    gated: GatedPipeline,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reserve_stage, "RELIST_INTERVAL_S", 0.1)
    proxy: FaultProxy = proxy_to(server)
    job = await api.create_job(server, "gated", image_list(names(16)))
    async with running_worker(
        settings(proxy.url, server, tmp_path), ["gated"], factory(gated)
    ) as worker:
        await until(gated.started.is_set, "a batch in compute")
        await reserved_on_server(server, job, 12)
        async with server.client() as admin:
            assert (await admin.post(f"/api/v2/jobs/{job}/cancel/")).status_code == 200
        await until(lambda: forwarded(proxy, RELEASE_PATH) >= 1, "the prefetched tasks released")
        gated.open()
        # The batch in compute is still delivered; nothing else is computed.
        await until(lambda: forwarded(proxy, RESULT_PATH) >= 1, "the batch in compute delivered")
        report = await worker.stopped()

    assert gated.batches == 1
    assert (report.delivered, report.released) == (4, 8)
    assert report.ok
    assert (await api.job_view(server, job))["status"] == "REVOKED"


# -- leases ---------------------------------------------------------------------------------


async def test_leases_are_extended_while_a_batch_computes_past_its_lease(
    short_lease_server: RunningServer, proxy_to: Any, tmp_path: Path, gated: GatedPipeline
) -> None:
    server = short_lease_server  # 1 s leases
    proxy: FaultProxy = proxy_to(server)
    job = await api.create_job(server, "gated", image_list(names(4)))
    async with running_worker(
        settings(proxy.url, server, tmp_path), ["gated"], factory(gated), drain=True
    ) as worker:
        await until(gated.started.is_set, "a batch in compute")
        # Three extensions (every 0.5 s): the batch has been held past its 1 s lease.
        await until(lambda: forwarded(proxy, extend_path(job)) >= 3, "three lease extensions")
        async with server.worker_client(worker_id="other") as other:
            r = await other.post(f"/api/v2/jobs/{job}/tasks/", json={"batch_size": 4})
        assert r.json()["tasks"] == []  # nothing lapsed, so nothing was handed to another worker
        gated.open()
        report = await worker.report()

    assert report.ok and report.delivered == 4
    assert await api.counts(server, job) == finished(4, done=4)
    assert {row["deliveries"] for row in (await api.images(server, job)).values()} == {1}


async def test_receipts_the_server_no_longer_holds_are_not_extended_but_still_delivered(
    short_lease_server: RunningServer,
    proxy_to: Any,
    tmp_path: Path,
    gated: GatedPipeline,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = short_lease_server  # 1 s leases
    proxy: FaultProxy = proxy_to(server)
    first = await api.create_job(server, "gated", image_list(names(4)))
    second = await api.create_job(server, "gated", image_list(names(4, "second")))
    # The first job's extensions fail, so its leases lapse while the batch computes.
    blocked = proxy.add_rule(Fault.STATUS, extend_path(first), status=503)
    caplog.set_level(logging.WARNING)
    # One batch prefetched (the second job's): no room to reserve the first job's
    # redelivered images itself, so every first-job receipt it holds is the stale one.
    async with running_worker(
        settings(proxy.url, server, tmp_path, prefetch_batches=1),
        ["gated"],
        factory(gated),
        drain=True,
    ) as worker:
        await until(gated.started.is_set, "the first job's batch in compute")
        await reserved_on_server(server, second, 4)  # prefetched, and extended all along
        async with server.worker_client(worker_id="other") as other:

            async def taken_over() -> bool:
                r = await other.post(f"/api/v2/jobs/{first}/tasks/", json={"batch_size": 4})
                return len(r.json()["tasks"]) == 4

            await until(taken_over, "the first job's images redelivered to another worker")
        blocked.enabled = False
        await until(lambda: "no longer holds" in caplog.text, "the worker to hear it")
        refused = forwarded(proxy, extend_path(first))
        later = forwarded(proxy, extend_path(second))
        await until(
            lambda: forwarded(proxy, extend_path(second)) >= later + 2,
            "two more extensions of the second job",
        )
        assert forwarded(proxy, extend_path(first)) == refused
        gated.open()
        report = await worker.report()

    assert report.ok and report.delivered == 8
    assert (await api.counts(server, first))["done"] == 4
    assert await api.counts(server, second) == finished(4, done=4)


# -- delivery -------------------------------------------------------------------------------


async def test_undeliverable_batch_is_kept_in_the_outbox_and_its_tasks_given_back(
    server: RunningServer, proxy_to: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proxy: FaultProxy = proxy_to(server)
    job = await api.create_job(server, "null", image_list(names(4)))
    proxy.add_rule(Fault.STATUS, RESULT_PATH, status=503)
    caplog.set_level(logging.WARNING)

    report = await drained(
        settings(proxy.url, server, tmp_path, delivery_deadline_s=0.3), ["null"], factory()
    )

    assert not report.ok and report.exit_code == 1
    assert report.kept_in_outbox == 4 and report.outbox_pending == 4
    assert_accounted(report)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("not delivered in time" in m and "img0, img1, img2, img3" in m for m in errors)
    assert any("HTTP 503" in m for m in errors)
    assert outbox_pending(tmp_path / "state") == [(job, names(4))]
    # Kept results' tasks go back to the queue so another worker can redo them now.
    assert await api.counts(server, job) == {
        "total": 4,
        "queued": 4,
        "reserved": 0,
        "done": 0,
        "failed": 0,
    }


async def test_a_kept_batch_is_delivered_later_when_the_server_is_back(
    server: RunningServer,
    proxy_to: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(delivery_stage, "OUTBOX_SWEEP_INTERVAL_S", 0.2)
    proxy: FaultProxy = proxy_to(server)
    job = await api.create_job(server, "null", image_list(names(4)))
    outage = proxy.add_outage(RESULT_PATH, fault=Fault.STATUS, status=503)
    outage.begin()
    caplog.set_level(logging.WARNING)
    state = tmp_path / "state"
    async with running_worker(
        settings(proxy.url, server, tmp_path, delivery_deadline_s=0.3), ["null"], factory()
    ) as worker:
        await until(
            lambda: "not delivered in time" in caplog.text, "the worker to keep the batch", 10
        )
        kept = [r.getMessage() for r in caplog.records if "not delivered in time" in r.getMessage()]
        assert "img0, img1, img2, img3" in kept[0]
        assert outbox_pending(state) == [(job, names(4))]
        assert (await api.counts(server, job))["done"] == 0
        outage.end()  # the server is back

        # Empty once a sweep has the server's 2xx (a POST cut off by the deadline after
        # the server committed is kept again, and the next sweep hears "duplicate").
        await until(lambda: outbox_pending(state) == [], "the kept batch delivered by a sweep")
        report = await worker.stopped()

    assert report.ok and report.delivered == 4 and report.kept_in_outbox == 0
    assert report.outbox_pending == 0
    assert await api.counts(server, job) == finished(4, done=4)


# -- pipelines that misbehave -------------------------------------------------------------


async def test_a_pipeline_that_keeps_raising_reports_failures_then_stops(
    server: RunningServer, tmp_path: Path
) -> None:
    job = await api.create_job(server, "raising", image_list(names(24)))
    report = await drained(settings(server.url, server, tmp_path), ["raising"], factory())

    assert report.fatal is not None and "3 batches in a row" in report.fatal
    assert not report.ok
    assert report.failed == 12
    assert_accounted(report)
    reasons = await api.reasons(server, job)
    assert len(reasons) == 12
    assert set(reasons.values()) == {
        "pipeline raising failed on this image: RuntimeError: CUDA error: device-side assert "
        "triggered"
    }
    # Nothing is left leased: what was not computed was released.
    assert await api.counts(server, job) == {
        "total": 24,
        "queued": 12,
        "reserved": 0,
        "done": 0,
        "failed": 12,
    }


async def test_a_pipeline_breaking_its_contract_fails_images_not_the_worker(
    server: RunningServer, tmp_path: Path
) -> None:
    job = await api.create_job(server, "garbage", image_list(names(8)))
    report = await drained(settings(server.url, server, tmp_path), ["garbage"], factory())
    assert report.fatal is None and report.ok
    assert report.failed == 8
    assert set((await api.reasons(server, job)).values()) == {
        "pipeline returned NoneType, not a list of ImageResult",
        "pipeline result could not be encoded: AttributeError: 'NoneType' object has no "
        "attribute 'label'",
    }
    assert await api.counts(server, job) == finished(8, failed=8)


# -- progress -------------------------------------------------------------------------------


async def test_stats_callback_sees_progress(
    server: RunningServer, tmp_path: Path, gated: GatedPipeline
) -> None:
    job = await api.create_job(server, "gated", image_list(names(8)))
    seen: list[WorkerStats] = []
    async with running_worker(
        settings(server.url, server, tmp_path),
        ["gated"],
        factory(gated),
        drain=True,
        on_stats=seen.append,
    ) as worker:
        gated.let_through(1)
        await until(lambda: any(s.delivered == 4 for s in seen), "a snapshot after the first batch")
        halfway = next(s for s in seen if s.delivered == 4)
        gated.open()
        report = await worker.report()

    assert report.ok
    # Halfway: both batches reserved, the first computed and delivered, the second held.
    assert (halfway.reserved, halfway.computed, halfway.delivered, halfway.held) == (8, 4, 4, 4)
    assert halfway.jobs == [job]
    final = seen[-1]
    assert (final.reserved, final.computed, final.delivered, final.held) == (8, 8, 8, 0)
