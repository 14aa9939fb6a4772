"""Waiting for a worker is not failure; only an explicit deadline fails what remains."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from tests.server.test_worker_api import create_job, job_view
from tests.support.servers import RunningServer
from trapline.settings import WorkerSettings
from trapline.worker import run_worker

WAIT_S = 120.0


async def test_a_job_nobody_pulls_waits_saying_why_and_completes_when_a_worker_starts_later(
    server: RunningServer, tmp_path: Path
) -> None:
    job = await create_job(server, 40)
    started = time.monotonic()
    async with server.client() as admin:
        seen_waiting = None
        while time.monotonic() - started < WAIT_S:
            view = await job_view(admin, job["id"])
            assert view["status"] == "STARTED"
            assert view["counts"]["failed"] == 0
            seen_waiting = view["waiting"] or seen_waiting
            await asyncio.sleep(5)
        report = await run_worker(
            WorkerSettings(
                server_url=server.url,
                token=server.worker_token,
                state_dir=tmp_path / "worker",
                poll_interval_s=0.2,
            ),
            ["null"],
            drain=True,
        )
        view = await job_view(admin, job["id"])
    assert seen_waiting is not None
    assert seen_waiting.startswith("waiting for a worker for pipeline 'null' since ")
    assert report.ok
    assert view["status"] == "SUCCESS" and view["counts"]["done"] == 40
    assert view["waiting"] is None


async def test_an_explicit_deadline_fails_what_remains_with_its_reason(
    server: RunningServer,
) -> None:
    job = await create_job(server, 5, deadline_seconds=1.0)
    async with server.client() as admin:
        deadline = time.monotonic() + 10
        while (view := await job_view(admin, job["id"]))["status"] == "STARTED":
            assert time.monotonic() < deadline, "deadline never applied"
            await asyncio.sleep(0.2)
        failed = (await admin.get(f"/api/v2/jobs/{job['id']}/images/?state=failed")).json()
    assert view["status"] == "FAILURE"
    assert view["counts"] == {"total": 5, "queued": 0, "reserved": 0, "done": 0, "failed": 5}
    assert {f["reason"] for f in failed["results"]} == {"deadline passed"}
