"""Waiting for a worker is not failure; only an explicit deadline fails what remains."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.server.test_worker_api import create_job, job_view
from tests.support.polling import until
from tests.support.servers import RunningServer, start_server
from trapline.settings import ServerSettings, WorkerSettings
from trapline.worker import run_worker

# Every time-based rule of the server, shortened so a test can wait through each of them
# many times over in seconds (the defaults are 10 s to 60 s).
WINDOW_S = 0.5
TIMES_OVER = 6
# The waiting notice must appear well before the default rule (10 s) would have said it.
NOTICE_LIMIT_S = 15 * WINDOW_S
IMAGES = 40


@pytest.fixture
async def quick_rules_server(server_settings: ServerSettings) -> AsyncIterator[RunningServer]:
    settings = server_settings.model_copy(
        update={
            "ack_wait_s": WINDOW_S,
            "waiting_after_s": WINDOW_S,
            "pending_requeue_after_s": WINDOW_S,
            "queue_check_interval_s": WINDOW_S / 2,
            "reconcile_interval_s": 0.05,
        }
    )
    async with start_server(settings) as running:
        yield running


def _waiting_since(view: dict[str, Any]) -> datetime:
    text = str(view["waiting"])
    return datetime.fromisoformat(text.rsplit(" since ", 1)[1].replace("Z", "+00:00"))


async def test_a_job_nobody_pulls_waits_saying_why_and_completes_when_a_worker_starts_later(
    quick_rules_server: RunningServer, tmp_path: Path
) -> None:
    server = quick_rules_server
    job = await create_job(server, IMAGES)
    untouched = {"total": IMAGES, "queued": IMAGES, "reserved": 0, "done": 0, "failed": 0}
    async with server.client() as admin:

        async def unharmed_view() -> dict[str, Any]:
            view = await job_view(admin, job["id"])
            assert view["status"] == "STARTED", view
            assert view["counts"] == untouched, view
            return view

        async def says_waiting() -> dict[str, Any] | None:
            view = await unharmed_view()
            return view if view["waiting"] else None

        async def waited_through_every_rule() -> dict[str, Any] | None:
            view = await unharmed_view()
            age_s = (datetime.now(UTC) - _waiting_since(view)).total_seconds()
            return view if age_s >= TIMES_OVER * WINDOW_S else None

        first = await until(says_waiting, "the view to say the job waits", NOTICE_LIMIT_S)
        waited = await until(waited_through_every_rule, f"{TIMES_OVER} rule windows of waiting", 60)
        logs = (await admin.get(f"/api/v2/jobs/{job['id']}/logs/")).json()["logs"]
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
        done = await job_view(admin, job["id"])
    # It says why, and the "since" never moved: nothing re-queued or touched the job.
    expected = f"waiting for a worker for pipeline 'null' since {job['started_at']}"
    assert first["waiting"] == expected
    assert waited["waiting"] == expected
    assert waited["progress"]["errors"] == []
    assert [line["message"] for line in logs] == [
        f"created with {IMAGES} images for pipeline 'null'",
        f"queued {IMAGES} images (queue generation 1)",
    ]
    assert report.ok
    assert done["status"] == "SUCCESS"
    assert done["counts"] == {
        "total": IMAGES,
        "queued": 0,
        "reserved": 0,
        "done": IMAGES,
        "failed": 0,
    }
    assert done["waiting"] is None


async def test_an_explicit_deadline_fails_what_remains_with_its_reason(
    server: RunningServer,
) -> None:
    job = await create_job(server, 5, deadline_seconds=1.0)
    async with server.client() as admin:

        async def finished() -> dict[str, Any] | None:
            view = await job_view(admin, job["id"])
            return None if view["status"] == "STARTED" else view

        view = await until(finished, "the deadline to fail the job", 10)
        failed = (await admin.get(f"/api/v2/jobs/{job['id']}/images/?state=failed")).json()
    assert view["status"] == "FAILURE"
    assert view["counts"] == {"total": 5, "queued": 0, "reserved": 0, "done": 0, "failed": 5}
    assert {f["reason"] for f in failed["results"]} == {"deadline passed"}
