"""``trapline token|job|image`` against the real server (HTTP, NATS, database) in this process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.cli.helpers import Cli, assert_one_line_error, last_line
from tests.support import bodies
from tests.support.polling import until
from tests.support.servers import RunningServer

pytestmark = pytest.mark.timeout(120)


async def create_job(server: RunningServer, n: int, **extra: Any) -> dict[str, Any]:
    async with server.client() as admin:
        r = await admin.post(
            "/api/v2/jobs/",
            json={"name": "t", "pipeline": "null", "images": bodies.image_list(n), **extra},
        )
    assert r.status_code == 201, r.text
    return dict(r.json())


async def process(server: RunningServer, job_id: int, fail_ids: Collection[str] = ()) -> None:
    """Do a worker's job by hand: reserve everything, post results (failures for fail_ids)."""
    async with server.worker_client() as w:
        while True:
            r = await w.post(f"/api/v2/jobs/{job_id}/tasks/", json={"batch_size": 16})
            tasks = r.json()["tasks"]
            if not tasks:
                return
            items = [
                bodies.failure(t) if t["image_id"] in fail_ids else bodies.success(t, 2)
                for t in tasks
            ]
            r = await w.post(f"/api/v2/jobs/{job_id}/result/", json={"results": items})
            assert r.status_code == 200, r.text


async def get_view(server: RunningServer, job_id: int) -> dict[str, Any]:
    async with server.client() as admin:
        r = await admin.get(f"/api/v2/jobs/{job_id}/")
    assert r.status_code == 200, r.text
    return dict(r.json())


def write_jpegs(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (64, 48), (230, 230, 230)).save(folder / f"img_{i:02d}.jpg")


# ── token ──────────────────────────────────────────────────────────────────────


async def test_token_create_prints_a_usable_token_as_the_last_line(
    server: RunningServer,
) -> None:
    env = {"TRAPLINE_DATABASE_URL": server.settings.resolved_database_url()}
    admin = await Cli().run("token", "create", "--name", "ops", "--role", "admin", env=env)
    assert admin.exit_code == 0, admin.output
    key = last_line(admin.stdout)
    assert key.startswith("tl_")
    worker = await Cli().run(
        "token", "create", "--name", "gpu", "--role", "worker", "--project", "1", env=env
    )
    assert worker.exit_code == 0, worker.output
    worker_key = last_line(worker.stdout)
    async with httpx.AsyncClient(base_url=server.url) as http:
        listed = await http.get("/api/v2/jobs/", headers={"Authorization": f"Token {key}"})
        assert listed.status_code == 200
        created = await http.post(
            "/api/v2/jobs/",
            headers={"Authorization": f"Token {worker_key}"},
            json={"pipeline": "null", "images": bodies.image_list(1)},
        )
        assert created.status_code == 403  # a worker token may not create jobs


async def test_token_create_refuses_an_unknown_project_in_one_line(server: RunningServer) -> None:
    env = {"TRAPLINE_DATABASE_URL": server.settings.resolved_database_url()}
    result = await Cli().run(
        "token", "create", "--name", "x", "--role", "worker", "--project", "99", env=env
    )
    assert_one_line_error(result, "project 99 not found")


# ── job create ─────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("filename", "content", "ids"),
    [
        (
            "urls.txt",
            "# night of 2026-11-27\nhttps://img.example.org/a.jpg\n\nhttps://img.example.org/b.jpg\n",
            ["1", "2"],
        ),
        (
            "images.csv",
            "id,url\ncam1/a,https://img.example.org/a.jpg\ncam1/b,https://img.example.org/b.jpg\n",
            ["cam1/a", "cam1/b"],
        ),
        (
            "images.json",
            json.dumps(
                [
                    {"id": "x1", "url": "https://img.example.org/a.jpg"},
                    {"id": "x2", "url": "https://img.example.org/b.jpg"},
                ]
            ),
            ["x1", "x2"],
        ),
    ],
)
async def test_job_create_from_a_manifest_prints_the_job_id(
    server: RunningServer, tmp_path: Path, filename: str, content: str, ids: list[str]
) -> None:
    manifest = tmp_path / filename
    manifest.write_text(content)
    result = await Cli(server).http(
        "job", "create", "--pipeline", "null", "--manifest", str(manifest), "--name", "night"
    )
    assert result.exit_code == 0, result.output
    job_id = int(last_line(result.stdout))
    view = await get_view(server, job_id)
    assert view["name"] == "night"
    assert view["counts"]["total"] == 2
    async with server.client() as admin:
        rows = (await admin.get(f"/api/v2/jobs/{job_id}/images/")).json()["results"]
    assert [r["image_id"] for r in rows] == ids


