"""Recovery: a NATS store lost mid-job, and several server replicas on one database."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from tests.server.test_worker_api import create_job, job_view, post_results, reserve
from tests.support import bodies
from tests.support.polling import until
from tests.support.servers import start_server
from trapline.ledger.models import JobEvent
from trapline.queue import EmbeddedNats
from trapline.settings import ServerSettings


async def test_nats_store_wiped_mid_job_is_requeued_from_the_ledger_and_completes(
    server_settings: ServerSettings, tmp_path: Path
) -> None:
    nats = EmbeddedNats(tmp_path / "own-nats")
    nats.start()
    try:
        settings = server_settings.model_copy(update={"nats_url": nats.url})
        async with start_server(settings) as server:
            job = await create_job(server, 30)
            async with server.worker_client() as w:
                first = await reserve(w, job["id"], 10)
                await post_results(w, job["id"], [bodies.success(t) for t in first])
                held = await reserve(w, job["id"], 5)  # leased when the store is lost
                nats.kill()
                shutil.rmtree(nats.store_dir)
                nats.start()
                done_ids = {t["image_id"] for t in first}

                async def work_until_finished() -> dict[str, Any] | None:
                    r = await w.post(f"/api/v2/jobs/{job['id']}/tasks/", json={"batch_size": 16})
                    # 503 while the server reconnects to NATS is the documented answer.
                    assert r.status_code in (200, 503), r.text
                    tasks = r.json()["tasks"] if r.status_code == 200 else []
                    if tasks:
                        await post_results(w, job["id"], [bodies.success(t) for t in tasks])
                        done_ids.update(t["image_id"] for t in tasks)
                    view = await job_view(w, job["id"])
                    return None if view["status"] == "STARTED" else view

                await until(
                    work_until_finished, "the job to finish after its store was wiped", 30, 0.2
                )
                # The results of the tasks held across the loss are still valid outcomes.
                late = await post_results(w, job["id"], [bodies.success(t) for t in held])
                view = await job_view(w, job["id"])
                logs = (await w.get(f"/api/v2/jobs/{job['id']}/logs/")).json()["logs"]
    finally:
        nats.stop()
    assert view["status"] == "SUCCESS"
    assert view["counts"] == {"total": 30, "queued": 0, "reserved": 0, "done": 30, "failed": 0}
    assert view["detections"] == 30
    assert {i["status"] for i in late["tasks"]} <= {"accepted", "duplicate"}
    assert any("queue generation 2" in line["message"] for line in logs)


async def test_two_servers_on_one_database_never_count_an_image_or_finalize_a_job_twice(
    server_settings: ServerSettings,
) -> None:
    settings = server_settings.model_copy(update={"reconcile_interval_s": 0.05})
    async with start_server(settings) as one, start_server(settings) as two:
        job = await create_job(one, 200)
        async with one.worker_client(worker_id="a") as wa, two.worker_client(worker_id="b") as wb:

            async def work(client: object, other: object) -> None:
                while True:
                    tasks = await reserve(client, job["id"], 16)  # type: ignore[arg-type]
                    if not tasks:
                        return
                    items = [bodies.success(t) for t in tasks]
                    # Every batch is posted to both replicas at once: one wins, one is a duplicate.
                    await asyncio.gather(
                        post_results(client, job["id"], items),  # type: ignore[arg-type]
                        post_results(other, job["id"], items),  # type: ignore[arg-type]
                    )

            await asyncio.gather(work(wa, wb), work(wb, wa))
            view = await job_view(wa, job["id"])
        async with one.ctx.sessions() as session:
            finals = await session.scalar(
                select(func.count())
                .select_from(JobEvent)
                .where(JobEvent.job_id == job["id"], JobEvent.message.like("finished %"))
            )
    assert view["status"] == "SUCCESS"
    assert view["counts"]["done"] == 200 and view["detections"] == 200
    assert finals == 1
