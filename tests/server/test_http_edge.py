"""Bad input gets a clear 4xx with a JSON body; nothing already accepted is touched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PG_URL
from tests.server.test_worker_api import create_job, job_view, post_results, reserve
from tests.support import bodies
from tests.support.databases import fresh_database
from tests.support.servers import RunningServer, start_server
from trapline.settings import ServerSettings


async def test_requests_without_a_known_token_are_401_and_wrong_role_or_project_403(
    server: RunningServer,
) -> None:
    job = await create_job(server, 1)
    async with server.client("nonsense") as bad, server.worker_client() as w:
        r = await bad.get(f"/api/v2/jobs/{job['id']}/")
        assert r.status_code == 401 and r.json()["detail"] == "unknown token"
        async with server.client() as anon:
            del anon.headers["Authorization"]
            r = await anon.post(f"/api/v2/jobs/{job['id']}/tasks/", json={"batch_size": 1})
            assert r.status_code == 401 and "token" in r.json()["detail"]
        r = await w.post("/api/v2/jobs/", json={"pipeline": "null", "images": bodies.image_list(1)})
        assert r.status_code == 403 and "admin" in r.json()["detail"]
        r = await w.post(f"/api/v2/jobs/{job['id']}/cancel/")
        assert r.status_code == 403
    # A worker token of project 1 cannot see a job of project 2.
    ctx = server.ctx
    from trapline.ledger.models import Project

    async with ctx.sessions() as session, session.begin():
        session.add(Project(id=2, name="other"))
    async with server.client() as admin:
        r = await admin.post(
            "/api/v2/jobs/",
            json={"pipeline": "null", "project_id": 2, "images": bodies.image_list(1)},
        )
        assert r.status_code == 201
        other = r.json()["id"]
    async with server.worker_client() as w:
        r = await w.post(f"/api/v2/jobs/{other}/tasks/", json={"batch_size": 1})
        assert r.status_code == 403
        listed = (await w.get("/api/v2/jobs?ids_only=1")).json()
        assert other not in [j["id"] for j in listed["results"]]
        r = await w.post("/api/v2/jobs/999999/tasks/", json={"batch_size": 1})
        assert r.status_code == 404 and "999999" in r.json()["detail"]


async def test_a_job_with_a_malformed_or_missing_url_is_refused_naming_every_bad_image(
    server: RunningServer,
) -> None:
    images = [
        {"id": "a", "url": "https://ok.example.org/a.jpg"},
        {"id": "b", "url": "ftp://example.org/b.jpg"},
        {"id": "c"},
        {"id": "a", "url": "https://ok.example.org/a2.jpg"},
    ]
    async with server.client() as admin:
        r = await admin.post("/api/v2/jobs/", json={"pipeline": "null", "images": images})
        assert r.status_code == 422
        body = r.json()
        assert [e["id"] for e in body["errors"]] == ["b", "c", "a"]
        assert "3 image(s) refused" in body["detail"]
        listed = (await admin.get("/api/v2/jobs/")).json()
    assert listed["count"] == 0


async def test_malformed_json_is_400_and_schema_violations_422_with_the_field(
    server: RunningServer,
) -> None:
    job = await create_job(server, 1)
    async with server.worker_client() as w:
        r = await w.post(
            f"/api/v2/jobs/{job['id']}/result/",
            content=b'{"results": [',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and "malformed JSON" in r.json()["detail"]
        r = await w.post(f"/api/v2/jobs/{job['id']}/tasks/", json={"batch_size": 0})
        assert r.status_code == 422
        assert r.json()["errors"][0]["loc"][-1] == "batch_size"
        r = await w.post(f"/api/v2/jobs/{job['id']}/result/", json={"results": "nope"})
        assert r.status_code == 422
        tasks = await reserve(w, job["id"], 1)
        assert len(tasks) == 1  # nothing above disturbed the job


async def test_an_oversized_body_is_413_and_the_job_is_untouched(
    server_settings: Any, database_url: str
) -> None:
    settings = server_settings.model_copy(update={"max_body_bytes": 10_000})
    async with start_server(settings) as server:
        job = await create_job(server, 2)
        async with server.worker_client() as w:
            tasks = await reserve(w, job["id"], 2)
            big = bodies.success(tasks[0], detections=200)
            r = await w.post(f"/api/v2/jobs/{job['id']}/result/", json={"results": [big]})
            assert r.status_code == 413 and "limit" in r.json()["detail"]
            view = await job_view(w, job["id"])
            assert view["counts"]["reserved"] == 2 and view["counts"]["done"] == 0


async def test_worker_paths_work_with_and_without_the_trailing_slash(server: RunningServer) -> None:
    job = await create_job(server, 2)
    async with server.worker_client() as w:
        listed = await w.get(
            "/api/v2/jobs?pipeline__slug__in=null,other&ids_only=1&incomplete_only=1"
        )
        assert listed.status_code == 200
        assert listed.json() == {
            "count": 1,
            "next": None,
            "previous": None,
            "results": [{"id": job["id"], "pipeline_slug": "null"}],
        }
        none = (await w.get("/api/v2/jobs?pipeline__slug__in=moth-detector-cv&ids_only=1")).json()
        assert none["results"] == []
        r = await w.post(f"/api/v2/jobs/{job['id']}/tasks", json={"batch_size": 1})
        assert r.status_code == 200 and len(r.json()["tasks"]) == 1
        task = r.json()["tasks"][0]
        assert set(task) == {"id", "image_id", "image_url", "reply_subject"}
        assert task["id"] == f"{job['id']}:{task['image_id']}"
        r = await w.post(
            f"/api/v2/jobs/{job['id']}/result", json={"results": [bodies.success(task)]}
        )
        assert r.status_code == 200
        body = r.json()
        assert isinstance(body["job_id"], int) and isinstance(body["results_queued"], int)
        assert body["tasks"] == [
            {"reply_subject": task["reply_subject"], "status": "accepted", "task_id": task["id"]}
        ]


async def test_capabilities_and_pipeline_registration(server: RunningServer) -> None:
    async with server.worker_client() as w:
        caps = (await w.get("/api/v2/capabilities/")).json()
        assert caps["lease_extension"] is True and caps["release"] is True
        assert caps["ack_wait_seconds"] == 30 and caps["max_deliver"] == 3
        reg = {
            "processing_service_name": "gpu-box-3",
            "pipelines": [{"name": "Null", "slug": "null", "version": 1, "algorithms": []}],
        }
        first = (await w.post("/api/v2/projects/1/pipelines/", json=reg)).json()
        second = (await w.post("/api/v2/projects/1/pipelines", json=reg)).json()
        assert first["pipelines_created"] == ["null"] and first["pipelines_updated"] == []
        assert second["pipelines_created"] == [] and second["pipelines_updated"] == ["null"]
        assert first["processing_service_id"] == second["processing_service_id"]
        listed = (await w.get("/api/v2/pipelines/")).json()
        assert [s["name"] for s in listed["processing_services"]] == ["gpu-box-3"]


async def test_health_reports_nats_and_database(server: RunningServer) -> None:
    async with server.client() as c:
        r = await c.get("/healthz")
        metrics = await c.get("/metrics")
        docs = await c.get("/openapi.json")
    assert r.status_code == 200 and r.json()["nats"] is True and r.json()["database"] is True
    assert metrics.status_code == 200
    assert "/api/v2/jobs/{job_id}/result/" in docs.json()["paths"]


def trapline_counters(exposition: str) -> dict[str, float]:
    """Every ``trapline_*_total`` series of a /metrics page, keyed as Prometheus prints it."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        if family.type != "counter" or not family.name.startswith("trapline_"):
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue  # the ``_created`` timestamps
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


