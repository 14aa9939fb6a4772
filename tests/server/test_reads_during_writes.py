"""On SQLite, people and workers read a job while its database file is being written:
status, images, history, logs and results answer without waiting for the write lock."""

from __future__ import annotations

from pathlib import Path

from tests.server.test_worker_api import create_job
from tests.support.servers import start_server
from tests.support.sqlite_lock import write_lock_held_by_another_process
from trapline.queue import EmbeddedNats
from trapline.settings import ServerSettings


async def test_reading_a_job_never_waits_for_a_writer_of_the_same_sqlite_file(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.db"
    settings = ServerSettings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite+aiosqlite:///{ledger}",
        nats_url=nats_server.url,
        reconcile_interval_s=0.2,
    )
    async with start_server(settings) as server:
        job = await create_job(server, 5)
        base = f"/api/v2/jobs/{job['id']}"
        # A fresh client and the worker token: its lookup is a read, too.
        async with write_lock_held_by_another_process(ledger), server.worker_client() as w:
            answers = {
                path: await w.get(path)
                for path in (
                    f"{base}/",
                    f"{base}/images/",
                    f"{base}/images/1/",  # one image with its history
                    f"{base}/logs/",
                    f"{base}/results/",
                    "/api/v2/pipelines/",
                    "/healthz",
                )
            }
    assert {p: r.status_code for p, r in answers.items()} == dict.fromkeys(answers, 200)
    assert answers[f"{base}/"].json()["counts"]["queued"] == 5
    assert answers[f"{base}/images/"].json()["count"] == 5
