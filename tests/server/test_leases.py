"""Leases are the ledger's: expiry redelivers, the last expiry fails the image with its reason."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from tests.server.test_worker_api import create_job, job_view, post_results, reserve
from tests.support import bodies
from tests.support.servers import RunningServer, start_server
from trapline.ledger.models import ImageState, JobImage
from trapline.settings import ServerSettings


@pytest.fixture
async def two_deliveries_server(server_settings: ServerSettings) -> AsyncIterator[RunningServer]:
    settings = server_settings.model_copy(update={"ack_wait_s": 1.0, "max_deliver": 2})
    async with start_server(settings) as running:
        yield running


async def _wait_for(predicate: Callable[[], Awaitable[bool]], limit_s: float, what: str) -> None:
    """Poll ``predicate`` every 0.1 s until it holds; AssertionError naming ``what`` after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while not await predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {limit_s:g} s waiting for {what}")
        await asyncio.sleep(0.1)


async def test_a_batch_dropped_on_every_delivery_is_failed_with_its_reason_soon_after_the_last_lease(
    two_deliveries_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = two_deliveries_server
    job = await create_job(server, 3, failure_threshold=0.5)
    caplog.set_level(logging.WARNING)
    async with server.worker_client(name="dropper") as w:
        first = await reserve(w, job["id"], 3)
        await post_results(w, job["id"], [bodies.success(first[0])])
        dropped = {t["image_id"] for t in first[1:]}
        second: set[str] = set()

        async def redelivered() -> bool:
            # One message may come back a moment after the other: collect across reserves.
            second.update(t["image_id"] for t in await reserve(w, job["id"], 3))
            return second == dropped

        await _wait_for(redelivered, 10, "both dropped images to be redelivered")
        last_lease_end = time.monotonic() + 1.0

        async def finished() -> bool:
            return bool((await job_view(w, job["id"]))["status"] != "STARTED")

        await _wait_for(finished, 15, "the job to finish")
        failed_after_s = time.monotonic() - last_lease_end
        view = await job_view(w, job["id"])
        failed = (await w.get(f"/api/v2/jobs/{job['id']}/images/?state=failed")).json()["results"]
    assert failed_after_s < 5.0
    assert view["status"] == "FAILURE"  # 2 of 3 failed > 0.5
    assert view["counts"] == {"total": 3, "queued": 0, "reserved": 0, "done": 1, "failed": 2}
    assert {f["image_id"] for f in failed} == dropped
    for f in failed:
        assert f["reason"].startswith("max deliveries exhausted (2 of 2; last holder dropper")
    # Every failed image is named in a WARNING-or-above line.
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    for image_id in dropped:
        assert f"{image_id}" in warned
    assert "lease expired without a result" in warned


async def test_a_result_committed_but_never_acked_is_settled_when_its_message_returns(
    short_lease_server: RunningServer,
) -> None:
    """The server died between commit and ACK: the returning message is ACKed, not handed out.

    Three images, so the job is still running (and its stream still there) when the
    messages come back: one committed without ACK, one committed and ACKed, one
    untouched. Only the untouched one may be leased again.
    """
    server = short_lease_server
    job = await create_job(server, 3)
    async with server.worker_client() as w:
        tasks = await reserve(w, job["id"], 3)
        unacked, acked, untouched = (t["image_id"] for t in tasks)
        # Commit an outcome straight into the ledger, without the ACK that would follow it.
        async with server.ctx.sessions() as session, session.begin():
            await session.execute(
                update(JobImage)
                .where(JobImage.job_id == job["id"], JobImage.image_id == unacked)
                .values(state=ImageState.DONE.value, lease_deadline=None)
            )
        await post_results(w, job["id"], [bodies.success(tasks[1])])
        handed_out: dict[str, dict[str, Any]] = {}

        async def lapsed_and_settled() -> bool:
            # JetStream redelivers only to a waiting pull, so keep reserving.
            handed_out.update((t["image_id"], t) for t in await reserve(w, job["id"], 3))
            if handed_out.keys() - {untouched}:
                return True  # a settled image was handed out: fail below, not by timeout
            stats = await server.ctx.queue.consumer_stats(job["id"], 1)
            # Settled means ACKed: only the untouched image's message is still pending.
            return untouched in handed_out and stats is not None and stats.num_ack_pending == 1

        await _wait_for(lapsed_and_settled, 10, "the leases to lapse and the messages to return")
        assert sorted(handed_out) == [untouched]
        async with server.ctx.sessions() as session:
            rows = await session.execute(
                select(JobImage.image_id, JobImage.state).where(JobImage.job_id == job["id"])
            )
            states = {r.image_id: r.state for r in rows}
        # (The untouched image's new 1 s lease may already have lapsed again: either is fine.)
        assert (states[unacked], states[acked]) == ("done", "done")
        assert states[untouched] in ("reserved", "queued")
        await post_results(w, job["id"], [bodies.success(handed_out[untouched])])
        view = await job_view(w, job["id"])
        history = (await w.get(f"/api/v2/jobs/{job['id']}/images/{unacked}/")).json()["history"]
    assert view["status"] == "SUCCESS"
    assert view["counts"] == {"total": 3, "queued": 0, "reserved": 0, "done": 3, "failed": 0}
    # Leased once, never again after its outcome was committed.
    assert sum("reserved by" in h["message"] for h in history) == 1


async def test_images_of_a_local_folder_are_served_by_signed_url_without_a_token(
    server: RunningServer, tmp_path: Path
) -> None:
    folder = tmp_path / "night"
    (folder / "cam1").mkdir(parents=True)
    (folder / "cam1" / "a.jpg").write_bytes(b"\xff\xd8jpeg-a")
    (folder / "b.JPG").write_bytes(b"\xff\xd8jpeg-b")
    (folder / "notes.txt").write_text("not an image")
    async with server.client() as admin:
        r = await admin.post("/api/v2/jobs/", json={"pipeline": "null", "images_dir": str(folder)})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["counts"]["total"] == 2
        bad = await admin.post("/api/v2/jobs/", json={"pipeline": "null", "images_dir": "rel/dir"})
        assert bad.status_code == 422
    async with server.worker_client() as w:
        tasks = await reserve(w, job["id"], 2)
    assert sorted(t["image_id"] for t in tasks) == ["b.JPG", "cam1/a.jpg"]
    async with httpx.AsyncClient() as anonymous:
        for t in tasks:
            r = await anonymous.get(t["image_url"])
            assert r.status_code == 200
            assert r.content.startswith(b"\xff\xd8jpeg-")
        tampered = tasks[0]["image_url"].replace("sig=", "sig=0")
        assert (await anonymous.get(tampered)).status_code == 403


async def test_deliveries_that_never_reached_a_worker_do_not_strand_the_image(
    server: RunningServer,
) -> None:
    """A reserve whose ledger commit fails hands its messages back (NAK), which JetStream
    counts as deliveries; the budget is the ledger's, so the image is still served."""
    job = await create_job(server, 1)
    queue = server.ctx.queue
    for _ in range(server.settings.max_deliver + 1):
        taken = await queue.reserve(job["id"], 1, 1, wait_s=1.0)
        assert len(taken) == 1
        await queue.release([taken[0].reply_subject])
    async with server.worker_client() as w:
        tasks = await reserve(w, job["id"], 1)
        assert len(tasks) == 1
        await post_results(w, job["id"], [bodies.success(tasks[0])])
        view = await job_view(w, job["id"])
    assert view["status"] == "SUCCESS" and view["counts"]["done"] == 1
