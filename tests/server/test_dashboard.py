"""The dashboard and annotated images against the real server over real HTTP: the
page driven in a real headless chromium as a person uses it, the images checked
pixel by pixel."""

from __future__ import annotations

import copy
import io
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from PIL import Image
from playwright.async_api import Dialog, Page, Request, expect

import trapline
from tests.server.test_worker_api import create_job, job_view, post_results, reserve
from tests.support import bodies
from tests.support.browser import WatchedPage
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.polling import until
from tests.support.servers import RunningServer, start_server
from trapline.ledger.models import Project
from trapline.server import annotate
from trapline.settings import ServerSettings

GREY = (128, 128, 128)
# A box in source pixels of the 400 x 300 test image; at max_size=200 it is (50, 30)-(150, 120).
BOX = {"x1": 100.0, "y1": 60.0, "x2": 300.0, "y2": 240.0}


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
    server: RunningServer, tmp_path: Path
) -> None:
    job_id = await local_job_with_a_box(server, tmp_path / "images")
    async with server.worker_client() as w:
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
    server: RunningServer, tmp_path: Path
) -> None:
    job_id = await local_job_with_a_box(server, tmp_path / "images")
    async with server.client() as admin:
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
    server: RunningServer, tmp_path: Path
) -> None:
    job_id = await local_job_with_a_box(server, tmp_path / "images")
    async with server.client() as anon:
        del anon.headers["Authorization"]
        r = await anon.get(f"/api/v2/jobs/{job_id}/annotated/a.jpg/")
        assert r.status_code == 401 and "token" in r.json()["detail"]
    async with server.client("nonsense") as bad:
        assert (await bad.get(f"/api/v2/jobs/{job_id}/annotated/a.jpg/")).status_code == 401
    async with server.ctx.sessions() as session, session.begin():
        session.add(Project(id=2, name="other"))
    other = tmp_path / "other"
    write_jpeg(other / "c.jpg")
    async with server.client() as admin:
        r = await admin.post(
            "/api/v2/jobs/", json={"pipeline": "null", "project_id": 2, "images_dir": str(other)}
        )
        assert r.status_code == 201, r.text
        other_id = r.json()["id"]
        assert (await admin.get(f"/api/v2/jobs/{other_id}/annotated/c.jpg/")).status_code == 200
    async with server.worker_client() as w:  # a worker token of project 1
        r = await w.get(f"/api/v2/jobs/{other_id}/annotated/c.jpg/")
        assert r.status_code == 403


async def test_a_remote_image_is_fetched_and_an_unreachable_one_is_502(
    server: RunningServer, tmp_path: Path, refused_port: int
) -> None:
    local_id = await local_job_with_a_box(server, tmp_path / "images")
    # A URL job whose image is served over HTTP: the local job's signed file URL.
    signed = server.ctx.signer.url(server.url, local_id, "a.jpg")
    dead = f"http://127.0.0.1:{refused_port}/gone.jpg"
    images = [{"id": "remote", "url": signed}, {"id": "dead", "url": dead}]
    job = await create_job(server, 0, images=images)
    async with server.client() as admin:
        r = await admin.get(f"/api/v2/jobs/{job['id']}/annotated/remote/?max_size=100")
        assert r.status_code == 200, r.text
        assert decode(r.content).size == (100, 75)
        r = await admin.get(f"/api/v2/jobs/{job['id']}/annotated/dead/")
        assert r.status_code == 502
        assert "127.0.0.1" in r.json()["detail"]
        # An image host that answers with an error is a 502 too.
        bad_sig = re.sub(r"sig=[0-9a-f]+", "sig=00", signed)
        async with server.ctx.sessions() as session, session.begin():
            from sqlalchemy import update

            from trapline.ledger.models import JobImage

            await session.execute(
                update(JobImage)
                .where(JobImage.job_id == job["id"], JobImage.image_id == "remote")
                .values(url=bad_sig)
            )
        r = await admin.get(f"/api/v2/jobs/{job['id']}/annotated/remote/")
        assert r.status_code == 502 and "HTTP 403" in r.json()["detail"]


