"""``trapline job create --manifest`` with a manifest bigger than one page: uploaded page by
page with a progress bar, then started (real server, NATS and database in this process)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.cli.helpers import Cli, assert_one_line_error, last_line
from tests.support.servers import RunningServer

pytestmark = pytest.mark.timeout(120)


def url(i: int) -> str:
    return f"https://img.example.org/{i}.jpg"


async def get(server: RunningServer, path: str, **params: Any) -> dict[str, Any]:
    async with server.client() as admin:
        r = await admin.get(path, params=params)
    assert r.status_code == 200, r.text
    return dict(r.json())


def posts(server: RunningServer, suffix: str) -> int:
    return sum(1 for r in server.requests if r.method == "POST" and r.path.endswith(suffix))


async def test_a_manifest_bigger_than_a_page_is_uploaded_in_pages_with_progress_then_started(
    server: RunningServer, tmp_path: Path
) -> None:
    manifest = tmp_path / "night.txt"
    manifest.write_text("# night of 2026-11-27\n" + "".join(f"{url(i)}\n" for i in range(25)))
    result = await Cli(server).http(
        "job", "create", "--pipeline", "null", "--manifest", str(manifest), "--page-size", "10"
    )
    assert result.exit_code == 0, result.output
    job_id = int(last_line(result.stdout))
    assert f"job {job_id}: uploading" in result.stderr
    assert "25 images" in result.stderr
    assert (posts(server, "/images/"), posts(server, "/start/")) == (3, 1)
    view = await get(server, f"/api/v2/jobs/{job_id}/")
    assert view["status"] == "STARTED"
    assert view["counts"]["total"] == view["counts"]["queued"] == 25
    rows = (await get(server, f"/api/v2/jobs/{job_id}/images/"))["results"]
    # Numbered by their place in the manifest, exactly as one request would number them.
    assert [(r["image_id"], r["url"]) for r in rows] == [(str(i + 1), url(i)) for i in range(25)]


async def test_a_json_manifest_is_read_item_by_item_across_pages(
    server: RunningServer, tmp_path: Path
) -> None:
    manifest = tmp_path / "night.json"
    manifest.write_text(
        json.dumps([{"id": f"cam/{i}", "url": url(i)} for i in range(12)], indent=1)
    )
    result = await Cli(server).http(
        "job", "create", "--pipeline", "null", "--manifest", str(manifest), "--page-size", "5"
    )
    assert result.exit_code == 0, result.output
    job_id = int(last_line(result.stdout))
    rows = (await get(server, f"/api/v2/jobs/{job_id}/images/"))["results"]
    assert [r["image_id"] for r in rows] == [f"cam/{i}" for i in range(12)]
    assert posts(server, "/images/") == 3


async def test_a_bad_image_on_a_later_page_is_named_by_its_place_in_the_manifest(
    server: RunningServer, tmp_path: Path
) -> None:
    lines = [url(i) for i in range(25)]
    lines[22] = "htp//img.example.org/22.jpg"
    manifest = tmp_path / "night.txt"
    manifest.write_text("\n".join(lines) + "\n")
    result = await Cli(server).http(
        "job", "create", "--pipeline", "null", "--manifest", str(manifest), "--page-size", "10"
    )
    assert_one_line_error(
        result, "422", "image '23'", "malformed url", "was left unstarted with 20 images"
    )
    jobs = (await get(server, "/api/v2/jobs/"))["results"]
    assert [(j["status"], j["counts"]["total"]) for j in jobs] == [("CREATED", 20)]
    assert posts(server, "/start/") == 0


async def test_a_manifest_that_fits_one_page_is_one_request(
    server: RunningServer, tmp_path: Path
) -> None:
    manifest = tmp_path / "night.txt"
    manifest.write_text("".join(f"{url(i)}\n" for i in range(10)))
    result = await Cli(server).http(
        "job", "create", "--pipeline", "null", "--manifest", str(manifest), "--page-size", "10"
    )
    assert result.exit_code == 0, result.output
    assert (posts(server, "/jobs/"), posts(server, "/images/"), posts(server, "/start/")) == (
        1,
        0,
        0,
    )
    assert "uploading" not in result.stderr
