"""The dashboard page and annotated images, over real HTTP against the real server."""

from __future__ import annotations

import copy
import io
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.server.test_worker_api import create_job, post_results, reserve
from tests.support import bodies
from tests.support.servers import RunningServer
from trapline.ledger.models import Project
from trapline.queue.embedded import free_port
from trapline.server import annotate, dashboard

GREY = (128, 128, 128)
# A box in source pixels of the 400 x 300 test image; at max_size=200 it is (50, 30)-(150, 120).
BOX = {"x1": 100.0, "y1": 60.0, "x2": 300.0, "y2": 240.0}


@pytest.fixture
async def dash(server: RunningServer) -> RunningServer:
    """The server with the dashboard router (a no-op once app.py includes it itself)."""
    api = server.app.app
    if not any(getattr(r, "path", None) == "/dashboard/" for r in api.routes):
        api.include_router(dashboard.router)
    return server


def write_jpeg(path: Path, size: tuple[int, int] = (400, 300), colour: Any = GREY) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format="JPEG", quality=95)


def result_with_box(task: dict[str, Any], label: str = "large") -> dict[str, Any]:
    item = copy.deepcopy(bodies.success(task, detections=1))
    detection = item["result"]["detections"][0]
    detection["bbox"] = dict(BOX)
    detection["classifications"][0].update(
        classification=label, labels=["small", "medium", "large"], scores=[0.1, 0.2, 0.7]
    )
    return item


async def local_job_with_a_box(server: RunningServer, folder: Path) -> int:
    """A local-folder job of a.jpg (one box) and sub/b.jpg (none), both done."""
    write_jpeg(folder / "a.jpg")
    write_jpeg(folder / "sub" / "b.jpg", size=(120, 90))
    async with server.client() as admin:
        r = await admin.post(
            "/api/v2/jobs/", json={"name": "local", "pipeline": "null", "images_dir": str(folder)}
        )
    assert r.status_code == 201, r.text
    job_id = int(r.json()["id"])
    async with server.worker_client() as w:
        tasks = await reserve(w, job_id, 2)
        assert sorted(t["image_id"] for t in tasks) == ["a.jpg", "sub/b.jpg"]
        items = [
            result_with_box(t) if t["image_id"] == "a.jpg" else bodies.success(t, detections=0)
            for t in tasks
        ]
        answer = await post_results(w, job_id, items)
    assert [i["status"] for i in answer["tasks"]] == ["accepted", "accepted"]
    return job_id


def decode(content: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(content))
    assert image.format == "JPEG"
    return image.convert("RGB")


