"""The worker API over real HTTP against a real NATS and database."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support import bodies
from tests.support.polling import until
from tests.support.servers import RunningServer, start_server
from trapline.settings import ServerSettings


async def create_job(server: RunningServer, n: int, **extra: Any) -> dict[str, Any]:
    async with server.client() as admin:
        r = await admin.post(
            "/api/v2/jobs/",
            json={"name": "t", "pipeline": "null", "images": bodies.image_list(n), **extra},
        )
    assert r.status_code == 201, r.text
    return dict(r.json())


async def reserve(client: httpx.AsyncClient, job_id: int, n: int) -> list[dict[str, Any]]:
    r = await client.post(f"/api/v2/jobs/{job_id}/tasks/", json={"batch_size": n})
    assert r.status_code == 200, r.text
    return list(r.json()["tasks"])


async def test_a_job_runs_end_to_end_and_finishes_the_moment_its_last_result_commits(
    server_settings: ServerSettings,
) -> None:
    # No sweep during the test: only the POST of the last result can finalize the job.
    settings = server_settings.model_copy(update={"reconcile_interval_s": 3600.0})
    async with start_server(settings) as server:
        job = await create_job(server, 40)
        assert job["status"] == "STARTED"
        assert job["counts"] == {"total": 40, "queued": 40, "reserved": 0, "done": 0, "failed": 0}
        async with server.worker_client() as w:
            seen: set[str] = set()
            while len(seen) < 40:
                tasks = await reserve(w, job["id"], 16)
                assert tasks, f"nothing to reserve with {40 - len(seen)} images never handed out"
                for t in tasks:
                    assert isinstance(t["id"], str) and isinstance(t["image_id"], str)
                    assert t["image_url"].startswith("https://")
                    seen.add(t["image_id"])
                r = await w.post(
                    f"/api/v2/jobs/{job['id']}/result/",
                    json={"results": [bodies.success(t) for t in tasks]},
                )
                assert r.status_code == 200
                body = r.json()
                assert body["status"] == "accepted" and body["job_id"] == job["id"]
                assert body["results_queued"] == len(tasks)
                assert [i["status"] for i in body["tasks"]] == ["accepted"] * len(tasks)
            final = (await w.get(f"/api/v2/jobs/{job['id']}/")).json()
            # Finalizing deleted the job's stream (without it, only a sweep would).
            stream_left = await server.ctx.queue.job_queue_exists(job["id"], 1)
            assert await reserve(w, job["id"], 16) == []
    assert not stream_left
    assert final["status"] == "SUCCESS"
    assert final["counts"] == {"total": 40, "queued": 0, "reserved": 0, "done": 40, "failed": 0}
    assert final["finished_at"] is not None
    assert final["detections"] == 40


async def post_results(client: httpx.AsyncClient, job_id: int, items: list[Any]) -> dict[str, Any]:
    r = await client.post(f"/api/v2/jobs/{job_id}/result/", json={"results": items})
    assert r.status_code == 200, r.text
    return dict(r.json())


async def job_view(client: httpx.AsyncClient, job_id: int) -> dict[str, Any]:
    r = await client.get(f"/api/v2/jobs/{job_id}/")
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_the_same_result_body_posted_three_times_is_counted_once(
    server: RunningServer,
) -> None:
    job = await create_job(server, 3)
    async with server.worker_client() as w:
        tasks = await reserve(w, job["id"], 2)
        items = [bodies.success(t, detections=2) for t in tasks]
        first = await post_results(w, job["id"], items)
        second = await post_results(w, job["id"], items)
        third = await post_results(w, job["id"], items)
        view = await job_view(w, job["id"])
    assert [i["status"] for i in first["tasks"]] == ["accepted", "accepted"]
    assert [i["status"] for i in second["tasks"]] == ["duplicate", "duplicate"]
    assert [i["status"] for i in third["tasks"]] == ["duplicate", "duplicate"]
    assert view["counts"]["done"] == 2
    assert view["detections"] == 4
    assert view["status"] == "STARTED"


async def test_a_receipt_of_another_job_or_an_arbitrary_subject_is_rejected_and_not_acked(
    server: RunningServer,
) -> None:
    job_a = await create_job(server, 2)
    job_b = await create_job(server, 2)
    async with server.worker_client() as w:
        tasks_b = await reserve(w, job_b["id"], 2)
        foreign = [bodies.success(tasks_b[0])]
        arbitrary = dict(bodies.success(tasks_b[1]), reply_subject="trapline.jobs.1.tasks")
        hostile = dict(bodies.success(tasks_b[1]), reply_subject="$JS.ACK.>")
        answer = await post_results(w, job_a["id"], [foreign[0], arbitrary, hostile])
        assert [i["status"] for i in answer["tasks"]] == ["rejected"] * 3
        assert all(i["reason"] for i in answer["tasks"])
        # Nothing was published to job B's receipts: its messages are still leased...
        stats = await server.ctx.queue.consumer_stats(job_b["id"], 1)
        assert stats.num_ack_pending == 2
        assert (await job_view(w, job_a["id"]))["counts"]["done"] == 0
        # ...and job B accepts them as its own.
        own = await post_results(w, job_b["id"], [bodies.success(t) for t in tasks_b])
        assert [i["status"] for i in own["tasks"]] == ["accepted", "accepted"]
        assert (await job_view(w, job_b["id"]))["status"] == "SUCCESS"


async def test_one_bad_item_is_rejected_while_the_others_of_its_post_are_applied(
    server: RunningServer,
) -> None:
    job = await create_job(server, 4)
    async with server.worker_client() as w:
        tasks = await reserve(w, job["id"], 4)
        wrong_image = bodies.success(tasks[1])
        wrong_image["result"]["source_images"] = [{"id": "999", "url": "https://x/999.jpg"}]
        wrong_image["result"]["detections"] = []
        null_error = {
            "reply_subject": tasks[2]["reply_subject"],
            "result": {"error": "boom", "image_id": None},
        }
        no_source = bodies.success(tasks[3])
        no_source["result"]["source_images"] = []
        answer = await post_results(
            w, job["id"], [bodies.success(tasks[0]), wrong_image, null_error, no_source, "junk"]
        )
        statuses = [i["status"] for i in answer["tasks"]]
        assert statuses == ["accepted", "rejected", "rejected", "rejected", "rejected"]
        reasons = [i.get("reason") for i in answer["tasks"]]
        view = await job_view(w, job["id"])
        # Only the accepted item was ACKed: the rejected ones' messages are still leased.
        stats = await server.ctx.queue.consumer_stats(job["id"], 1)
    assert reasons == [
        None,
        f"reply_subject is the receipt of image {tasks[1]['image_id']!r}, result is for '999'",
        "error result names no image_id",
        "result names no source image",
        "item must be an object",
    ]
    assert view["counts"] == {"total": 4, "queued": 0, "reserved": 3, "done": 1, "failed": 0}
    assert stats is not None and stats.num_ack_pending == 3


async def test_an_error_result_fails_the_image_with_its_reason_and_never_downgrades_a_done_one(
    server: RunningServer,
) -> None:
    job = await create_job(server, 2, failure_threshold=0.5)
    async with server.worker_client() as w:
        tasks = await reserve(w, job["id"], 2)
        await post_results(w, job["id"], [bodies.success(tasks[0])])
        late_error = await post_results(w, job["id"], [bodies.failure(tasks[0])])
        assert late_error["tasks"][0]["status"] == "duplicate"
        await post_results(
            w, job["id"], [bodies.failure(tasks[1], "image download failed: HTTP 404")]
        )
        failed = (await w.get(f"/api/v2/jobs/{job['id']}/images/?state=failed")).json()["results"]
        view = await job_view(w, job["id"])
    assert [(f["image_id"], f["reason"]) for f in failed] == [
        (tasks[1]["image_id"], "image download failed: HTTP 404")
    ]
    assert view["status"] == "SUCCESS"  # 1 of 2 failed: 0.5 is not above the threshold
    assert view["counts"]["done"] == 1 and view["counts"]["failed"] == 1


async def test_a_late_success_upgrades_a_failed_image_and_re_evaluates_a_finished_job(
    server: RunningServer,
) -> None:
    job = await create_job(server, 2, failure_threshold=0.0)
    async with server.worker_client() as w:
        tasks = await reserve(w, job["id"], 2)
        await post_results(w, job["id"], [bodies.success(tasks[0]), bodies.failure(tasks[1])])
        assert (await job_view(w, job["id"]))["status"] == "FAILURE"
        late = await post_results(w, job["id"], [bodies.success(tasks[1])])
        assert late["tasks"][0]["status"] == "accepted"
        view = await job_view(w, job["id"])
        history = (await w.get(f"/api/v2/jobs/{job['id']}/images/{tasks[1]['image_id']}/")).json()
    assert view["status"] == "SUCCESS"
    assert view["counts"] == {"total": 2, "queued": 0, "reserved": 0, "done": 2, "failed": 0}
    assert any("worker reported failure" in h["message"] for h in history["history"])
    assert any("upgraded to done" in h["message"] for h in history["history"])


async def _expire_and_redeliver(
    server: RunningServer, job_id: int, w: httpx.AsyncClient
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reserve one task, let its lease lapse, and reserve its second delivery."""
    first = (await reserve(w, job_id, 1))[0]

    async def redelivered() -> list[dict[str, Any]]:
        return await reserve(w, job_id, 1)

    again = await until(redelivered, "the lapsed task's redelivery", 15)
    return first, again[0]


