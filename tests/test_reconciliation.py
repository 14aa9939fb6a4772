"""A client that takes work and vanishes never strands it while real workers keep going."""

from __future__ import annotations

from pathlib import Path

from tests.server.test_worker_api import create_job, job_view, reserve
from tests.support.servers import RunningServer
from trapline.settings import WorkerSettings
from trapline.worker import run_worker


async def test_a_batch_reserved_by_a_client_that_never_answers_is_redelivered_and_processed(
    short_lease_server: RunningServer, tmp_path: Path
) -> None:
    server = short_lease_server
    job = await create_job(server, 100)
    async with server.worker_client(name="silent-client", worker_id="gone") as silent:
        dropped = await reserve(silent, job["id"], 16)
    assert len(dropped) == 16
    settings = WorkerSettings(
        server_url=server.url,
        token=server.worker_token,
        state_dir=tmp_path / "w",
        poll_interval_s=0.2,
    )
    delivered = 0
    async with server.client() as admin:
        # A draining worker may finish before the dropped lease lapses; it is simply
        # started again, as a supervisor would, until the job has every outcome.
        for _ in range(20):
            report = await run_worker(settings, ["null"], drain=True)
            assert report.ok
            delivered += report.delivered
            view = await job_view(admin, job["id"])
            if view["status"] != "STARTED":
                break
        history = (
            await admin.get(f"/api/v2/jobs/{job['id']}/images/{dropped[0]['image_id']}/")
        ).json()["history"]
    assert view["status"] == "SUCCESS"
    assert view["counts"] == {"total": 100, "queued": 0, "reserved": 0, "done": 100, "failed": 0}
    assert delivered == 100
    messages = [h["message"] for h in history]
    assert any("silent-client" in m and "lease expired without a result" in m for m in messages)
    assert any(m.startswith("result accepted") for m in messages)