async def scrape(server: RunningServer) -> dict[str, float]:
    async with server.client() as c:
        r = await c.get("/metrics")
    assert r.status_code == 200, r.text
    return trapline_counters(r.text)


# What a server that has done nothing yet exports: unlabelled counters at zero, no series
# of the labelled ones.
UNTOUCHED = {
    "trapline_reserves_total": 0.0,
    "trapline_tasks_reserved_total": 0.0,
    "trapline_lease_expiries_total": 0.0,
}


async def test_queue_stats_and_metrics_follow_the_work(server: RunningServer) -> None:
    assert await scrape(server) == UNTOUCHED
    job = await create_job(server, 3)
    async with server.worker_client() as w:
        tasks = await reserve(w, job["id"], 2)
        q = (await w.get(f"/api/v2/jobs/{job['id']}/queue/")).json()
        assert q["consumer"]["num_ack_pending"] == 2 and q["consumer"]["num_pending"] == 1
        await post_results(w, job["id"], [bodies.success(t) for t in tasks])
        # The same result again, and one naming a receipt the server never issued.
        forged = {**tasks[0], "reply_subject": "$JS.ACK.nobody.nothing.1.1.1.1.0"}
        await post_results(w, job["id"], [bodies.success(tasks[0]), bodies.success(forged)])
        assert await scrape(server) == {
            **UNTOUCHED,
            "trapline_reserves_total": 1.0,
            "trapline_tasks_reserved_total": 2.0,
            'trapline_results_total{status="accepted"}': 2.0,
            'trapline_results_total{status="duplicate"}': 1.0,
            'trapline_results_total{status="rejected"}': 1.0,
        }
        last = await reserve(w, job["id"], 5)
        assert len(last) == 1
        await post_results(w, job["id"], [bodies.failure(last[0])])
        # The job is finished: this reserve hands out nothing and is not counted.
        assert await reserve(w, job["id"], 5) == []
        assert (await job_view(w, job["id"]))["status"] == "SUCCESS"  # 1 of 3 failed
    assert await scrape(server) == {
        **UNTOUCHED,
        "trapline_reserves_total": 2.0,
        "trapline_tasks_reserved_total": 3.0,
        'trapline_results_total{status="accepted"}': 3.0,
        'trapline_results_total{status="duplicate"}': 1.0,
        'trapline_results_total{status="rejected"}': 1.0,
        'trapline_images_failed_total{reason="worker error"}': 1.0,
        'trapline_finalizations_total{status="SUCCESS"}': 1.0,
    }