async def test_extend_or_release_with_a_stale_receipt_is_refused(
    short_lease_server: RunningServer,
) -> None:
    server = short_lease_server
    job = await create_job(server, 1)
    async with server.worker_client() as w:
        stale, current = await _expire_and_redeliver(server, job["id"], w)
        assert stale["image_id"] == current["image_id"]
        assert stale["reply_subject"] != current["reply_subject"]
        ext = (
            await w.post(
                f"/api/v2/jobs/{job['id']}/tasks/extend/",
                json={"reply_subjects": [stale["reply_subject"]]},
            )
        ).json()
        rel = (
            await w.post(
                f"/api/v2/jobs/{job['id']}/tasks/release/",
                json={"reply_subjects": [stale["reply_subject"]]},
            )
        ).json()
        assert ext == {"extended": [], "unknown": [stale["reply_subject"]]}
        assert rel == {"released": [], "unknown": [stale["reply_subject"]]}
        image = (await w.get(f"/api/v2/jobs/{job['id']}/images/")).json()["results"][0]
        assert image["state"] == "reserved" and image["deliveries"] == 2
        ext = (
            await w.post(
                f"/api/v2/jobs/{job['id']}/tasks/extend/",
                json={"reply_subjects": [current["reply_subject"]]},
            )
        ).json()
        assert ext == {"extended": [current["reply_subject"]], "unknown": []}


