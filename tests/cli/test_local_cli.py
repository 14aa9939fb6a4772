"""Commands that need no running server: pipelines list, doctor, demo, server start errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.cli.helpers import Cli, assert_one_line_error, last_line
from trapline.queue import EmbeddedNats

pytestmark = pytest.mark.timeout(180)


def test_pipelines_list_shows_the_installed_pipelines() -> None:
    result = Cli().invoke("pipelines", "list")
    assert result.exit_code == 0, result.output
    assert "moth-detector-cv" in result.stdout and "null" in result.stdout
    as_json = Cli().invoke("pipelines", "list", "--json")
    slugs = [p["slug"] for p in json.loads(as_json.stdout)["pipelines"]]
    assert {"moth-detector-cv", "null"} <= set(slugs)


def test_doctor_passes_with_a_reachable_nats_and_sqlite(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    env = {
        "TRAPLINE_NATS_URL": nats_server.url,
        "TRAPLINE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}",
        "TRAPLINE_DATA_DIR": str(tmp_path),
    }
    result = Cli().invoke("doctor", env=env)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(ln.startswith("✓ database:") for ln in lines)
    assert any(ln.startswith("✓ nats:") and "JetStream enabled" in ln for ln in lines)
    assert any(ln.startswith("✓ versions:") and "trapline" in ln for ln in lines)
    assert not (tmp_path / "fresh.db").exists()  # doctor looks, it creates nothing


def test_doctor_fails_on_an_unreachable_nats_and_masks_passwords(
    tmp_path: Path, refused_port: int
) -> None:
    env = {
        "TRAPLINE_NATS_URL": f"nats://127.0.0.1:{refused_port}",
        "TRAPLINE_NATS_CONNECT_TIMEOUT_S": "1",
        "TRAPLINE_DATABASE_URL": f"postgresql+asyncpg://u:hunter2@127.0.0.1:{refused_port}/db",
    }
    result = Cli().invoke("doctor", env=env)
    assert result.exit_code == 1, result.output
    assert "✗ nats:" in result.stdout and "✗ database:" in result.stdout
    assert "hunter2" not in result.output
    assert "Traceback" not in result.output


def test_demo_runs_a_job_end_to_end_and_ends_with_its_status(tmp_path: Path) -> None:
    images = tmp_path / "night"
    images.mkdir()
    rng = np.random.default_rng(7)
    for i in range(4):
        frame = np.full((480, 640, 3), 225, np.uint8)
        for _ in range(3):
            x, y = int(rng.integers(40, 560)), int(rng.integers(40, 400))
            frame[y : y + 30, x : x + 40] = (60, 45, 30)
        Image.fromarray(frame).save(images / f"frame_{i}.jpg")
    result = Cli().invoke("demo", "--images-dir", str(images), "--workers", "2")
    assert result.exit_code == 0, result.output
    assert last_line(result.stdout) == "SUCCESS"
    assert "4 images: 0 queued · 0 reserved · 4 done · 0 failed" in result.stdout
    assert "frame_3.jpg" in result.stdout


def test_demo_refuses_a_folder_without_images(tmp_path: Path) -> None:
    assert_one_line_error(Cli().invoke("demo", "--images-dir", str(tmp_path)), "no image files")


def test_a_bad_log_level_is_one_line() -> None:
    result = Cli().invoke("server", "--log-level", "LOUD")
    assert_one_line_error(result, "--log-level must be")
