"""The worker end to end against a fake worker-API server: drain, faults, shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from tests.worker.worker_fakes import (
    FakeAntenna,
    GatedPipeline,
    Reply,
    SlowPipeline,
    make_settings,
    pipeline_factory,
    until,
)
from trapline.errors import PipelineError, WorkerError
from trapline.worker import WorkerReport, WorkerStats, delivery_stage, reserve_stage, run_worker
from trapline.worker.outbox import Outbox
from trapline.worker.results import error_item


def ids(n: int, prefix: str = "img") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


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


async def test_drain_delivers_every_image_of_every_job_oldest_first(
    fake: FakeAntenna, tmp_path: Path
) -> None:
    fake.add_job(8, "null", ids(10))
    fake.add_job(3, "null", ids(7))
    fake.add_job(5, "other-pipeline", ids(3))
    settings = make_settings(fake.url, tmp_path)

    report = await run_worker(settings, ["null"], drain=True, pipeline_factory=pipeline_factory)

    assert report.ok and report.exit_code == 0
    assert (report.reserved, report.delivered, report.failed) == (17, 17, 0)
    assert_accounted(report)
    assert fake.at_rest(3) == (0, 0, 7)
    assert fake.at_rest(8) == (0, 0, 10)
    assert fake.count("reserve", 5) == 0
    reserves = [job for action, job in fake.calls if action == "reserve"]
    first_8 = reserves.index(8)
    # Job 3 (older) is served until it runs dry (2 batches, then empty) before job 8.
    assert reserves[:first_8] == [3, 3, 3]
    result = next(iter(fake.outcomes(3).values()))
    assert result["pipeline"] == "null" and result["detections"] == []
    assert fake.registrations[0]["pipelines"][0]["slug"] == "null"
    assert report.outbox_pending == 0
    assert Outbox.open(tmp_path).entries_sync() == []


async def test_result_endpoint_failures_are_retried_until_accepted(
    fake: FakeAntenna, tmp_path: Path
) -> None:
    fake.add_job(1, "null", ids(8))
    fake.result_script.extend(
        [Reply(503, {"detail": "db down"}), Reply(drop=True), Reply(500, b"boom"), Reply(429)]
    )
    report = await run_worker(
        make_settings(fake.url, tmp_path), ["null"], drain=True, pipeline_factory=pipeline_factory
    )
    assert report.ok
    assert report.delivered == 8
    assert fake.at_rest(1) == (0, 0, 8)
    assert fake.count("result") >= 6


async def test_malformed_tasks_become_error_results_and_the_loop_goes_on(
    fake: FakeAntenna, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.add_job(1, "null", ids(4))
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

    report = await run_worker(
        make_settings(fake.url, tmp_path), ["null"], drain=True, pipeline_factory=pipeline_factory
    )

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
    fake: FakeAntenna, tmp_path: Path
) -> None:
    fake.add_job(2, "pixels", ["ok1", "missing1", "gone1", "junk1", "flaky1"])
    report = await run_worker(
        make_settings(fake.url, tmp_path), ["pixels"], drain=True, pipeline_factory=pipeline_factory
    )

    outcomes = fake.outcomes(2)
    assert outcomes["missing1"] == {
        "error": "image download failed: HTTP 404",
        "image_id": "missing1",
    }
    assert outcomes["gone1"]["error"] == "image download failed: HTTP 410"
    assert outcomes["junk1"]["error"].startswith("image could not be decoded")
    for image_id in ("ok1", "flaky1"):  # flaky: 503 once, then served
        detection = outcomes[image_id]["detections"][0]
        assert detection["bbox"] == {"x1": 0.0, "y1": 0.0, "x2": 32.0, "y2": 24.0}
        assert detection["algorithm"] == {"name": "Whole-image box", "key": "box"}
        assert detection["classifications"][0]["classification"] == "big"
    assert (report.delivered, report.failed) == (2, 3)
    assert report.ok
    # Image URLs are fetched without the worker's token.
    assert fake.image_auth_headers and set(fake.image_auth_headers) == {None}


async def test_pipeline_that_cannot_load_reserves_nothing(
    fake: FakeAntenna, tmp_path: Path
) -> None:
    fake.add_job(1, "broken", ids(4))
    with pytest.raises(PipelineError, match="model weights not found"):
        await run_worker(
            make_settings(fake.url, tmp_path),
            ["broken"],
            drain=True,
            pipeline_factory=pipeline_factory,
        )
    assert fake.server.requests == []


async def test_refused_token_is_a_start_error(fake: FakeAntenna, tmp_path: Path) -> None:
    fake.add_job(1, "null", ids(4))
    with pytest.raises(WorkerError, match="refused the token"):
        await run_worker(
            make_settings(fake.url, tmp_path, token="wrong"),
            ["null"],
            drain=True,
            pipeline_factory=pipeline_factory,
        )
    assert fake.count("reserve") == 0


async def test_plain_antenna_works_without_extend_and_release(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeAntenna(trapline=False)
    fake.server.start()
    try:
        fake.add_job(1, "null", ids(6))
        caplog.set_level(logging.WARNING)
        # The AMI worker's form of the base URL is accepted too.
        report = await run_worker(
            make_settings(fake.url + "/api/v2", tmp_path),
            ["null"],
            drain=True,
            pipeline_factory=pipeline_factory,
        )
    finally:
        fake.server.stop()
    assert report.ok and report.delivered == 6
    assert fake.count("extend") == fake.count("release") == 0
    assert "lease extension and release are off" in caplog.text


async def test_graceful_stop_finishes_the_batch_in_compute_and_releases_the_rest(
    fake: FakeAntenna, tmp_path: Path, gated: type[GatedPipeline]
) -> None:
    fake.add_job(1, "gated", ids(20))
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_worker(
            make_settings(fake.url, tmp_path),
            ["gated"],
            stop=stop,
            pipeline_factory=pipeline_factory,
        )
    )
    await asyncio.to_thread(gated.started.wait, 10)
    # One batch computing, two prefetched (prefetch_batches=2).
    await until(lambda: fake.count("reserve", 1) >= 3)
    stop.set()
    await until(lambda: fake.count("release", 1) >= 1)
    gated.gate.set()
    report = await asyncio.wait_for(task, 20)

    assert report.ok and report.exit_code == 0
    assert report.delivered == 4
    assert report.released == report.reserved - 4 == 8
    assert_accounted(report)
    ready, leased, done = fake.at_rest(1)
    assert (leased, done, ready) == (0, 4, 16)


async def test_abort_releases_the_batch_in_compute_without_waiting(
    fake: FakeAntenna, tmp_path: Path, gated: type[GatedPipeline]
) -> None:
    fake.add_job(1, "gated", ids(8))
    stop, abort = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        run_worker(
            make_settings(fake.url, tmp_path, grace_s=30),
            ["gated"],
            stop=stop,
            abort=abort,
            pipeline_factory=pipeline_factory,
        )
    )
    await asyncio.to_thread(gated.started.wait, 10)
    await until(lambda: fake.count("reserve", 1) >= 2)
    started = time.monotonic()
    stop.set()
    abort.set()
    report = await asyncio.wait_for(task, 10)
    assert time.monotonic() - started < 5  # not the 30 s grace period
    assert report.released == report.reserved == 8
    assert report.ok
    assert fake.at_rest(1) == (8, 0, 0)


async def test_cancelled_job_releases_prefetched_tasks(
    fake: FakeAntenna, tmp_path: Path, gated: type[GatedPipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reserve_stage, "RELIST_INTERVAL_S", 0.1)
    job = fake.add_job(1, "gated", ids(16))
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_worker(
            make_settings(fake.url, tmp_path),
            ["gated"],
            stop=stop,
            pipeline_factory=pipeline_factory,
        )
    )
    await asyncio.to_thread(gated.started.wait, 10)
    await until(lambda: fake.count("reserve", 1) >= 3)
    with fake.lock:
        job.cancelled = True
    await until(lambda: fake.count("release", 1) >= 1)
    gated.gate.set()
    # The batch in compute is still delivered; nothing else is computed.
    await until(lambda: fake.at_rest(1)[2] == 4)
    stop.set()
    report = await asyncio.wait_for(task, 10)
    assert gated.batches == 1
    assert (report.delivered, report.released) == (4, 8)
    assert report.ok


async def test_leases_are_extended_while_held_and_unknown_receipts_still_deliver(
    tmp_path: Path, gated: type[GatedPipeline], caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeAntenna(ack_wait_seconds=0.3)  # extension every 0.1 s
    fake.server.start()
    try:
        job = fake.add_job(1, "gated", ids(4))
        caplog.set_level(logging.WARNING)
        task = asyncio.create_task(
            run_worker(
                make_settings(fake.url, tmp_path),
                ["gated"],
                drain=True,
                pipeline_factory=pipeline_factory,
            )
        )
        await asyncio.to_thread(gated.started.wait, 10)
        await until(lambda: fake.count("extend", 1) >= 2)
        with fake.lock:  # the server lost our leases (expired, redelivered elsewhere)
            job.leases.clear()
        await until(lambda: "no longer holds" in caplog.text)
        extends = fake.count("extend", 1)
        await asyncio.sleep(0.3)
        assert fake.count("extend", 1) == extends  # unknown receipts are not extended again
        gated.gate.set()
        report = await asyncio.wait_for(task, 10)
    finally:
        fake.server.stop()
    assert report.ok and report.delivered == 4
    assert fake.at_rest(1) == (0, 0, 4)


async def test_undeliverable_batch_is_kept_in_the_outbox_with_an_error(
    fake: FakeAntenna, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.add_job(1, "null", ids(4))
    fake.result_hook = lambda req, job: Reply(503, {"detail": "database unavailable"})
    caplog.set_level(logging.WARNING)

    report = await run_worker(
        make_settings(fake.url, tmp_path, delivery_deadline_s=0.3),
        ["null"],
        drain=True,
        pipeline_factory=pipeline_factory,
    )

    assert not report.ok and report.exit_code == 1
    assert report.kept_in_outbox == 4 and report.outbox_pending == 4
    assert_accounted(report)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("img0, img1, img2, img3" in r.getMessage() for r in errors)
    assert any("database unavailable" in r.getMessage() for r in errors)
    entries = Outbox.open(tmp_path).entries_sync()
    assert [e.image_ids for e in entries] == [["img0", "img1", "img2", "img3"]]
    assert entries[0].attempts >= 1


async def test_results_left_in_the_outbox_are_delivered_first_on_start(
    fake: FakeAntenna, tmp_path: Path
) -> None:
    job = fake.add_job(1, "null", ids(3))
    with fake.lock:  # img0 was reserved by the run that left its result behind
        job.ready.remove("img0")
        job.issued["S-old"] = "img0"
    outbox = Outbox.open(tmp_path)
    outbox.add_sync(1, [error_item("S-old", "img0", "image download failed: HTTP 404")])
    outbox.close()

    report = await run_worker(
        make_settings(fake.url, tmp_path), ["null"], drain=True, pipeline_factory=pipeline_factory
    )

    assert report.ok and report.recovered == 1 and report.delivered == 2
    assert fake.outcomes(1)["img0"]["error"] == "image download failed: HTTP 404"
    first_result = fake.calls.index(("result", 1))
    assert first_result < fake.calls.index(("reserve", 1))


async def test_a_pipeline_that_keeps_raising_reports_failures_then_stops(
    fake: FakeAntenna, tmp_path: Path
) -> None:
    fake.add_job(1, "raising", ids(24))
    report = await run_worker(
        make_settings(fake.url, tmp_path),
        ["raising"],
        drain=True,
        pipeline_factory=pipeline_factory,
    )
    assert report.fatal is not None and "3 batches in a row" in report.fatal
    assert not report.ok
    assert report.failed == 12
    assert_accounted(report)
    reason = fake.outcomes(1)["img0"]["error"]
    assert (
        reason
        == "pipeline raising failed on this image: RuntimeError: CUDA error: device-side assert triggered"
    )
    assert fake.at_rest(1)[1] == 0  # nothing left leased: the rest was released


async def test_stats_callback_sees_progress(fake: FakeAntenna, tmp_path: Path) -> None:
    fake.add_job(1, "slow", ids(8))
    SlowPipeline.seconds = 0.2
    seen: list[WorkerStats] = []
    report = await run_worker(
        make_settings(fake.url, tmp_path),
        ["slow"],
        drain=True,
        pipeline_factory=pipeline_factory,
        on_stats=seen.append,
    )
    assert report.ok and seen
    assert seen[0].reserved <= seen[-1].reserved


async def test_a_kept_batch_is_delivered_later_when_the_server_is_back(
    fake: FakeAntenna, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery_stage, "OUTBOX_SWEEP_INTERVAL_S", 0.2)
    fake.add_job(1, "null", ids(4))
    fake.result_hook = lambda req, job: Reply(503, {"detail": "database unavailable"})
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_worker(
            make_settings(fake.url, tmp_path, delivery_deadline_s=0.2),
            ["null"],
            stop=stop,
            pipeline_factory=pipeline_factory,
        )
    )
    await until(lambda: fake.count("result", 1) >= 2)
    await asyncio.sleep(0.3)  # past the delivery deadline: the batch is kept
    fake.result_hook = None  # the server is back
    await until(lambda: fake.at_rest(1)[2] == 4)
    stop.set()
    report = await asyncio.wait_for(task, 10)
    assert report.ok and report.delivered == 4 and report.kept_in_outbox == 0
    assert report.outbox_pending == 0


async def test_a_pipeline_breaking_its_contract_fails_images_not_the_worker(
    fake: FakeAntenna, tmp_path: Path
) -> None:
    fake.add_job(1, "garbage", ids(8))
    report = await run_worker(
        make_settings(fake.url, tmp_path),
        ["garbage"],
        drain=True,
        pipeline_factory=pipeline_factory,
    )
    assert report.fatal is None and report.ok
    assert report.failed == 8
    reasons = {o["error"] for o in fake.outcomes(1).values()}
    assert reasons == {
        "pipeline returned NoneType, not a list of ImageResult",
        "pipeline result could not be encoded: AttributeError: 'NoneType' object has no "
        "attribute 'label'",
    }