async def test_a_result_with_a_stale_receipt_is_committed_and_the_later_one_is_a_duplicate(
    short_lease_server: RunningServer,
) -> None:
    server = short_lease_server
    job = await create_job(server, 1)
    async with server.worker_client() as w:
        stale, current = await _expire_and_redeliver(server, job["id"], w)
        first = await post_results(w, job["id"], [bodies.success(stale)])
        second = await post_results(w, job["id"], [bodies.success(current)])
        view = await job_view(w, job["id"])
    assert first["tasks"][0]["status"] == "accepted"
    assert second["tasks"][0]["status"] == "duplicate"
    assert view["status"] == "SUCCESS" and view["counts"]["done"] == 1
    assert view["detections"] == 1


async def test_release_gives_tasks_back_for_immediate_redelivery(server: RunningServer) -> None:
    job = await create_job(server, 3)
    async with server.worker_client() as w:
        tasks = await reserve(w, job["id"], 3)
        rel = (
            await w.post(
                f"/api/v2/jobs/{job['id']}/tasks/release/",
                json={"reply_subjects": [t["reply_subject"] for t in tasks]},
            )
        ).json()
        assert sorted(rel["released"]) == sorted(t["reply_subject"] for t in tasks)
        again = await reserve(w, job["id"], 3)
    assert sorted(t["image_id"] for t in again) == sorted(t["image_id"] for t in tasks)


async def test_cancel_keeps_committed_results_and_fails_the_rest_as_cancelled(
    server: RunningServer,
) -> None:
    job = await create_job(server, 5)
    async with server.worker_client() as w, server.client() as admin:
        tasks = await reserve(w, job["id"], 2)
        await post_results(w, job["id"], [bodies.success(tasks[0])])
        r = await admin.post(f"/api/v2/jobs/{job['id']}/cancel/")
        assert r.status_code == 200
        assert r.json()["status"] == "REVOKED"
        assert await reserve(w, job["id"], 5) == []
        failed = (await w.get(f"/api/v2/jobs/{job['id']}/images/?state=failed")).json()["results"]
        view = await job_view(w, job["id"])
    assert view["counts"] == {"total": 5, "queued": 0, "reserved": 0, "done": 1, "failed": 4}
    assert {f["reason"] for f in failed} == {"cancelled"}


async def test_retry_requeues_the_failed_images_and_the_job_finishes_again(
    server: RunningServer,
) -> None:
    job = await create_job(server, 3, failure_threshold=0.0)
    async with server.worker_client() as w, server.client() as admin:
        tasks = await reserve(w, job["id"], 3)
        await post_results(
            w, job["id"], [bodies.success(tasks[0])] + [bodies.failure(t) for t in tasks[1:]]
        )
        assert (await job_view(w, job["id"]))["status"] == "FAILURE"
        r = await admin.post(f"/api/v2/jobs/{job['id']}/retry/")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "STARTED"
        again = await reserve(w, job["id"], 3)
        assert sorted(t["image_id"] for t in again) == sorted(t["image_id"] for t in tasks[1:])
        await post_results(w, job["id"], [bodies.success(t) for t in again])
        view = await job_view(w, job["id"])
    assert view["status"] == "SUCCESS"
    assert view["counts"] == {"total": 3, "queued": 0, "reserved": 0, "done": 3, "failed": 0}
