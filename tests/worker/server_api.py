"""The real server's API as worker tests use it: jobs in, and its view of them out."""

from __future__ import annotations

from typing import Any

from tests.support.job_logs import totals_of_result_lines
from tests.support.servers import RunningServer


def image_list(names: list[str], url_of: Any = None) -> list[dict[str, str]]:
    """Job images with these ids; URLs from ``url_of(name)``, else ones nobody downloads."""
    return [
        {"id": n, "url": url_of(n) if url_of else f"https://images.example.org/{n}.jpg"}
        for n in names
    ]


def names(n: int, prefix: str = "img") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


async def create_job(
    server: RunningServer, pipeline: str, images: list[dict[str, str]], **extra: Any
) -> int:
    async with server.client() as admin:
        r = await admin.post(
            "/api/v2/jobs/",
            json={"name": "worker test", "pipeline": pipeline, "images": images, **extra},
        )
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


async def get(server: RunningServer, path: str) -> Any:
    async with server.client() as admin:
        r = await admin.get(path)
    assert r.status_code == 200, r.text
    return r.json()


async def job_view(server: RunningServer, job_id: int) -> dict[str, Any]:
    return dict(await get(server, f"/api/v2/jobs/{job_id}/"))


async def counts(server: RunningServer, job_id: int) -> dict[str, int]:
    """total, queued, reserved, done, failed of a job, as the server's ledger has them."""
    return dict((await job_view(server, job_id))["counts"])


async def images(server: RunningServer, job_id: int, state: str | None = None) -> dict[str, Any]:
    """Image id -> the server's view of that image (state, reason, deliveries, ...)."""
    query = f"?state={state}&limit=10000" if state else "?limit=10000"
    rows = (await get(server, f"/api/v2/jobs/{job_id}/images/{query}"))["results"]
    return {row["image_id"]: row for row in rows}


async def reasons(server: RunningServer, job_id: int) -> dict[str, str]:
    """Image id -> the reason the server recorded for each failed image."""
    return {i: row["reason"] for i, row in (await images(server, job_id, "failed")).items()}


async def history(server: RunningServer, job_id: int, image_id: str) -> list[str]:
    """The messages of one image's history in the ledger, oldest first."""
    detail = await get(server, f"/api/v2/jobs/{job_id}/images/{image_id}/")
    return [h["message"] for h in detail["history"]]


async def detections(server: RunningServer, job_id: int) -> list[dict[str, Any]]:
    return list((await get(server, f"/api/v2/jobs/{job_id}/results/?limit=100000"))["results"])


async def registered_services(server: RunningServer) -> list[dict[str, Any]]:
    return list((await get(server, "/api/v2/pipelines/"))["processing_services"])


async def result_totals(server: RunningServer, job_id: int) -> dict[str, int]:
    """Sums over the server's log line for each result POST it committed."""
    logs = await get(server, f"/api/v2/jobs/{job_id}/logs/?limit=10000")
    return totals_of_result_lines(logs["logs"])