async def test_two_apps_in_one_process_share_neither_metrics_nor_known_tokens(
    server: RunningServer, server_settings: ServerSettings, tmp_path: Path
) -> None:
    kind = server_settings.resolved_database_url().split(":")[0].split("+")[0]
    other_db = tmp_path / "other"
    other_db.mkdir()
    async with fresh_database(
        "sqlite" if kind == "sqlite" else "postgres", other_db, PG_URL
    ) as other_url:
        settings = server_settings.model_copy(
            update={"database_url": other_url, "data_dir": tmp_path / "other-data"}
        )
        async with start_server(settings) as other:
            # Each app's tokens live in its own database; using one on its app first puts
            # it in that app's cache, where the other app must not find it.
            async with server.client() as here:
                assert (await here.get("/api/v2/jobs/")).status_code == 200
            async with other.client(server.admin_token) as there:
                r = await there.get("/api/v2/jobs/")
            assert r.status_code == 401 and r.json()["detail"] == "unknown token"

            job = await create_job(server, 2)
            async with server.worker_client() as w:
                tasks = await reserve(w, job["id"], 2)
                await post_results(w, job["id"], [bodies.success(t) for t in tasks])
            done_here = {
                **UNTOUCHED,
                "trapline_reserves_total": 1.0,
                "trapline_tasks_reserved_total": 2.0,
                'trapline_results_total{status="accepted"}': 2.0,
                'trapline_finalizations_total{status="SUCCESS"}': 1.0,
            }
            assert await scrape(server) == done_here
            assert await scrape(other) == UNTOUCHED

            job = await create_job(other, 1)
            async with other.worker_client() as w:
                tasks = await reserve(w, job["id"], 1)
                await post_results(w, job["id"], [bodies.failure(tasks[0])])
            assert await scrape(other) == {
                **UNTOUCHED,
                "trapline_reserves_total": 1.0,
                "trapline_tasks_reserved_total": 1.0,
                'trapline_results_total{status="accepted"}': 1.0,
                'trapline_images_failed_total{reason="worker error"}': 1.0,
                'trapline_finalizations_total{status="FAILURE"}': 1.0,
            }
            assert await scrape(server) == done_here
