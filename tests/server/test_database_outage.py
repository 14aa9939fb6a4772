"""The database unavailable for a while: requests get 503, the worker retries, nothing is lost."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from tests.server.test_worker_api import create_job, job_view
from tests.support.databases import admin_dsn
from tests.support.servers import RunningServer
from trapline.settings import WorkerSettings
from trapline.worker import run_worker

OUTAGE_S = 8.0


async def _set_connections(database_url: str, allowed: bool) -> None:
    name = database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(admin_dsn(database_url))
    try:
        await admin.execute(
            f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {"true" if allowed else "false"}'
        )
        if not allowed:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
    finally:
        await admin.close()


# The outage is made by refusing connections to a PostgreSQL database, which SQLite has
# no equivalent of: the test runs on PostgreSQL only (skipped, with the conftest's reason,
# when TRAPLINE_TEST_DATABASE_URL is unset).
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_database_unavailable_mid_job_then_back_the_job_completes_with_nothing_lost(
    server: RunningServer, database_url: str, tmp_path: Path
) -> None:
    job = await create_job(server, 300)
    stop = asyncio.Event()
    worker = asyncio.create_task(
        run_worker(
            WorkerSettings(
                server_url=server.url,
                token=server.worker_token,
                state_dir=tmp_path / "w",
                poll_interval_s=0.2,
                batch_size=8,
                delivery_backoff_cap_s=1.0,
            ),
            ["null"],
            stop=stop,
        )
    )
    async with server.client() as admin:
        for _ in range(600):
            if (await job_view(admin, job["id"]))["counts"]["done"] >= 40:
                break
            await asyncio.sleep(0.1)
        await _set_connections(database_url, allowed=False)
        try:
            during = await admin.get(f"/api/v2/jobs/{job['id']}/")
            assert during.status_code == 503
            assert during.json()["detail"] == "database temporarily unavailable"
            await asyncio.sleep(OUTAGE_S)
        finally:
            await _set_connections(database_url, allowed=True)
        back = time.monotonic()
        while (view := await job_view(admin, job["id"]))["status"] == "STARTED":
            assert time.monotonic() - back < 60, view["counts"]
            await asyncio.sleep(0.2)
    stop.set()
    report = await worker
    assert view["status"] == "SUCCESS"
    assert view["counts"] == {"total": 300, "queued": 0, "reserved": 0, "done": 300, "failed": 0}
    assert report.ok
