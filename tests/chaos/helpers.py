"""Helpers for chaos scenarios: jobs over the admin API, polling, the ledger, the outbox."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from tests.support import bodies
from tests.support.job_logs import totals_of_result_lines
from tests.support.polling import until
from tests.support.processes import ServerProcess

T = TypeVar("T")

FINISHED = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
JOB_IMAGES = 500
BATCH = 16
# One result POST per batch of 16 (the last one holds the remainder).
RESULT_POSTS = -(-JOB_IMAGES // BATCH)
RESULT_PATH = r"^/api/v2/jobs/\d+/result/?$"


def ts(iso: str) -> float:
    """Wall-clock seconds of an ISO timestamp of the server (``...Z``)."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def create_job(
    server: ServerProcess, n: int = JOB_IMAGES, pipeline: str = "null", **extra: Any
) -> dict[str, Any]:
    async with server.client() as admin:
        r = await admin.post(
            "/api/v2/jobs/",
            json={
                "name": "chaos",
                "pipeline": pipeline,
                "images": bodies.image_list(n),
                **extra,
            },
        )
    assert r.status_code == 201, r.text
    return dict(r.json())


async def job_view(server: ServerProcess, job_id: int) -> dict[str, Any]:
    async with server.client() as admin:
        r = await admin.get(f"/api/v2/jobs/{job_id}/")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def wait_finished(server: ServerProcess, job_id: int, limit_s: float) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        view = await job_view(server, job_id)
        return view if view["status"] in FINISHED else None

    try:
        return await until(probe, f"job {job_id} to finish", limit_s, interval_s=0.1)
    except AssertionError:
        view = await job_view(server, job_id)
        raise AssertionError(
            f"job {job_id} not finished after {limit_s:g} s: {view['status']} {view['counts']}"
        ) from None


async def images(
    server: ServerProcess, job_id: int, state: str | None = None
) -> list[dict[str, Any]]:
    query = f"?state={state}&limit=10000" if state else "?limit=10000"
    async with server.client() as admin:
        r = await admin.get(f"/api/v2/jobs/{job_id}/images/{query}")
    assert r.status_code == 200, r.text
    return list(r.json()["results"])


async def image_detail(server: ServerProcess, job_id: int, image_id: str) -> dict[str, Any]:
    async with server.client() as admin:
        r = await admin.get(f"/api/v2/jobs/{job_id}/images/{image_id}/")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def job_logs(server: ServerProcess, job_id: int) -> list[dict[str, Any]]:
    async with server.client() as admin:
        r = await admin.get(f"/api/v2/jobs/{job_id}/logs/?limit=10000")
    assert r.status_code == 200, r.text
    return list(r.json()["logs"])


async def result_totals(server: ServerProcess, job_id: int) -> dict[str, int]:
    """Sums of the server's per-POST result lines: accepted, duplicate, rejected, posts."""
    return totals_of_result_lines(await job_logs(server, job_id))


async def detections_per_image(server: ServerProcess, job_id: int) -> dict[str, int]:
    async with server.client() as admin:
        r = await admin.get(f"/api/v2/jobs/{job_id}/results/?limit=100000")
    assert r.status_code == 200, r.text
    data = r.json()
    rows = data["results"] if isinstance(data, dict) else data
    counts: dict[str, int] = {}
    for row in rows:
        counts[str(row["image_id"])] = counts.get(str(row["image_id"]), 0) + 1
    return counts


def outbox_pending(state_dir: Path) -> list[tuple[int, list[str]]]:
    """(job id, image ids) of every pending batch in a worker's outbox files (read-only)."""
    from trapline.worker.outbox import OutboxEntry

    found: list[tuple[int, list[str]]] = []
    for path in sorted(state_dir.glob("outbox-*.sqlite3")):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute(
                "SELECT id, job_id, body, created_at, attempts, status, last_error "
                "FROM batches WHERE status = 'pending'"
            ).fetchall()
        except sqlite3.OperationalError:
            rows = []  # the worker has not created its table yet
        finally:
            conn.close()
        for row in rows:
            entry = OutboxEntry(*row)
            found.append((entry.job_id, entry.image_ids))
    return found


def at_rest(view: dict[str, Any], total: int = JOB_IMAGES) -> None:
    """Invariant 1 for a finished job: every image has exactly one outcome."""
    c = view["counts"]
    assert c["total"] == total, c
    assert c["queued"] == 0 and c["reserved"] == 0, c
    assert c["done"] + c["failed"] == total, c
