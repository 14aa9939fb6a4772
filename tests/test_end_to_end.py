"""The whole system: the real trapline worker against the real server over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from tests.pipelines.test_onnx_pipeline import (
    BRIGHT,
    bright_box_detector,
    scene,
    write_toml,
)
from tests.server.test_worker_api import create_job, job_view
from tests.support.servers import RunningServer
from trapline.pipelines import ImageInput, ImageResult
from trapline.pipelines.null import NullPipeline
from trapline.settings import WorkerSettings
from trapline.worker import run_worker


def worker_settings(server: RunningServer, state_dir: Path, name: str) -> WorkerSettings:
    return WorkerSettings(
        server_url=server.url,
        token=server.worker_token,
        service_name=name,
        state_dir=state_dir,
        batch_size=16,
        poll_interval_s=0.2,
    )


async def test_two_trapline_workers_drain_a_job_and_it_ends_success_with_every_image_done(
    server: RunningServer, tmp_path: Path
) -> None:
    job = await create_job(server, 300)
    reports = await asyncio.gather(
        run_worker(worker_settings(server, tmp_path / "a", "a"), ["null"], drain=True),
        run_worker(worker_settings(server, tmp_path / "b", "b"), ["null"], drain=True),
    )
    async with server.client() as admin:
        view = await job_view(admin, job["id"])
    assert view["status"] == "SUCCESS"
    assert view["counts"] == {"total": 300, "queued": 0, "reserved": 0, "done": 300, "failed": 0}
    assert all(r.ok for r in reports)
    assert sum(r.delivered for r in reports) == 300


class PoisonPipeline(NullPipeline):
    """Raises on any batch holding image "13", like a decoder crash on one bad frame."""

    slug = "null"

    def process(self, images: Sequence[ImageInput]) -> list[ImageResult]:
        if any(i.id == "13" for i in images):
            raise RuntimeError("corrupt frame crashed the detector")
        return super().process(images)


async def test_a_poison_image_fails_alone_with_the_pipelines_error_and_the_job_succeeds(
    server: RunningServer, tmp_path: Path
) -> None:
    job = await create_job(server, 48)
    report = await run_worker(
        worker_settings(server, tmp_path / "w", "w"),
        ["null"],
        drain=True,
        pipeline_factory=lambda slug: PoisonPipeline(),
    )
    async with server.client() as admin:
        view = await job_view(admin, job["id"])
        failed = (await admin.get(f"/api/v2/jobs/{job['id']}/images/?state=failed")).json()
    assert view["status"] == "SUCCESS"
    assert view["counts"] == {"total": 48, "queued": 0, "reserved": 0, "done": 47, "failed": 1}
    assert [(f["image_id"], f["reason"]) for f in failed["results"]] == [
        (
            "13",
            "pipeline null failed on this image: RuntimeError: corrupt frame crashed the detector",
        )
    ]
    assert report.delivered == 47 and report.failed == 1 and report.ok


async def test_a_worker_serves_an_onnx_pipeline_file_on_a_local_folder_job(
    server: RunningServer, tmp_path: Path
) -> None:
    """`trapline worker --pipeline-file`: the TOML's pipeline is served, its boxes stored."""
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (trapline[onnx])")
    onnx_tools = pytest.importorskip("onnx", reason="onnx not installed (trapline[onnx])")
    models = tmp_path / "models"
    models.mkdir()
    bright_box_detector(onnx_tools, models / "bright.onnx", 64, 64)
    toml = write_toml(
        models,
        BRIGHT.format(w=64, h=64, resize="letterbox", layout="NCHW", order="RGB", units="pixels"),
    )
    folder = tmp_path / "night"
    folder.mkdir()
    for n in range(3):
        Image.fromarray(scene(320, 160, (60, 40, 160, 100))).save(folder / f"frame{n}.png")
    async with server.client() as admin:
        r = await admin.post(
            "/api/v2/jobs/", json={"pipeline": "test-onnx", "images_dir": str(folder)}
        )
        assert r.status_code == 201, r.text
        job = r.json()
    settings = worker_settings(server, tmp_path / "w", "onnx-box").model_copy(
        update={"pipeline_files": [toml]}
    )
    report = await run_worker(settings, [], drain=True)
    async with server.client() as admin:
        view = await job_view(admin, job["id"])
        results = (await admin.get(f"/api/v2/jobs/{job['id']}/results/")).json()["results"]
    assert report.ok and report.delivered == 3
    assert view["status"] == "SUCCESS" and view["detections"] == 3
    for det in results:
        assert det["bbox"] == pytest.approx({"x1": 60.0, "y1": 40.0, "x2": 160.0, "y2": 100.0})
        assert det["algorithm"] == "test-onnx-detector"
