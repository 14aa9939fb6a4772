"""Creating jobs a page at a time: a job created unstarted, its images appended in pages,
then started; and queuing (first start, retry) a page at a time. Real server, NATS and
database over HTTP."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from tests.support import bodies
from tests.support.servers import RunningServer
from trapline.ledger.models import JobEvent, JobImage
from trapline.server import lifecycle

pytestmark = pytest.mark.timeout(120)


async def create_unstarted(admin: httpx.AsyncClient, **extra: Any) -> dict[str, Any]:
    r = await admin.post(
        "/api/v2/jobs/", json={"name": "paged", "pipeline": "null", "start_now": False, **extra}
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


async def append(
    admin: httpx.AsyncClient, job_id: int, images: list[dict[str, str]], expect: int = 200
) -> dict[str, Any]:
    r = await admin.post(f"/api/v2/jobs/{job_id}/images/", json={"images": images})
    assert r.status_code == expect, r.text
    return dict(r.json())


async def view(client: httpx.AsyncClient, job_id: int) -> dict[str, Any]:
    r = await client.get(f"/api/v2/jobs/{job_id}/")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def image_ids(admin: httpx.AsyncClient, job_id: int) -> list[str]:
    r = await admin.get(f"/api/v2/jobs/{job_id}/images/", params={"limit": 10_000})
    assert r.status_code == 200, r.text
    return [row["image_id"] for row in r.json()["results"]]


async def run_to_the_end(
    server: RunningServer, job_id: int, fail_ids: frozenset[str] = frozenset()
) -> Counter[str]:
    """Do a worker's job: reserve until nothing is left, post a result for each task
    (a failure for ``fail_ids``); how many times each image was handed out."""
    handed: Counter[str] = Counter()
    async with server.worker_client() as w:
        while True:
            r = await w.post(f"/api/v2/jobs/{job_id}/tasks/", json={"batch_size": 64})
            assert r.status_code == 200, r.text
            tasks = r.json()["tasks"]
            if not tasks:
                return handed
            handed.update(t["image_id"] for t in tasks)
            items = [
                bodies.failure(t) if t["image_id"] in fail_ids else bodies.success(t) for t in tasks
            ]
            r = await w.post(f"/api/v2/jobs/{job_id}/result/", json={"results": items})
            assert r.status_code == 200, r.text
            assert {i["status"] for i in r.json()["tasks"]} == {"accepted"}


async def test_a_job_created_unstarted_takes_its_images_in_pages_and_runs_once_started(
    server: RunningServer,
) -> None:
    async with server.client() as admin, server.worker_client() as w:
        job = await create_unstarted(admin)
        assert job["status"] == "CREATED"
        assert job["counts"]["total"] == 0
        first = await append(admin, job["id"], bodies.image_list(30))
        # Images without an id are numbered by their place in the job, as in one request.
        unnamed = [{"url": f"https://images.example.org/u{i}.jpg"} for i in range(20)]
        second = await append(admin, job["id"], unnamed)
        third = await append(admin, job["id"], bodies.image_list(10, start=1000))
        assert (first["total"], second["total"], third["total"]) == (30, 50, 60)
        waiting = await view(admin, job["id"])
        assert waiting["status"] == "CREATED"
        assert waiting["counts"] == {
            "total": 60,
            "queued": 60,
            "reserved": 0,
            "done": 0,
            "failed": 0,
        }
        r = await w.post(f"/api/v2/jobs/{job['id']}/tasks/", json={"batch_size": 16})
        assert r.json()["tasks"] == [], "a job not started hands out nothing"
        r = await admin.post(f"/api/v2/jobs/{job['id']}/start/")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "STARTED"
        expected = (
            [str(i) for i in range(1, 31)]
            + [str(i) for i in range(31, 51)]
            + [str(i) for i in range(1000, 1010)]
        )
        assert await image_ids(admin, job["id"]) == expected
    handed = await run_to_the_end(server, job["id"])
    assert handed == Counter(expected), "every image handed out exactly once"
    async with server.client() as admin:
        final = await view(admin, job["id"])
    assert final["status"] == "SUCCESS"
    assert final["counts"]["done"] == 60


async def test_a_page_with_invalid_images_is_refused_whole_naming_each_one(
    server: RunningServer,
) -> None:
    async with server.client() as admin:
        job = await create_unstarted(admin)
        await append(admin, job["id"], bodies.image_list(5))
        page = [
            *bodies.image_list(3, start=100),
            {"id": "bad-1", "url": "ftp://images.example.org/1.jpg"},
            {"id": "100", "url": "https://images.example.org/again.jpg"},
            {"id": "no-url"},
        ]
        refused = await append(admin, job["id"], page, expect=422)
        assert refused["errors"] == [
            {
                "index": 3,
                "id": "bad-1",
                "reason": "malformed url 'ftp://images.example.org/1.jpg'"
                " (need http:// or https://)",
            },
            {"index": 4, "id": "100", "reason": "duplicate image id '100'"},
            {"index": 5, "id": "no-url", "reason": "missing url"},
        ]
        assert await image_ids(admin, job["id"]) == [str(i) for i in range(1, 6)]
        assert (await view(admin, job["id"]))["counts"]["total"] == 5


async def test_a_page_repeating_ids_of_an_earlier_page_is_refused_whole_naming_them(
    server: RunningServer,
) -> None:
    async with server.client() as admin:
        job = await create_unstarted(admin)
        await append(admin, job["id"], bodies.image_list(10))
        refused = await append(admin, job["id"], bodies.image_list(8, start=8), expect=422)
        assert f"already in job {job['id']}" in refused["detail"]
        assert [(e["index"], e["id"]) for e in refused["errors"]] == [(0, "8"), (1, "9"), (2, "10")]
        assert all(
            e["reason"] == f"image id {e['id']!r} is already in job {job['id']}"
            for e in refused["errors"]
        )
        # Nothing of the refused page was stored, and numbering goes on from 10.
        assert await image_ids(admin, job["id"]) == [str(i) for i in range(1, 11)]
        after = await append(admin, job["id"], [{"url": "https://images.example.org/x.jpg"}])
        assert after["total"] == 11
        assert (await image_ids(admin, job["id"]))[-1] == "11"


async def test_a_started_job_refuses_a_second_start_and_more_images_with_409(
    server: RunningServer,
) -> None:
    async with server.client() as admin:
        job = await create_unstarted(admin, images=bodies.image_list(4))
        assert job["status"] == "CREATED" and job["counts"]["total"] == 4
        assert (await admin.post(f"/api/v2/jobs/{job['id']}/start/")).status_code == 200
        again = await admin.post(f"/api/v2/jobs/{job['id']}/start/")
        assert again.status_code == 409
        assert again.json()["detail"] == f"job {job['id']} was already started (STARTED)"
        late = await append(admin, job["id"], bodies.image_list(2, start=50), expect=409)
        assert "was already started" in late["detail"]
        assert "images can only be added before it starts" in late["detail"]
        assert (await view(admin, job["id"]))["counts"]["total"] == 4


async def test_a_job_without_images_cannot_be_started_and_one_request_still_needs_some(
    server: RunningServer,
) -> None:
    async with server.client() as admin:
        job = await create_unstarted(admin)
        r = await admin.post(f"/api/v2/jobs/{job['id']}/start/")
        assert r.status_code == 409
        assert "has no images yet" in r.json()["detail"]
        assert (await view(admin, job["id"]))["status"] == "CREATED"
        r = await admin.post("/api/v2/jobs/", json={"pipeline": "null", "images": []})
        assert r.status_code == 422
        assert r.json()["detail"] == "a job needs at least one image"


async def test_a_page_larger_than_the_limit_is_refused(server: RunningServer) -> None:
    async with server.client() as admin:
        job = await create_unstarted(admin)
        too_many = bodies.image_list(lifecycle.PAGE + 1)
        refused = await append(admin, job["id"], too_many, expect=422)
        assert "images" in refused["detail"]
        assert (await view(admin, job["id"]))["counts"]["total"] == 0


async def test_a_job_is_queued_and_retried_a_page_at_a_time_and_every_message_finds_its_row(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small pages, so that 23 images cross page boundaries when queued and re-queued.
    monkeypatch.setattr(lifecycle, "PAGE", 5)
    failing = frozenset({"19", "20", "21", "22", "23"})
    async with server.client() as admin:
        job = await create_unstarted(admin)
        for start in (1, 11, 21):
            await append(admin, job["id"], bodies.image_list(min(10, 24 - start), start=start))
        assert (await admin.post(f"/api/v2/jobs/{job['id']}/start/")).status_code == 200
    first = await run_to_the_end(server, job["id"], fail_ids=failing)
    assert first == Counter(str(i) for i in range(1, 24))
    async with server.client() as admin:
        assert (await view(admin, job["id"]))["counts"]["failed"] == 5
        r = await admin.post(f"/api/v2/jobs/{job['id']}/retry/")
        assert r.status_code == 200, r.text
    async with server.ctx.reads() as session:
        rows = (
            await session.execute(
                select(JobImage.image_id, JobImage.state, JobImage.msg_seq).where(
                    JobImage.job_id == job["id"]
                )
            )
        ).all()
        history = (
            await session.scalars(
                select(JobEvent.image_id).where(
                    JobEvent.job_id == job["id"], JobEvent.message == "re-queued for retry"
                )
            )
        ).all()
    # The new stream numbers its messages from 1 again: the images re-queued hold
    # sequences 1-5, and no image left out of it holds one a new message could hit.
    queued = {r.image_id: r.msg_seq for r in rows if r.state == "queued"}
    assert queued == {"19": 1, "20": 2, "21": 3, "22": 4, "23": 5}
    assert all(r.msg_seq is None for r in rows if r.state == "done")
    assert sorted(history) == sorted(failing)
    second = await run_to_the_end(server, job["id"])
    assert second == Counter(failing)
    async with server.client() as admin:
        final = await view(admin, job["id"])
    assert final["status"] == "SUCCESS"
    assert final["counts"]["done"] == 23
