"""Where failures are created, every failed image is named in a WARNING+ log line.

Two kinds of failure in one job: a worker SIGKILLed while holding 96 tasks with
``max_deliver`` 1 (their leases lapse: failed, "max deliveries exhausted"), and
a pipeline that reports some images as errors (failed with the worker's reason).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from tests.chaos.helpers import (
    JOB_IMAGES,
    at_rest,
    create_job,
    image_detail,
    images,
    job_view,
    wait_finished,
)
from tests.chaos.pipelines import FAIL_REASON, ONE_BOX
from tests.support.polling import until
from tests.support.processes import Processes
from trapline.queue import EmbeddedNats

pytestmark = pytest.mark.chaos

WARNING_PLUS = ("WARNING", "ERROR", "CRITICAL")
_LINE = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) (\S+): (.*)$")
_IDS = re.compile(r"\[([^\[\]]*)\]")


def named_in_warnings(log: str, about: str) -> set[str]:
    """Image ids named in bracketed lists of WARNING+ lines whose message matches ``about``."""
    named: set[str] = set()
    for line in log.splitlines():
        m = _LINE.match(line)
        if not m or not re.search(about, m.group(3)):
            continue
        for ids in _IDS.findall(m.group(3)):
            named.update(i.strip() for i in ids.split(",") if i.strip())
    return named


async def test_every_failed_image_has_a_warning_log_line_naming_it(
    database_url: str,
    nats_server: EmbeddedNats,
    procs: Processes,
    measure: Callable[..., None],
) -> None:
    server = await procs.server(
        database_url=database_url, nats_url=nats_server.url, ack_wait_s=3.0, max_deliver=1
    )
    job = await create_job(server, JOB_IMAGES, pipeline=ONE_BOX, failure_threshold=0.5)
    fail_ids = [str(i) for i in range(25, JOB_IMAGES + 1, 25)]  # 20 images
    common: dict[str, Any] = {
        "server_url": server.url,
        "token": server.worker_token,
        "pipeline": ONE_BOX,
        "test_pipeline": True,
        "fail_ids": fail_ids,
    }
    # Batches of 32, slow compute: it holds 3 batches (96 tasks) almost at once.
    doomed = procs.worker(name="doomed", batch_size=32, compute_s=10.0, **common)

    async def holds_three_batches_on_one_lease() -> bool:
        # All 96 extended by one call (one deadline): their leases lapse together, and
        # one reconciler sweep fails them all at once.
        held = [r for r in await images(server, job["id"], "reserved") if doomed.holds(r["holder"])]
        return len(held) == 96 and len({r["lease_deadline"] for r in held}) == 1

    await until(
        holds_three_batches_on_one_lease, "the doomed worker to hold 96 tasks", 60, interval_s=0.05
    )
    doomed.kill()
    await doomed.wait(10)

    async def doomed_tasks_failed() -> bool:
        return int((await job_view(server, job["id"]))["counts"]["failed"]) >= 96

    # Only then the other worker: its pulls cannot race the reconciler for them.
    await until(doomed_tasks_failed, "the doomed worker's 96 tasks to fail", 30)
    finisher = procs.worker(name="finisher", batch_size=16, **common)
    view = await wait_finished(server, job["id"], 90)
    finisher_code = await finisher.stop()
    failed = {r["image_id"]: r for r in await images(server, job["id"], "failed")}
    exhausted = {i for i, r in failed.items() if "max deliveries exhausted" in (r["reason"] or "")}
    reported = {i for i, r in failed.items() if r["reason"] == FAIL_REASON}

    # The job's own record: each failed image's history has a WARNING+ line.
    unrecorded = []
    for image_id in failed:
        history = (await image_detail(server, job["id"], image_id))["history"]
        if not any(h["level"] in WARNING_PLUS and "fail" in h["message"] for h in history):
            unrecorded.append(image_id)
    # The server's log: a WARNING+ line naming each failed image.
    server_log = server.log_text()
    unnamed = sorted(set(failed) - named_in_warnings(server_log, "fail"), key=int)
    worker_named = named_in_warnings(finisher.log_text(), "") & reported
    measure(
        backend=database_url.split(":")[0],
        failed=len(failed),
        exhausted=len(exhausted),
        reported_by_pipeline=len(reported),
        unnamed_in_server_log=len(unnamed),
        reported_named_in_worker_log=len(worker_named),
    )
    assert finisher_code == 0, finisher.log_tail()
    assert view["status"] == "SUCCESS"  # 96 + a few of 500: under the 0.5 threshold
    at_rest(view)
    assert len(exhausted) == 96 and reported, (len(exhausted), len(reported))
    assert set(failed) == exhausted | reported
    assert view["counts"]["failed"] == len(failed)
    assert unrecorded == []
    assert unnamed == [], (
        f"{len(unnamed)} failed images are named in no WARNING+ line of the server log "
        f"(the job line lists at most 50 ids: trapline.ledger.events.format_ids): {unnamed}"
    )