async def test_the_page_and_its_two_files_are_served_without_a_token_and_nothing_else_is(
    server: RunningServer,
) -> None:
    async with server.client() as c:
        del c.headers["Authorization"]  # the page itself needs no token
        r = await c.get("/")
        assert r.status_code == 307 and r.headers["location"] == "/dashboard/"
        r = await c.get("/dashboard/")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        # Scripts only from the server's own files: no inline script can run on it.
        assert "script-src 'self'" in r.headers["content-security-policy"]
        page = r.text
        assert "{{version}}" not in page and f"v{trapline.__version__}" in page
        assets = re.findall(r'(?:src|href)="(/dashboard/static/[^"]+)"', page)
        assert sorted(assets) == [
            "/dashboard/static/dashboard.css",
            "/dashboard/static/dashboard.js",
        ]
        for asset in assets:
            r = await c.get(asset)
            assert r.status_code == 200, asset
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


# Labels a classifier might give; none is a size class.
OTHER_LABELS = [
    "moth", "beetle", "fly", "wasp", "caddisfly", "lacewing", "mayfly", "midge",
    "Noctuidae", "Geometridae", "Erebidae", "Crambidae", "spider", "not-insect",
]  # fmt: skip


def test_a_box_colour_depends_only_on_its_label_and_tells_labels_apart() -> None:
    for size, colour in annotate.SIZE_COLOURS.items():
        assert annotate.label_colour(size) == colour
    assert annotate.label_colour(None) == annotate.label_colour("") == annotate.UNLABELLED_COLOUR
    reserved = {*annotate.SIZE_COLOURS.values(), annotate.UNLABELLED_COLOUR}
    colours = {label: annotate.label_colour(label) for label in OTHER_LABELS}
    for label, colour in colours.items():
        assert len(colour) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in colour)
        # Another label must never look like a size class or like "no label".
        assert colour not in reserved, (label, colour)
    # Different labels are told apart: 14 labels spread over most of the palette.
    assert len(set(colours.values())) >= 6, colours
    # The same label keeps its colour in every server process (thumbnails rendered by
    # two replicas, or before and after a restart, must agree): no per-process hashing.
    probe = (
        "import json; from trapline.server.annotate import label_colour; "
        f"print(json.dumps({{l: label_colour(l) for l in {OTHER_LABELS!r}}}))"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", probe],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert {k: tuple(v) for k, v in json.loads(out.stdout).items()} == colours


# ---- the dashboard in a real browser --------------------------------------------------------

HOLDER = "bench-7"
REASON = "image download failed: HTTP 404"
# a.jpg's box of BOX in a 360 x 270 thumbnail (400 x 300 scaled by 0.9): its left edge.
THUMB_SIZE = (360, 270)
THUMB_EDGE, THUMB_INSIDE = (90, 135), (180, 135)
# dashboard.js gives up on an answer after this long.
REQUEST_TIMEOUT_MS = 20_000


# The page's refresh loop catches whatever a refresh throws (a failed request, or a
# render that breaks) and shows it in #live as "not updating: <why>" instead of letting
# it reach the console; so every text #live ever shows is recorded, from the start.
RECORD_LIVE = """
document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  window.liveHistory = [];
  new MutationObserver(() => window.liveHistory.push(live.textContent)).observe(
    live, { childList: true, characterData: true, subtree: true }
  );
});
"""


@pytest.fixture
async def dashboard(web: WatchedPage) -> WatchedPage:
    """A fresh browser page that records what the dashboard's live indicator said."""
    await web.page.add_init_script(RECORD_LIVE)
    return web


async def assert_page_healthy(page: WatchedPage, expected_outage: str | None = None) -> None:
    """No script error, and no refresh ever failed (but for the outage a test caused)."""
    page.assert_no_js_errors()
    history = await page.page.evaluate("window.liveHistory")
    assert isinstance(history, list) and "live" in history, history
    failures = {text for text in history if text not in ("", "live")}
    expected = {f"not updating: {expected_outage}"} if expected_outage else set()
    assert failures == expected, f"the page stopped updating: {history}"


async def job_in_every_state(server: RunningServer, folder: Path, name: str = "night 3") -> int:
    """A local-folder job of five images: a.jpg done with one "large" box, b.jpg done
    with none, c.jpg failed with REASON, d.jpg and e.jpg leased by worker HOLDER."""
    for stem in "abcde":
        write_jpeg(folder / f"{stem}.jpg")
    async with server.client() as admin:
        r = await admin.post(
            "/api/v2/jobs/", json={"name": name, "pipeline": "null", "images_dir": str(folder)}
        )
    assert r.status_code == 201, r.text
    job_id = int(r.json()["id"])
    async with server.worker_client(name=HOLDER, worker_id="bench-7-gpu0") as w:
        tasks = {t["image_id"]: t for t in await reserve(w, job_id, 5)}
        assert sorted(tasks) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
        items = [
            result_with_box(tasks["a.jpg"]),
            bodies.success(tasks["b.jpg"], detections=0),
            bodies.failure(tasks["c.jpg"], REASON),
        ]
        answer = await post_results(w, job_id, items)
    assert [i["status"] for i in answer["tasks"]] == ["accepted"] * 3
    return job_id


async def finished_job(server: RunningServer, name: str) -> int:
    """A one-image job whose image is done: SUCCESS."""
    job = await create_job(server, 1, name=name)
    async with server.worker_client() as w:
        tasks = await reserve(w, job["id"], 1)
        await post_results(w, job["id"], [bodies.success(t) for t in tasks])
        assert (await job_view(w, job["id"]))["status"] == "SUCCESS"
    return int(job["id"])


async def sign_in(page: Page, base_url: str, token: str, fragment: str = "") -> None:
    """Open the dashboard and paste the token, as a person does the first time."""
    await page.goto(f"{base_url}/dashboard/{fragment}")
    await expect(page.locator("#login")).to_be_visible()
    await page.fill("#token", token)
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#login")).to_be_hidden()


async def pixel(page: Page, selector: str, xy: tuple[int, int]) -> tuple[int, int, int]:
    """The colour the browser decoded at xy of a loaded <img>."""
    rgb = await page.eval_on_selector(
        selector,
        """(img, [x, y]) => {
            const canvas = document.createElement("canvas");
            canvas.width = img.naturalWidth;
            canvas.height = img.naturalHeight;
            const g = canvas.getContext("2d");
            g.drawImage(img, 0, 0);
            return Array.from(g.getImageData(x, y, 1, 1).data.slice(0, 3));
        }""",
        list(xy),
    )
    r, g, b = rgb
    return int(r), int(g), int(b)


async def loaded_size(page: Page, selector: str) -> tuple[int, int]:
    """Waits until the <img> has decoded, then its natural size (0 x 0 = a broken image)."""
    await page.wait_for_function(
        "s => { const i = document.querySelector(s); return i && i.complete && i.src; }",
        arg=selector,
    )
    size = await page.eval_on_selector(selector, "i => [i.naturalWidth, i.naturalHeight]")
    return int(size[0]), int(size[1])


def js_percent(fraction: float) -> str:
    """A progress fraction as the page writes it (one decimal, none when whole)."""
    pct = round(fraction * 1000) / 10
    return f"{pct:g}%"


async def test_a_person_pastes_a_token_once_and_sees_every_job_with_its_status_and_progress(
    server: RunningServer, dashboard: WatchedPage, tmp_path: Path
) -> None:
    page = dashboard.page
    running = await job_in_every_state(server, tmp_path / "night3")
    # A name that is markup: the page must show it as text, never build elements from it.
    markup = '<img src="/x.png"><i>done</i> & more'
    finished = await finished_job(server, markup)
    async with server.client() as admin:
        views = {j: await job_view(admin, j) for j in (running, finished)}
    assert views[running]["progress"]["summary"]["progress"] == 0.6

    await page.goto(f"{server.url}/dashboard/")
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#jobs-view")).to_be_hidden()
    # A wrong token is refused by the server and said so; nothing is shown.
    await page.fill("#token", "tl_not-a-real-token")
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#login-error")).to_contain_text("refused this token (401)")
    await expect(page.locator("#jobs-view")).to_be_hidden()

    await page.fill("#token", server.admin_token)
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#jobs-view")).to_be_visible()
    rows = page.locator("#jobs-body tr")
    await expect(rows).to_have_count(2)
    await expect(page.locator("#live")).to_have_text("live")
    # Newest first, each with the server's status, counts and per-stage progress.
    await expect(rows.locator("td:first-child a")).to_have_text(
        [f"#{finished} {markup}", f"#{running} night 3"]
    )
    for job_id, row in ((finished, rows.nth(0)), (running, rows.nth(1))):
        view = views[job_id]
        await expect(row.locator(".badge")).to_have_text(view["status"])
        for state, count in view["counts"].items():
            chip = (
                row.locator(f".chip.{state} b") if state != "total" else row.locator(".chip b").last
            )
            await expect(chip).to_have_text(str(count))
        stages = view["progress"]["stages"]
        await expect(row.locator(".stage-name")).to_have_text([s["name"] for s in stages])
        percents = [js_percent(s["progress"]) for s in stages]
        await expect(row.locator(".stage-pct")).to_have_text(percents)
        widths = await row.locator(".fill").evaluate_all("fills => fills.map(f => f.style.width)")
        assert widths == percents
    assert views[running]["status"] == "STARTED" and views[finished]["status"] == "SUCCESS"
    await expect(rows.nth(1).locator(".stage-pct")).to_have_text(["100%", "60%", "60%"])
    await expect(page.locator("#jobs-body img, #jobs-body i")).to_have_count(0)

    # The token is kept for this browser session only, and asked for once: a reload
    # goes straight to the jobs.
    stored = await page.evaluate(
        "k => [sessionStorage.getItem(k), localStorage.getItem(k)]", "trapline.token"
    )
    assert stored == [server.admin_token, None]
    await page.reload()
    await expect(rows).to_have_count(2)
    await expect(page.locator("#login")).to_be_hidden()
    # "Forget token" forgets it.
    await page.click("#logout")
    await expect(page.locator("#login")).to_be_visible()
    await expect(page.locator("#jobs-view")).to_be_hidden()
    assert await page.evaluate("k => sessionStorage.getItem(k)", "trapline.token") is None
    await assert_page_healthy(dashboard)


async def test_a_job_shows_its_failed_images_with_reasons_its_leases_counting_down_and_its_log(
    server: RunningServer, dashboard: WatchedPage, tmp_path: Path
) -> None:
    page = dashboard.page
    job_id = await job_in_every_state(server, tmp_path / "night3")
    await sign_in(page, server.url, server.admin_token)
    await page.click(f"#jobs-body a[href='#/jobs/{job_id}']")
    await expect(page.locator("#job-view")).to_be_visible()
    assert page.url.endswith(f"/dashboard/#/jobs/{job_id}")
    await expect(page.locator("#job-title")).to_have_text(f"#{job_id} night 3")
    await expect(page.locator("#job-status")).to_have_text("STARTED")
    await expect(page.locator("#job-meta")).to_contain_text("pipeline null")
    await expect(page.locator("#job-meta")).to_contain_text("1 detections")
    counts = page.locator("#job-counts .chip b")
    await expect(counts).to_have_text(
        ["0", "2", "2", "1", "5"]
    )  # queued reserved done failed total

    failed = page.locator("#failed-body tr")
    await expect(failed).to_have_count(1)
    await expect(failed.locator("td")).to_have_text(["c.jpg", REASON, "1", re.compile(r" ago$")])
    await expect(page.locator("#failed-empty")).to_be_hidden()

    leases = page.locator("#leases-body tr")
    await expect(leases).to_have_count(2)
    await expect(leases.locator("td:nth-child(1)")).to_have_text(["d.jpg", "e.jpg"])
    await expect(leases.locator("td:nth-child(2)")).to_have_text([HOLDER, HOLDER])
    await expect(leases.locator("td:nth-child(3)")).to_have_text(["1", "1"])
    ends = leases.locator("td:nth-child(4)").first
    await expect(ends).to_have_text(re.compile(r"^in \d+ s$"))
    shown = int(re.sub(r"\D", "", await ends.inner_text()))
    async with server.client() as admin:
        r = await admin.get(f"/api/v2/jobs/{job_id}/images/?state=reserved")
    deadline = datetime.fromisoformat(r.json()["results"][0]["lease_deadline"])
    left_s = (deadline - datetime.now(UTC)).total_seconds()
    assert abs(shown - left_s) <= 3, (shown, left_s)
    # It counts down by itself: a later refresh shows less time left.
    await page.wait_for_function(
        """([selector, before]) => {
            const m = /^in (\\d+) s$/.exec(document.querySelector(selector)?.textContent || "");
            return m !== null && Number(m[1]) < before;
        }""",
        arg=["#leases-body tr:first-child td:nth-child(4)", shown],
    )

    log = page.locator("#job-logs li")
    await expect(log.first).to_contain_text("created with 5 images for pipeline 'null'")
    await expect(log.filter(has_text="queued 5 images")).to_have_count(1)
    await expect(log.filter(has_text=f"results from {HOLDER} (bench-7-gpu0)")).to_contain_text(
        "3 accepted, 0 duplicate, 0 rejected"
    )
    await assert_page_healthy(dashboard)


async def test_done_images_show_as_thumbnails_with_their_boxes_and_open_larger_with_details(
    server: RunningServer, dashboard: WatchedPage, tmp_path: Path
) -> None:
    page = dashboard.page
    job_id = await job_in_every_state(server, tmp_path / "night3")
    # A link straight to the job survives the sign-in.
    await sign_in(page, server.url, server.admin_token, f"#/jobs/{job_id}")
    await expect(page.locator("#job-view")).to_be_visible()
    await expect(page.locator("#thumbs-count")).to_have_text("(2 of 2)")
    await expect(page.locator("#thumbs .cap")).to_have_text(["a.jpg", "b.jpg"])
    a_img, b_img = "#thumbs button[title='a.jpg'] img", "#thumbs button[title='b.jpg'] img"
    assert await loaded_size(page, a_img) == THUMB_SIZE
    assert await loaded_size(page, b_img) == THUMB_SIZE
    # The box is drawn in the colour of its label, and only where the box is.
    large = annotate.SIZE_COLOURS["large"]
    assert distance(await pixel(page, a_img, THUMB_EDGE), large) < 60
    assert distance(await pixel(page, a_img, THUMB_INSIDE), GREY) < 12
    assert distance(await pixel(page, b_img, THUMB_EDGE), GREY) < 12
    # The legend beside them uses the colours the server draws with.
    legend = {
        "small": annotate.SIZE_COLOURS["small"],
        "medium": annotate.SIZE_COLOURS["medium"],
        "large": annotate.SIZE_COLOURS["large"],
        "none": annotate.UNLABELLED_COLOUR,
    }
    for swatch, (r, g, b) in legend.items():
        await expect(page.locator(f".legend .sw.{swatch}")).to_have_css(
            "border-top-color", f"rgb({r}, {g}, {b})"
        )

    # Opening a thumbnail shows the image larger, labelled, with its detections listed.
    await page.click("#thumbs button[title='a.jpg']")
    await expect(page.locator("#viewer")).to_be_visible()
    await expect(page.locator("#viewer-title")).to_have_text("a.jpg")
    assert await loaded_size(page, "#viewer-img") == (400, 300)  # never enlarged
    assert distance(await pixel(page, "#viewer-img", (100, 150)), large) < 60
    await expect(page.locator("#viewer-dets tr td")).to_have_text(
        ["0", "large", "0.70", "100, 60, 300, 240"]
    )
    await expect(page.locator("#viewer-meta")).to_contain_text("state done")
    await page.keyboard.press("Escape")
    await expect(page.locator("#viewer")).to_be_hidden()

    # A failed image opens from its row, with its reason and no detections.
    await page.click("#failed-body a:text-is('c.jpg')")
    await expect(page.locator("#viewer-title")).to_have_text("c.jpg")
    await expect(page.locator("#viewer-meta")).to_contain_text(f"reason: {REASON}")
    await expect(page.locator("#viewer-nodets")).to_be_visible()
    assert await loaded_size(page, "#viewer-img") == (400, 300)
    await page.click("#viewer-close")
    await expect(page.locator("#viewer")).to_be_hidden()
    await assert_page_healthy(dashboard)


class Answers:
    """Answers the page's confirm() dialogs in turn, and records what they asked."""

    def __init__(self, page: Page, *answers: bool) -> None:
        self.questions: list[str] = []
        self.posts: list[str] = []
        self._answers = list(answers)
        page.on("dialog", self._answer)
        page.on("request", self._request)

    async def _answer(self, dialog: Dialog) -> None:
        self.questions.append(dialog.message)
        if self._answers.pop(0):
            await dialog.accept()
        else:
            await dialog.dismiss()

    def _request(self, request: Request) -> None:
        if request.method == "POST":
            self.posts.append(urlsplit(request.url).path)


async def test_retry_asks_first_and_then_requeues_the_failed_images_on_the_server(
    server: RunningServer, dashboard: WatchedPage, tmp_path: Path
) -> None:
    page = dashboard.page
    job_id = await job_in_every_state(server, tmp_path / "night3")
    await sign_in(page, server.url, server.admin_token, f"#/jobs/{job_id}")
    await expect(page.locator("#failed-body tr")).to_have_count(1)
    answers = Answers(page, False, True)
    await page.click("#job-retry")  # "no"
    await page.click("#job-retry")  # "yes"
    await expect(page.locator("#toast")).to_have_text("Failed images re-queued.")
    # Only the confirmed click reached the server.
    assert answers.questions == ["Re-queue every failed image of this job?"] * 2
    assert answers.posts == [f"/api/v2/jobs/{job_id}/retry/"]
    async with server.client() as admin:
        view = await job_view(admin, job_id)
    # The failed image and the two leased ones (no outcome yet) are queued afresh.
    assert view["counts"] == {"total": 5, "queued": 3, "reserved": 0, "done": 2, "failed": 0}
    await expect(page.locator("#failed-empty")).to_be_visible()
    await expect(page.locator("#job-retry")).to_be_hidden()
    await assert_page_healthy(dashboard)


async def test_cancel_asks_first_and_then_revokes_the_job_on_the_server(
    server: RunningServer, dashboard: WatchedPage, tmp_path: Path
) -> None:
    page = dashboard.page
    job_id = await job_in_every_state(server, tmp_path / "night3")
    await sign_in(page, server.url, server.admin_token, f"#/jobs/{job_id}")
    await expect(page.locator("#job-status")).to_have_text("STARTED")
    answers = Answers(page, False, True)
    await page.click("#job-cancel")  # "no"
    await page.click("#job-cancel")  # "yes"
    await expect(page.locator("#toast")).to_have_text("Job cancelled.")
    assert len(answers.questions) == 2 and answers.questions[0].startswith("Cancel this job?")
    assert answers.posts == [f"/api/v2/jobs/{job_id}/cancel/"]
    async with server.client() as admin:
        view = await job_view(admin, job_id)
    assert view["status"] == "REVOKED"
    await expect(page.locator("#job-status")).to_have_text("REVOKED")
    await expect(page.locator("#job-cancel")).to_be_hidden()
    # The leased images failed as cancelled; results already in stay.
    await expect(page.locator("#leases-empty")).to_be_visible()
    failed = page.locator("#failed-body tr")
    await expect(failed.locator("td:nth-child(1)")).to_have_text(["c.jpg", "d.jpg", "e.jpg"])
    await expect(failed.locator("td:nth-child(2)")).to_have_text([REASON, "cancelled", "cancelled"])
    await expect(page.locator("#thumbs .cap")).to_have_text(["a.jpg", "b.jpg"])
    await assert_page_healthy(dashboard)


async def test_the_page_says_it_is_not_updating_while_the_server_is_down_and_recovers_by_itself(
    server_settings: ServerSettings, dashboard: WatchedPage
) -> None:
    page = dashboard.page
    # The browser talks to the server through a proxy that stays up; the server behind
    # it really stops, and a new one on the same database takes its place.
    proxy: FaultProxy | None = None
    try:
        async with start_server(server_settings) as first:
            before = await create_job(first, 1, name="before")
            proxy = FaultProxy(address(first)).start()
            await sign_in(page, proxy.url, first.admin_token)
            await expect(page.locator("#jobs-body tr")).to_have_count(1)
            await expect(page.locator("#live")).to_have_text("live")
        # The server is gone: the page says so, and keeps showing what it had.
        await expect(page.locator("#live")).to_have_text(
            "not updating: the server cannot be reached"
        )
        await expect(page.locator("#live")).to_have_class("live off")
        await expect(page.locator("#jobs-body a")).to_have_text([f"#{before['id']} before"])
        assert proxy.count("upstream_down") > 0
        async with start_server(server_settings) as second:
            proxy.upstream = address(second)
            after = await create_job(second, 1, name="after")
            # Back by itself, with what happened meanwhile.
            await expect(page.locator("#live")).to_have_text("live")
            await expect(page.locator("#jobs-body a")).to_have_text(
                [f"#{after['id']} after", f"#{before['id']} before"]
            )
            await expect(page.locator("#login")).to_be_hidden()
    finally:
        if proxy is not None:
            proxy.stop()
    await assert_page_healthy(dashboard, expected_outage="the server cannot be reached")


async def test_the_page_says_it_is_not_updating_when_the_server_stops_answering(
    server: RunningServer, dashboard: WatchedPage
) -> None:
    page = dashboard.page
    job = await create_job(server, 1, name="hung")
    # The page's clock is the test's to move: its request time limit (20 s) passes
    # without the test waiting for it.
    await page.clock.install()
    with FaultProxy(address(server)) as proxy:
        await sign_in(page, proxy.url, server.admin_token)
        await expect(page.locator("#jobs-body a")).to_have_text([f"#{job['id']} hung"])
        await expect(page.locator("#live")).to_have_text("live")
        with proxy.outage(fault=Fault.HANG):
            await until(lambda: proxy.count("hang") > 0, "a refresh to hang at the proxy")
            await page.clock.fast_forward(REQUEST_TIMEOUT_MS)
            await expect(page.locator("#live")).to_have_text(
                "not updating: the server did not answer within 20 s"
            )
        await expect(page.locator("#live")).to_have_text("live")
    await assert_page_healthy(dashboard, expected_outage="the server did not answer within 20 s")


def address(server: RunningServer) -> tuple[str, int]:
    url = urlsplit(server.url)
    assert url.hostname is not None and url.port is not None
    return url.hostname, url.port
