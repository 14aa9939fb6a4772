"""Worker processes killed, stopped and restarted mid-job, and compute slower than the lease.

Workers are real subprocesses (``trapline worker``, or the test runner for test
pipelines) against a real server subprocess; images held by a worker are read
from the server's ledger (``holder`` = ``service@host``, ``leased_at``).
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.helpers import (
    BATCH,
    JOB_IMAGES,
    at_rest,
    create_job,
    detections_per_image,
    image_detail,
    images,
    job_logs,
    job_view,
    outbox_pending,
    result_totals,
    ts,
    wait_finished,
)
from tests.chaos.pipelines import ONE_BOX, factory
from tests.support.polling import until
from tests.support.processes import Processes, ServerProcess, WorkerProcess
from trapline.queue import EmbeddedNats
from trapline.settings import WorkerSettings
from trapline.worker import run_worker

pytestmark = pytest.mark.chaos

ACK_WAIT_S = 3.0
RECONCILE_INTERVAL_S = 1.0


def backend(database_url: str) -> str:
    return database_url.split(":")[0]


async def held_by(
    server: ServerProcess, job_id: int, worker: WorkerProcess
) -> list[dict[str, Any]]:
    return [r for r in await images(server, job_id, "reserved") if worker.holds(r["holder"])]


async def done_count(server: ServerProcess, job_id: int) -> int:
    return int((await job_view(server, job_id))["counts"]["done"])


async def test_worker_sigkilled_mid_batch_while_another_runs_is_redelivered_within_ack_wait_plus_5s(
    database_url: str,
    nats_server: EmbeddedNats,
    procs: Processes,
    measure: Callable[..., None],
) -> None:
    server = await procs.server(
        database_url=database_url, nats_url=nats_server.url, ack_wait_s=ACK_WAIT_S
    )
    job = await create_job(server, JOB_IMAGES, pipeline=ONE_BOX)
    common: dict[str, Any] = {
        "server_url": server.url,
        "token": server.worker_token,
        "pipeline": ONE_BOX,
        "test_pipeline": True,
        "batch_size": BATCH,
        "compute_s": 0.3,
    }
    victim = procs.worker(name="victim", **common)
    survivor = procs.worker(name="survivor", **common)

    async def victim_mid_job() -> bool:
        # Mid-job and mid-batch: it has delivered, and holds at least a batch.
        held = await held_by(server, job["id"], victim)
        return len(held) >= BATCH and await done_count(server, job["id"]) >= 4 * BATCH

    await until(victim_mid_job, "the victim to hold a batch mid-job", 60, interval_s=0.05)
    killed_at = victim.kill()
    assert await victim.wait(10) == -9
    stranded = {r["image_id"] for r in await held_by(server, job["id"], victim)}
    view = await wait_finished(server, job["id"], 90)
    rows = {r["image_id"]: r for r in await images(server, job["id"])}
    survivor_code = await survivor.stop()
    totals = await result_totals(server, job["id"])

    # Stranded images that the victim's last POST did not commit went to the survivor.
    redelivered = {i: rows[i] for i in stranded if survivor.holds(rows[i]["holder"])}
    delays = [ts(r["leased_at"]) - killed_at for r in redelivered.values()]
    measure(
        backend=backend(database_url),
        stranded=len(stranded),
        redelivered=len(redelivered),
        redelivery_min_s=round(min(delays), 2) if delays else None,
        redelivery_max_s=round(max(delays), 2) if delays else None,
        ack_wait_s=ACK_WAIT_S,
    )
    assert len(stranded) >= BATCH
    assert redelivered, "no stranded image was redelivered to the survivor"
    assert all(rows[i]["state"] == "done" for i in stranded)
    assert all(r["deliveries"] == 2 for r in redelivered.values())
    assert max(delays) <= ACK_WAIT_S + 5.0, delays
    assert view["status"] == "SUCCESS"
    at_rest(view)
    assert view["counts"]["done"] == JOB_IMAGES and view["counts"]["failed"] == 0
    assert view["detections"] == JOB_IMAGES  # one per image: nothing stored twice
    assert totals["accepted"] == JOB_IMAGES
    assert survivor_code == 0, survivor.log_tail()


async def test_worker_sigtermed_mid_job_releases_its_unprocessed_tasks_to_another_within_2s(
    database_url: str,
    nats_server: EmbeddedNats,
    procs: Processes,
    measure: Callable[..., None],
) -> None:
    server = await procs.server(
        database_url=database_url, nats_url=nats_server.url, ack_wait_s=ACK_WAIT_S
    )
    job = await create_job(server, JOB_IMAGES, pipeline=ONE_BOX)
    common: dict[str, Any] = {
        "server_url": server.url,
        "token": server.worker_token,
        "pipeline": ONE_BOX,
        "test_pipeline": True,
        "batch_size": BATCH,
    }
    # Slow enough that it holds a batch in compute and two prefetched when stopped.
    leaving = procs.worker(name="leaving", compute_s=1.0, **common)
    staying = procs.worker(name="staying", compute_s=0.2, **common)

    async def leaving_mid_job() -> list[dict[str, Any]] | None:
        held = await held_by(server, job["id"], leaving)
        if len(held) < 2 * BATCH:
            return None
        done_by_leaving = [
            r for r in await images(server, job["id"], "done") if leaving.holds(r["holder"])
        ]
        return held if done_by_leaving else None

    held = await until(leaving_mid_job, "the leaving worker to hold tasks mid-job", 60, 0.05)
    termed_at = leaving.terminate()
    loop = asyncio.get_running_loop()
    termed_loop = loop.time()
    code = await leaving.wait(40)
    exited_after = loop.time() - termed_loop
    view = await wait_finished(server, job["id"], 90)
    rows = {r["image_id"]: r for r in await images(server, job["id"])}
    staying_code = await staying.stop()
    totals = await result_totals(server, job["id"])

    held_ids = {r["image_id"] for r in held}
    handed_over = {i: rows[i] for i in held_ids if staying.holds(rows[i]["holder"])}
    delays = sorted(ts(r["leased_at"]) - termed_at for r in handed_over.values())
    released_lines = leaving.log_lines(r"released \d+ tasks \(shutting down\)")
    measure(
        backend=backend(database_url),
        held_at_sigterm=len(held_ids),
        handed_over=len(handed_over),
        reserved_by_other_median_s=round(statistics.median(delays), 2) if delays else None,
        reserved_by_other_max_s=round(max(delays), 2) if delays else None,
        exit_code=code,
        exited_after_sigterm_s=round(exited_after, 2),
    )
    assert code == 0, leaving.log_tail()
    assert released_lines, leaving.log_tail()
    assert handed_over, "nothing the stopped worker held went to the other worker"
    # Its unprocessed tasks were released at once and reserved by the other within 2 s,
    # on their second delivery (a release, not a lease expiry).
    assert max(delays) <= 2.0, delays
    assert all(r["deliveries"] == 2 and r["expiries"] == 0 for r in handed_over.values())
    # The rest of what it held (the batch in compute) it delivered itself before exiting.
    assert all(rows[i]["state"] == "done" for i in held_ids)
    assert view["status"] == "SUCCESS"
    at_rest(view)
    assert view["counts"]["done"] == JOB_IMAGES and view["counts"]["failed"] == 0
    assert view["detections"] == JOB_IMAGES
    assert totals["accepted"] == JOB_IMAGES
    assert staying_code == 0, staying.log_tail()


async def test_worker_killed_with_results_in_its_outbox_while_the_server_is_down_delivers_them_after_restart(
    database_url: str,
    nats_server: EmbeddedNats,
    procs: Processes,
    measure: Callable[..., None],
) -> None:
    server = await procs.server(
        database_url=database_url, nats_url=nats_server.url, ack_wait_s=ACK_WAIT_S
    )
    job = await create_job(server, JOB_IMAGES, pipeline=ONE_BOX)
    # 0.3 s of compute per batch: when the server dies there is always a batch in
    # compute or prefetched, whose results can only go to the outbox.
    worker = procs.worker(
        server_url=server.url,
        token=server.worker_token,
        name="outboxed",
        batch_size=BATCH,
        pipeline=ONE_BOX,
        test_pipeline=True,
        compute_s=0.3,
    )
    await until(
        lambda: _at_least(server, job["id"], 6 * BATCH), "the worker to deliver some batches", 60
    )
    server.kill()  # the server crashes: nothing answers any more
    assert await server.wait(10) == -9
    server_down_at = asyncio.get_running_loop().time()

    async def outbox_has_results() -> list[tuple[int, list[str]]]:
        return outbox_pending(worker.state_dir)

    await until(outbox_has_results, "a result batch in the worker's outbox", 30)
    worker.kill()
    assert await worker.wait(10) == -9
    kept = outbox_pending(worker.state_dir)
    kept_ids = {i for job_id, ids in kept for i in ids if job_id == job["id"]}
    assert kept_ids
    # Down for longer than a lease, so the worker's leases lapse meanwhile.
    await asyncio.sleep(
        max(0.0, ACK_WAIT_S + 1 - (asyncio.get_running_loop().time() - server_down_at))
    )
    await server.start_and_wait()
    back_at = asyncio.get_running_loop().time()
    worker.start()  # same state dir: the outbox it left behind
    view = await wait_finished(server, job["id"], 90)
    finished_after = asyncio.get_running_loop().time() - back_at
    code = await worker.stop()
    rows = {r["image_id"]: r for r in await images(server, job["id"])}
    totals = await result_totals(server, job["id"])
    leftover_lines = worker.log_lines(r"delivering \d+ result batch\(es\) left in the outbox")
    measure(
        backend=backend(database_url),
        kept_in_outbox=len(kept_ids),
        outbox_batches=len(kept),
        finished_after_server_back_s=round(finished_after, 2),
        duplicates_answered=totals["duplicate"],
    )
    assert len(leftover_lines) == 1, worker.log_tail()
    assert f"delivering {len(kept)} result batch" in leftover_lines[0]
    # Done from the outbox with their first delivery's receipts, not processed again.
    assert all(rows[i]["state"] == "done" and rows[i]["deliveries"] == 1 for i in kept_ids)
    assert outbox_pending(worker.state_dir) == []
    assert code == 0, worker.log_tail()
    assert view["status"] == "SUCCESS"
    at_rest(view)
    assert view["counts"]["done"] == JOB_IMAGES and view["counts"]["failed"] == 0
    assert totals["accepted"] == JOB_IMAGES and totals["rejected"] == 0


async def _at_least(server: ServerProcess, job_id: int, n: int) -> bool:
    return await done_count(server, job_id) >= n


async def test_compute_slower_than_ack_wait_delivers_no_image_twice(
    database_url: str,
    nats_server: EmbeddedNats,
    procs: Processes,
    tmp_path: Path,
    measure: Callable[..., None],
) -> None:
    """Lease 2 s, 5 s of compute per batch: prefetched and computing tasks keep their lease.

    Six in-process workers (32 batches: about 30 s). With eight, the server's
    extend answers on a loaded machine took up to 1.9 s and some leases lapsed;
    see the chaos report.
    """
    ack_wait_s, compute_s, workers = 2.0, 5.0, 6
    server = await procs.server(
        database_url=database_url, nats_url=nats_server.url, ack_wait_s=ack_wait_s
    )
    job = await create_job(server, JOB_IMAGES, pipeline=ONE_BOX)

    def settings(i: int) -> WorkerSettings:
        return WorkerSettings(
            server_url=server.url,
            token=server.worker_token,
            service_name=f"slow-{i}",
            state_dir=tmp_path / f"slow-{i}",
            batch_size=BATCH,
            poll_interval_s=0.2,
        )

    started = asyncio.get_running_loop().time()
    reports = await asyncio.wait_for(
        asyncio.gather(
            *(
                run_worker(settings(i), [ONE_BOX], drain=True, pipeline_factory=factory(compute_s))
                for i in range(workers)
            )
        ),
        timeout=150,
    )
    elapsed = asyncio.get_running_loop().time() - started
    view = await wait_finished(server, job["id"], 10)
    rows = await images(server, job["id"])
    totals = await result_totals(server, job["id"])
    twice = [r["image_id"] for r in rows if r["deliveries"] != 1 or r["expiries"] != 0]
    measure(
        backend=backend(database_url),
        workers=workers,
        ack_wait_s=ack_wait_s,
        compute_s_per_batch=compute_s,
        job_s=round(elapsed, 1),
        delivered_twice=len(twice),
        duplicates_answered=totals["duplicate"],
    )
    assert twice == []
    assert totals["duplicate"] == 0 and totals["accepted"] == JOB_IMAGES
    assert sum(r.delivered for r in reports) == JOB_IMAGES
    assert all(r.ok for r in reports)
    assert view["status"] == "SUCCESS"
    at_rest(view)
    assert view["counts"]["done"] == JOB_IMAGES
    assert view["detections"] == JOB_IMAGES


async def test_worker_sigkilled_on_the_last_allowed_delivery_fails_its_images_never_redelivers(
    database_url: str,
    nats_server: EmbeddedNats,
    procs: Processes,
    measure: Callable[..., None],
) -> None:
    """max_deliver 1: a lapsed lease is the last one, whoever pulls first.

    Bug (since the consumer's max_deliver became unlimited, e45a21b): when JetStream
    redelivers a message whose ledger lease lapsed before the reconciler's sweep,
    ``transitions.lease`` hands it out again ("lease expired ... (delivery 1 of 1);
    redelivered") instead of failing it: the retry budget is exceeded.
    """
    server = await procs.server(
        database_url=database_url,
        nats_url=nats_server.url,
        ack_wait_s=ACK_WAIT_S,
        max_deliver=1,
        reconcile_interval_s=RECONCILE_INTERVAL_S,  # the default
    )
    job = await create_job(server, JOB_IMAGES, pipeline=ONE_BOX, failure_threshold=0.5)
    common: dict[str, Any] = {
        "server_url": server.url,
        "token": server.worker_token,
        "pipeline": ONE_BOX,
        "test_pipeline": True,
        "batch_size": BATCH,
    }
    doomed = procs.worker(name="doomed", compute_s=30.0, **common)

    async def held_on_one_lease() -> list[dict[str, Any]] | None:
        held = await held_by(server, job["id"], doomed)
        # Reserved and extended at least once (one call: one deadline for all).
        ok = len(held) >= 3 * BATCH and len({r["lease_deadline"] for r in held}) == 1
        return held if ok else None

    held = await until(held_on_one_lease, "the doomed worker to hold 3 batches", 60, 0.05)
    # The other worker is pulling when the leases lapse, as in any busy deployment.
    survivor = procs.worker(name="survivor", **common)
    await survivor.wait_for_log(r"registered pipelines", 30)
    killed_at = doomed.kill()
    doomed_code = await doomed.wait(10)
    view = await wait_finished(server, job["id"], 90)
    survivor_code = await survivor.stop()
    rows = {r["image_id"]: r for r in await images(server, job["id"])}
    held_ids = {r["image_id"] for r in held}
    over_budget = sorted((i for i, r in rows.items() if r["deliveries"] > 1), key=int)
    failed = {i for i, r in rows.items() if r["state"] == "failed"}
    done = {i for i, r in rows.items() if r["state"] == "done"}
    per_image = await detections_per_image(server, job["id"])
    histories = {i: await image_detail(server, job["id"], i) for i in sorted(held_ids, key=int)}
    logs = await job_logs(server, job["id"])
    # The server's process log names every failed image (the stored job line may
    # abbreviate a long list); its lines for this failure, with their ids.
    exhausted_lines = server.log_lines(
        rf"ERROR trapline\.jobs: job {job['id']}: failed: max deliveries exhausted"
    )
    named_in_log = {i for line in exhausted_lines for i in _bracketed_ids(line)}
    detected_s = [ts(rows[i]["failed_at"]) - killed_at for i in failed if rows[i]["failed_at"]]
    measure(
        backend=backend(database_url),
        held_by_killed=len(held_ids),
        failed=view["counts"]["failed"],
        delivered_beyond_max_deliver=len(over_budget),
        failed_after_kill_max_s=round(max(detected_s), 2) if detected_s else None,
    )
    assert doomed_code == -9, doomed.log_tail()
    assert survivor_code == 0, survivor.log_tail()
    at_rest(view)
    assert over_budget == [], (
        f"{len(over_budget)} images leased beyond max_deliver=1 (transitions.lease re-leases a "
        f"lapsed last delivery that JetStream redelivers before the reconciler fails it)"
    )
    # Exactly the images the killed worker held failed, each for its exhausted lease.
    assert failed == held_ids
    for i in held_ids:
        reason = str(rows[i]["reason"])
        assert reason.startswith("max deliveries exhausted (1 of 1; last holder "), reason
        assert doomed.holds(reason.split("last holder ", 1)[1]), reason
        assert rows[i]["leases"] == 1 and rows[i]["result_at"] is None, rows[i]
    # Detected once the lease lapsed: no later than one lease plus one reconciler sweep
    # (and a loaded machine's delay) after the kill.
    assert len(detected_s) == len(held_ids)
    assert max(detected_s) <= ACK_WAIT_S + RECONCILE_INTERVAL_S + 5.0, detected_s
    # ... and reported: an ERROR history line on each image, the images named in the
    # server's log, and the job's final line listing them as failed.
    for i, detail in histories.items():
        lines = [h for h in detail["history"] if "max deliveries exhausted" in h["message"]]
        assert [h["level"] for h in lines] == ["ERROR"], (i, detail["history"])
        assert detail["detections"] == []
    assert named_in_log == held_ids, sorted(named_in_log ^ held_ids, key=int)
    summary = f"finished SUCCESS: {len(done)} done, {len(held_ids)} failed of {JOB_IMAGES}"
    finished_lines = [line for line in logs if line["message"].startswith("finished ")]
    assert [line["level"] for line in finished_lines] == ["WARNING"], finished_lines
    assert finished_lines[0]["message"].startswith(summary), finished_lines
    # Under the failure threshold (0.5): the job succeeds with its failed images named.
    assert view["status"] == "SUCCESS"
    assert view["counts"]["failed"] == len(held_ids)
    assert view["counts"]["done"] == len(done) == JOB_IMAGES - len(held_ids)
    # The others were processed once each by whoever held them: one detection per done
    # image (ONE_BOX), none for a failed one.
    assert per_image == dict.fromkeys(done, 1)
    assert view["detections"] == len(done)


def _bracketed_ids(line: str) -> list[str]:
    """The image ids of a log line ending ``[id, id, ...]`` (optionally ``(part n of m)``)."""
    inside = line[line.rindex("[") + 1 : line.rindex("]")]
    return [i.strip() for i in inside.split(",") if i.strip()]
