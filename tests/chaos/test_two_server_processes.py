"""Two `trapline server` processes on one database and one NATS, a worker on each."""

from __future__ import annotations

from collections.abc import Callable

from tests.chaos.helpers import (
    JOB_IMAGES,
    at_rest,
    create_job,
    job_logs,
    result_totals,
    wait_finished,
)
from tests.support.processes import Processes
from trapline.queue import EmbeddedNats


async def test_two_server_processes_never_count_an_image_or_finalize_the_job_twice(
    database_url: str,
    nats_server: EmbeddedNats,
    procs: Processes,
    measure: Callable[..., None],
) -> None:
    one = await procs.server(
        database_url=database_url, nats_url=nats_server.url, ack_wait_s=3.0, name="server-1"
    )
    two = await procs.server(
        database_url=database_url, nats_url=nats_server.url, ack_wait_s=3.0, name="server-2"
    )
    job = await create_job(one, JOB_IMAGES, pipeline="null")
    workers = [
        procs.worker(server_url=s.url, token=s.worker_token, name=f"worker-{n}", batch_size=16)
        for n, s in enumerate((one, two, one, two))
    ]
    view = await wait_finished(two, job["id"], 120)
    codes = [await w.stop() for w in workers]
    totals = await result_totals(one, job["id"])
    finals = [
        line for line in await job_logs(one, job["id"]) if line["message"].startswith("finished")
    ]
    measure(
        servers=2, workers=len(workers), accepted=totals["accepted"], duplicates=totals["duplicate"]
    )
    assert view["status"] == "SUCCESS"
    at_rest(view)
    assert view["counts"]["done"] == JOB_IMAGES
    assert totals["accepted"] == JOB_IMAGES and totals["rejected"] == 0
    assert len(finals) == 1, finals
    assert codes == [0, 0, 0, 0]
