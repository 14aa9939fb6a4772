"""The whole system: the real trapline worker against the real server over HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.server.test_worker_api import create_job, job_view
from tests.support.servers import RunningServer
from trapline.settings import WorkerSettings
from trapline.worker import run_worker


def worker_settings(server: RunningServer, state_dir: Path, name: str) -> WorkerSettings:
    return WorkerSettings(
        server_url=server.url,
        token=server.worker_token,
        service_name=name,
        state_dir=state_dir,
        batch_size=16,
        poll_interval_s=0.2,
    )


async def test_two_trapline_workers_drain_a_job_and_it_ends_success_with_every_image_done(
    server: RunningServer, tmp_path: Path
) -> None:
    job = await create_job(server, 300)
    reports = await asyncio.gather(
        run_worker(worker_settings(server, tmp_path / "a", "a"), ["null"], drain=True),
        run_worker(worker_settings(server, tmp_path / "b", "b"), ["null"], drain=True),
    )
    async with server.client() as admin:
        view = await job_view(admin, job["id"])
    assert view["status"] == "SUCCESS"
    assert view["counts"] == {"total": 300, "queued": 0, "reserved": 0, "done": 300, "failed": 0}
    assert all(r.ok for r in reports)
    assert sum(r.delivered for r in reports) == 300