async def test_job_create_from_an_images_dir_sends_an_absolute_path(
    server: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_jpegs(tmp_path / "night" / "cam1", 3)
    monkeypatch.chdir(tmp_path)  # a relative --images-dir is resolved by the CLI
    result = await Cli(server).http(
        "job",
        "create",
        "--pipeline",
        "null",
        "--images-dir",
        "night",
        "--failure-threshold",
        "0.2",
        "--deadline-seconds",
        "3600",
    )
    assert result.exit_code == 0, result.output
    view = await get_view(server, int(last_line(result.stdout)))
    assert view["counts"]["total"] == 3
    assert view["failure_threshold"] == 0.2
    assert view["deadline_at"] is not None


async def test_a_malformed_url_in_a_manifest_is_one_line_naming_the_image(
    server: RunningServer, tmp_path: Path
) -> None:
    manifest = tmp_path / "urls.txt"
    manifest.write_text("https://img.example.org/a.jpg\nhtp//img.example.org/b.jpg\n")
    result = await Cli(server).http(
        "job", "create", "--pipeline", "null", "--manifest", str(manifest)
    )
    assert_one_line_error(result, "422", "image '2'", "malformed url")
    async with server.client() as admin:
        assert (await admin.get("/api/v2/jobs/")).json()["count"] == 0


async def test_job_create_input_errors_are_one_line(server: RunningServer, tmp_path: Path) -> None:
    cli = Cli(server)
    both = await cli.http(
        "job", "create", "--pipeline", "null", "--manifest", "a", "--images-dir", str(tmp_path)
    )
    assert_one_line_error(both, "exactly one of --images-dir and --manifest")
    missing = await cli.http("job", "create", "--pipeline", "null", "--manifest", "nope.txt")
    assert_one_line_error(missing, "cannot read manifest nope.txt")
    bad_json = tmp_path / "m.json"
    bad_json.write_text("[{")
    invalid = await cli.http("job", "create", "--pipeline", "null", "--manifest", str(bad_json))
    assert_one_line_error(invalid, "not valid JSON")
    empty = await cli.http("job", "create", "--pipeline", "null", "--images-dir", str(tmp_path))
    assert_one_line_error(empty, "holds no image files")


async def test_http_commands_report_an_unreachable_server_and_a_bad_token(
    server: RunningServer, refused_port: int
) -> None:
    cli = Cli(server)
    nobody = f"http://127.0.0.1:{refused_port}"
    down = await cli.run("job", "status", "1", "--server", nobody, "--token", "t")
    assert_one_line_error(down, f"cannot reach server at {nobody}")
    assert down.exit_code == 2
    bad = await cli.http("job", "list", token="tl_nope")
    assert_one_line_error(bad, "401")
    no_token = await cli.run("job", "list", "--server", server.url)
    assert_one_line_error(no_token, "no token")


# ── job status / list / cancel / retry / results / logs / inspect ─────────────


async def test_job_status_json_has_the_protocol_shape(server: RunningServer) -> None:
    job = await create_job(server, 5)
    result = await Cli(server).http("job", "status", str(job["id"]), "--json")
    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    assert view["id"] == job["id"]
    assert view["status"] == "STARTED"
    assert view["counts"] == {"total": 5, "queued": 5, "reserved": 0, "done": 0, "failed": 0}
    stages = view["progress"]["stages"]
    assert [s["key"] for s in stages] == ["collect", "process", "results"]
    assert all({"key", "name", "status", "progress", "params"} <= set(s) for s in stages)
    assert {"detections", "waiting", "created_at"} <= set(view)


async def test_job_status_summary_is_readable(server: RunningServer) -> None:
    job = await create_job(server, 4)
    await process(server, job["id"], fail_ids={"2"})
    result = await Cli(server).http("job", "status", str(job["id"]))
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert f"job {job['id']}" in text and "SUCCESS" in text
    assert "4 images: 0 queued · 0 reserved · 3 done · 1 failed" in text
    assert "detections: 6" in text


async def watch_is_following(
    server: RunningServer, job_id: int, watching: asyncio.Task[Any], polls: int = 2
) -> None:
    """Wait until the watching CLI has fetched the job ``polls`` times and is still going."""
    path = f"/api/v2/jobs/{job_id}/"

    async def polled() -> bool:
        if watching.done():
            raise AssertionError(f"watch ended early: {watching.result().output}")
        seen = [r for r in server.requests if r.path == path and r.user_agent == "trapline-cli"]
        return len(seen) >= polls

    await until(polled, f"the watching CLI to fetch job {job_id} {polls} times", 30)


async def test_job_status_watch_follows_until_success_and_exits_0(server: RunningServer) -> None:
    job = await create_job(server, 20)
    watching = asyncio.create_task(
        Cli(server).http("job", "status", str(job["id"]), "--watch", "--interval", "0.2")
    )
    await watch_is_following(server, job["id"], watching)
    await process(server, job["id"])
    result = await asyncio.wait_for(watching, 30)
    assert result.exit_code == 0, result.output
    assert "SUCCESS" in result.stdout
    assert "20 done" in result.stdout


async def test_job_status_watch_exits_1_when_the_job_is_revoked(server: RunningServer) -> None:
    job = await create_job(server, 3)
    watching = asyncio.create_task(
        Cli(server).http("job", "status", str(job["id"]), "--watch", "--interval", "0.2", "--json")
    )
    await watch_is_following(server, job["id"], watching)
    async with server.client() as admin:
        assert (await admin.post(f"/api/v2/jobs/{job['id']}/cancel/")).status_code == 200
    result = await asyncio.wait_for(watching, 30)
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["status"] == "REVOKED"


async def test_job_cancel_revokes_the_job(server: RunningServer) -> None:
    job = await create_job(server, 3)
    cli = Cli(server)
    result = await cli.http("job", "cancel", str(job["id"]))
    assert result.exit_code == 0, result.output
    assert "REVOKED" in result.stdout
    assert (await get_view(server, job["id"]))["status"] == "REVOKED"
    unknown = await cli.http("job", "cancel", "999")
    assert_one_line_error(unknown, "404", "job 999 not found")


async def test_job_retry_requeues_failed_images(server: RunningServer) -> None:
    job = await create_job(server, 3, failure_threshold=1.0)
    await process(server, job["id"], fail_ids={"1", "3"})
    result = await Cli(server).http("job", "retry", str(job["id"]))
    assert result.exit_code == 0, result.output
    view = await get_view(server, job["id"])
    assert view["counts"]["queued"] == 2 and view["counts"]["failed"] == 0


async def test_list_results_logs_and_inspect(server: RunningServer, tmp_path: Path) -> None:
    job = await create_job(server, 3)
    await process(server, job["id"], fail_ids={"3"})
    cli = Cli(server)
    jid = str(job["id"])

    listed = await cli.http("job", "list", "--status", "SUCCESS", "--json")
    assert listed.exit_code == 0, listed.output
    assert [j["id"] for j in json.loads(listed.stdout)["results"]] == [job["id"]]
    table = await cli.http("job", "list")
    assert table.exit_code == 0 and "SUCCESS" in table.stdout

    out_csv = tmp_path / "out.csv"
    csv_result = await cli.http("job", "results", jid, "--csv", str(out_csv))
    assert csv_result.exit_code == 0, csv_result.output
    rows = out_csv.read_text().splitlines()
    assert rows[0].startswith("image_id,index,x1") and len(rows) == 1 + 4
    as_json = await cli.http("job", "results", jid, "--json")
    assert json.loads(as_json.stdout)["count"] == 4

    logs = await cli.http("job", "logs", jid)
    assert logs.exit_code == 0 and "finished SUCCESS" in logs.stdout

    inspected = await cli.http("job", "inspect", jid, "--json")
    assert inspected.exit_code == 0, inspected.output
    data = json.loads(inspected.stdout)
    assert [r["image_id"] for r in data["failed"]] == ["3"]
    assert data["leases"] == [] and data["redelivered"] == []
    assert data["logs"] and data["job"]["status"] == "SUCCESS"
    screen = await cli.http("job", "inspect", jid)
    assert "failed images (1)" in screen.stdout and "leases held now: none" in screen.stdout


async def test_inspect_shows_leases_held_now(server: RunningServer) -> None:
    job = await create_job(server, 2)
    async with server.worker_client(name="gpu-box-3") as w:
        r = await w.post(f"/api/v2/jobs/{job['id']}/tasks/", json={"batch_size": 1})
        assert len(r.json()["tasks"]) == 1
    result = await Cli(server).http("job", "inspect", str(job["id"]), "--json")
    data = json.loads(result.stdout)
    assert len(data["leases"]) == 1
    assert data["leases"][0]["holder"] == "gpu-box-3"
    assert data["job"]["queue"]["num_ack_pending"] == 1
    assert data["job"]["queue"]["num_pending"] == 1
    screen = await Cli(server).http("job", "inspect", str(job["id"]))
    assert "leases held now (1)" in screen.stdout


# ── image show ─────────────────────────────────────────────────────────────────


async def test_image_show_gives_the_row_history_and_detections(server: RunningServer) -> None:
    job = await create_job(server, 2)
    await process(server, job["id"], fail_ids={"2"})
    cli = Cli(server)
    done = await cli.http("image", "show", str(job["id"]), "1", "--json")
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    assert data["state"] == "done" and len(data["detections"]) == 2
    assert "history" in data
    failed = await cli.http("image", "show", str(job["id"]), "2")
    assert failed.exit_code == 0, failed.output
    assert "failed" in failed.stdout and "HTTP 404" in failed.stdout
    unknown = await cli.http("image", "show", str(job["id"]), "nope")
    assert_one_line_error(unknown, "404", "'nope' is not in job")


async def test_image_show_takes_ids_that_are_paths(server: RunningServer, tmp_path: Path) -> None:
    write_jpegs(tmp_path / "cam 1", 1)
    async with server.client() as admin:
        r = await admin.post(
            "/api/v2/jobs/", json={"pipeline": "null", "images_dir": str(tmp_path)}
        )
    job_id = r.json()["id"]
    result = await Cli(server).http("image", "show", str(job_id), "cam 1/img_00.jpg", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["image_id"] == "cam 1/img_00.jpg"