def distance(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


async def test_the_annotated_image_is_a_jpeg_of_the_requested_size_with_the_box_drawn(
    dash: RunningServer, tmp_path: Path
) -> None:
    job_id = await local_job_with_a_box(dash, tmp_path / "images")
    async with dash.worker_client() as w:
        r = await w.get(f"/api/v2/jobs/{job_id}/annotated/a.jpg/?max_size=200")
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/jpeg"
        image = decode(r.content)
        assert image.size == (200, 150)
        # On the box border (left, right, bottom edges): the "large" colour, not the grey.
        for xy in [(50, 75), (51, 75), (149, 75), (150, 75), (100, 119), (100, 120)]:
            pixel = image.getpixel(xy)
            assert isinstance(pixel, tuple)
            assert distance(pixel, GREY) > 60, (xy, pixel)
            assert distance(pixel, annotate.SIZE_COLOURS["large"]) < 60, (xy, pixel)
        # Inside and outside the box the image is untouched.
        for xy in [(100, 75), (10, 140), (190, 10)]:
            pixel = image.getpixel(xy)
            assert isinstance(pixel, tuple)
            assert distance(pixel, GREY) < 12, (xy, pixel)

        # The caption sits just above the box; without labels it is not drawn.
        above = (60, 24)
        labelled = decode(
            (await w.get(f"/api/v2/jobs/{job_id}/annotated/a.jpg?max_size=200")).content
        )
        plain = decode(
            (
                await w.get(f"/api/v2/jobs/{job_id}/annotated/a.jpg?max_size=200&labels=false")
            ).content
        )
        label_px, plain_px = labelled.getpixel(above), plain.getpixel(above)
        assert isinstance(label_px, tuple) and isinstance(plain_px, tuple)
        assert distance(label_px, GREY) > 60 and distance(plain_px, GREY) < 12

        # Default max_size 1024 never enlarges; ids with a slash work; no box, no change.
        r = await w.get(f"/api/v2/jobs/{job_id}/annotated/sub/b.jpg")
        assert r.status_code == 200, r.text
        small = decode(r.content)
        assert small.size == (120, 90)
        pixel = small.getpixel((60, 45))
        assert isinstance(pixel, tuple) and distance(pixel, GREY) < 12
        # The ledger route of the same image is unaffected by the annotated one.
        r = await w.get(f"/api/v2/jobs/{job_id}/images/sub/b.jpg/")
        assert r.status_code == 200 and r.json()["image_id"] == "sub/b.jpg"
        r = await w.get(f"/api/v2/jobs/{job_id}/annotated/sub%2Fb.jpg/?max_size=60")
        assert r.status_code == 200 and decode(r.content).size == (60, 45)


async def test_unknown_images_and_jobs_are_404_json_and_bad_sizes_422(
    dash: RunningServer, tmp_path: Path
) -> None:
    job_id = await local_job_with_a_box(dash, tmp_path / "images")
    async with dash.client() as admin:
        r = await admin.get(f"/api/v2/jobs/{job_id}/annotated/nope.jpg/")
        assert r.status_code == 404
        assert "nope.jpg" in r.json()["detail"]
        r = await admin.get("/api/v2/jobs/999999/annotated/a.jpg/")
        assert r.status_code == 404 and "999999" in r.json()["detail"]
        r = await admin.get(f"/api/v2/jobs/{job_id}/annotated/a.jpg/?max_size=0")
        assert r.status_code == 422
        # The file went away after the job was made: 404 naming it, not a crash.
        (tmp_path / "images" / "a.jpg").unlink()
        r = await admin.get(f"/api/v2/jobs/{job_id}/annotated/a.jpg/")
        assert r.status_code == 404 and "no longer" in r.json()["detail"]


async def test_annotated_images_need_a_token_of_the_jobs_project(
    dash: RunningServer, tmp_path: Path
) -> None:
    job_id = await local_job_with_a_box(dash, tmp_path / "images")
    async with dash.client() as anon:
        del anon.headers["Authorization"]
        r = await anon.get(f"/api/v2/jobs/{job_id}/annotated/a.jpg/")
        assert r.status_code == 401 and "token" in r.json()["detail"]
    async with dash.client("nonsense") as bad:
        assert (await bad.get(f"/api/v2/jobs/{job_id}/annotated/a.jpg/")).status_code == 401
    async with dash.ctx.sessions() as session, session.begin():
        session.add(Project(id=2, name="other"))
    other = tmp_path / "other"
    write_jpeg(other / "c.jpg")
    async with dash.client() as admin:
        r = await admin.post(
            "/api/v2/jobs/", json={"pipeline": "null", "project_id": 2, "images_dir": str(other)}
        )
        assert r.status_code == 201, r.text
        other_id = r.json()["id"]
        assert (await admin.get(f"/api/v2/jobs/{other_id}/annotated/c.jpg/")).status_code == 200
    async with dash.worker_client() as w:  # a worker token of project 1
        r = await w.get(f"/api/v2/jobs/{other_id}/annotated/c.jpg/")
        assert r.status_code == 403


async def test_a_remote_image_is_fetched_and_an_unreachable_one_is_502(
    dash: RunningServer, tmp_path: Path
) -> None:
    local_id = await local_job_with_a_box(dash, tmp_path / "images")
    # A URL job whose image is served over HTTP: the local job's signed file URL.
    signed = dash.ctx.signer.url(dash.url, local_id, "a.jpg")
    dead = f"http://127.0.0.1:{free_port()}/gone.jpg"
    images = [{"id": "remote", "url": signed}, {"id": "dead", "url": dead}]
    job = await create_job(dash, 0, images=images)
    async with dash.client() as admin:
        r = await admin.get(f"/api/v2/jobs/{job['id']}/annotated/remote/?max_size=100")
        assert r.status_code == 200, r.text
        assert decode(r.content).size == (100, 75)
        r = await admin.get(f"/api/v2/jobs/{job['id']}/annotated/dead/")
        assert r.status_code == 502
        assert "127.0.0.1" in r.json()["detail"]
        # An image host that answers with an error is a 502 too.
        bad_sig = re.sub(r"sig=[0-9a-f]+", "sig=00", signed)
        async with dash.ctx.sessions() as session, session.begin():
            from sqlalchemy import update

            from trapline.ledger.models import JobImage

            await session.execute(
                update(JobImage)
                .where(JobImage.job_id == job["id"], JobImage.image_id == "remote")
                .values(url=bad_sig)
            )
        r = await admin.get(f"/api/v2/jobs/{job['id']}/annotated/remote/")
        assert r.status_code == 502 and "HTTP 403" in r.json()["detail"]


async def test_the_dashboard_page_is_served_and_uses_the_job_api(dash: RunningServer) -> None:
    async with dash.client() as c:
        del c.headers["Authorization"]  # the page itself needs no token
        r = await c.get("/")
        assert r.status_code == 307 and r.headers["location"] == "/dashboard/"
        r = await c.get("/dashboard/")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"]
        page = r.text
        assert "{{version}}" not in page and '<form id="login-form"' in page
        assets = re.findall(r'(?:src|href)="(/dashboard/static/[^"]+)"', page)
        assert sorted(assets) == [
            "/dashboard/static/dashboard.css",
            "/dashboard/static/dashboard.js",
        ]
        bodies_ = {}
        for asset in assets:
            r = await c.get(asset)
            assert r.status_code == 200, asset
            bodies_[asset] = r.text
        script = bodies_["/dashboard/static/dashboard.js"]
        for used in [
            "Authorization",
            "sessionStorage",
            "/jobs/",
            "/images/",
            "state=${state}",
            '"failed"',
            '"reserved"',
            '"done"',
            "/logs/",
            "/annotated/",
            "max_size=",
            "progress.stages",
            "waiting",
            "REFRESH_MS = 2000",
            "createObjectURL",
        ]:
            assert used in script, used
        assert "innerHTML" not in script  # server values only ever reach the page as text
        r = await c.get("/dashboard/static/../app.py")
        assert r.status_code == 404
        r = await c.get("/dashboard/static/secret.py")
        assert r.status_code == 404


def test_boxes_are_coloured_by_size_class_or_label_and_clipped_to_the_image() -> None:
    source = io.BytesIO()
    Image.new("RGB", (1000, 500), GREY).save(source, format="JPEG")
    boxes = [
        annotate.Box(100, 100, 300, 300, index=0, label="small", score=0.9),
        annotate.Box(400, 100, 600, 300, index=1, label="moth", score=None),
        annotate.Box(700, 100, 1200, 300, index=2),  # runs off the right edge
    ]
    out = decode(annotate.render(source.getvalue(), boxes, max_size=500, labels=False))
    assert out.size == (500, 250)
    expected = [
        ((50, 100), annotate.SIZE_COLOURS["small"]),
        ((200, 100), annotate.label_colour("moth")),
        ((350, 100), annotate.UNLABELLED_COLOUR),
        ((498, 100), annotate.UNLABELLED_COLOUR),  # clipped right edge still drawn
    ]
    for xy, colour in expected:
        pixel = out.getpixel(xy)
        assert isinstance(pixel, tuple)
        assert distance(pixel, colour) < 60, (xy, pixel, colour)
    assert annotate.label_colour("moth") == annotate.label_colour("moth")
    assert annotate.top_classification(
        [
            {"classification": "insect", "labels": ["insect"], "scores": [0.8], "terminal": False},
            {
                "classification": "medium",
                "labels": ["small", "medium"],
                "scores": [0.3, 0.6],
                "terminal": True,
            },
        ]
    ) == ("medium", 0.6)
    with pytest.raises(annotate.SourceUnavailable):
        annotate.render(b"not an image", boxes, max_size=100)
