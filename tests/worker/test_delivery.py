"""Result delivery against a real local HTTP server: retries, backoff, 413 splits, deadlines."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.support.polling import until
from tests.worker.local_server import LocalServer, Reply, Request
from trapline.worker.client import WorkerClient
from trapline.worker.delivery import Deliverer
from trapline.worker.outbox import Outbox
from trapline.worker.results import error_item


def accept_all(req: Request) -> Reply:
    items = req.json()["results"]
    return Reply(
        200,
        {
            "status": "accepted",
            "job_id": 1,
            "results_queued": len(items),
            "tasks": [{"reply_subject": i["reply_subject"], "status": "accepted"} for i in items],
        },
    )


class Script:
    """Answers result POSTs from a queue of replies, then with ``then``."""

    def __init__(self, *replies: Reply, then: Callable[[Request], Reply] = accept_all) -> None:
        self.replies = deque(replies)
        self.then = then

    def __call__(self, req: Request) -> Reply:
        return self.replies.popleft() if self.replies else self.then(req)


class Rig:
    def __init__(self, server: LocalServer, outbox: Outbox, client: WorkerClient) -> None:
        self.server = server
        self.outbox = outbox
        self.client = client

    def deliverer(self, deadline_s: float = 10.0, cap_s: float = 0.02) -> Deliverer:
        return Deliverer(self.client, self.outbox, deadline_s=deadline_s, backoff_cap_s=cap_s)

    @property
    def posts(self) -> list[Request]:
        return self.server.requests_to("POST", "/api/v2/jobs/1/result/")


@pytest.fixture
async def rig(tmp_path: Path, local_server: list[LocalServer]) -> AsyncIterator[Rig]:
    server = LocalServer(Script()).start()
    local_server.append(server)
    outbox = Outbox.open(tmp_path)
    client = WorkerClient(server.url, "secret", worker_name="w@h", worker_id="abc", timeout_s=2)
    yield Rig(server, outbox, client)
    await client.aclose()
    outbox.close()


def items(*image_ids: str) -> list[dict[str, object]]:
    return [error_item(f"S{i}", i, "image download failed: HTTP 404") for i in image_ids]


def big_item(image_id: str) -> dict[str, object]:
    return {
        "reply_subject": f"S{image_id}",
        "result": {"pipeline": "p", "detections": [], "padding": [0.5] * 1000},
    }


async def test_transient_failures_are_retried_with_the_same_body(rig: Rig) -> None:
    rig.server.handler = Script(Reply(503), Reply(drop=True), Reply(502), Reply(408))
    entry = await rig.outbox.add(1, items("a", "b"))
    result = await rig.deliverer().deliver(entry)
    assert result.failed == {"Sa": "a", "Sb": "b"} and not result.kept
    assert len(rig.posts) == 5
    assert len({p.body for p in rig.posts}) == 1
    assert await rig.outbox.entries() == []
    post = rig.posts[0]
    assert post.headers["authorization"] == "Token secret"
    assert (post.headers["x-worker-name"], post.headers["x-worker-id"]) == ("w@h", "abc")


async def test_retry_after_is_honoured(rig: Rig) -> None:
    rig.server.handler = Script(Reply(429, {"detail": "slow down"}, {"Retry-After": "1"}))
    entry = await rig.outbox.add(1, items("a"))
    await rig.deliverer(cap_s=0.01).deliver(entry)
    first, second = rig.posts
    assert second.at - first.at >= 0.95


async def test_delivery_resumes_soon_after_the_server_returns(rig: Rig) -> None:
    back_at = time.monotonic() + 1.0

    def down_for_a_while(req: Request) -> Reply:
        return Reply(503) if time.monotonic() < back_at else accept_all(req)

    rig.server.handler = down_for_a_while
    entry = await rig.outbox.add(1, items("a"))
    await rig.deliverer(cap_s=0.3).deliver(entry)
    assert time.monotonic() - back_at < 0.3 + 0.5
    assert len(rig.posts) >= 3


async def test_413_splits_the_batch_until_it_fits(rig: Rig) -> None:
    def small_only(req: Request) -> Reply:
        return (
            Reply(413, {"detail": "too large"})
            if len(req.json()["results"]) > 1
            else accept_all(req)
        )

    rig.server.handler = small_only
    entry = await rig.outbox.add(1, items("a", "b", "c", "d"))
    result = await rig.deliverer().deliver(entry)
    assert sorted(result.failed.values()) == ["a", "b", "c", "d"]
    # 4 → 2 + 2 → 1 + 1 + 1 + 1
    assert [len(p.json()["results"]) for p in rig.posts] == [4, 2, 1, 1, 2, 1, 1]
    assert await rig.outbox.entries() == []


async def test_a_single_result_too_large_is_kept_and_reported_as_failed(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.server.handler = lambda req: Reply(413) if len(req.body) > 2000 else accept_all(req)
    entry = await rig.outbox.add(1, [big_item("a")])
    result = await rig.deliverer().deliver(entry)
    assert list(result.rejected) == ["Sa"]
    assert result.rejected["Sa"][1].startswith("result too large for the server (HTTP 413")
    # The image gets a recorded failure instead of waiting out its lease ...
    substitute = rig.posts[-1].json()["results"][0]
    assert substitute["result"]["error"].startswith("result too large")
    # ... and the result itself stays on disk for an operator.
    [kept] = await rig.outbox.entries("rejected")
    assert json.loads(kept.body)["results"][0]["result"]["padding"][0] == 0.5
    assert "too large to deliver" in caplog.text


async def test_other_4xx_keeps_the_batch_as_rejected(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.server.handler = Script(Reply(422, {"detail": "results[0].result: field required"}))
    entry = await rig.outbox.add(1, items("a", "b"))
    result = await rig.deliverer().deliver(entry)
    assert set(result.rejected) == {"Sa", "Sb"}
    assert len(rig.posts) == 1  # not retried
    [kept] = await rig.outbox.entries("rejected")
    assert kept.last_error == "HTTP 422: results[0].result: field required"
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "results[0].result: field required" in record.getMessage()
    assert "a, b" in record.getMessage()


async def test_items_rejected_in_a_2xx_are_warned_about(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    def reject_b(req: Request) -> Reply:
        tasks = [
            {"reply_subject": "Sa", "status": "accepted"},
            {"reply_subject": "Sb", "status": "rejected", "reason": "image not in this job"},
            {"reply_subject": "Sc", "status": "duplicate"},
        ]
        return Reply(200, {"status": "accepted", "job_id": 1, "results_queued": 3, "tasks": tasks})

    rig.server.handler = reject_b
    caplog.set_level(logging.WARNING)
    entry = await rig.outbox.add(1, items("a", "b", "c"))
    result = await rig.deliverer().deliver(entry)
    assert result.rejected == {"Sb": ("b", "image not in this job")}
    assert set(result.failed) == {"Sa", "Sc"}
    assert await rig.outbox.entries() == [] and await rig.outbox.entries("rejected") == []
    assert "job 1: server rejected the result of image b: image not in this job" in caplog.text


async def test_a_2xx_without_json_counts_as_stored(rig: Rig) -> None:
    rig.server.handler = Script(Reply(201, b"OK"))
    entry = await rig.outbox.add(1, items("a"))
    result = await rig.deliverer().deliver(entry)
    assert result.failed == {"Sa": "a"}
    assert await rig.outbox.entries() == []


async def test_deadline_keeps_the_batch_and_names_the_images(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.server.handler = lambda req: Reply(503, {"detail": "database unavailable"})
    entry = await rig.outbox.add(1, items("a", "b"))
    started = time.monotonic()
    result = await rig.deliverer(deadline_s=0.4).deliver(entry)
    assert 0.35 < time.monotonic() - started < 2
    assert result.kept == {"Sa": "a", "Sb": "b"} and result.kept_entry_ids == [entry.id]
    [pending] = await rig.outbox.entries()
    assert pending.attempts >= 2 and "database unavailable" in (pending.last_error or "")
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "images: a, b" in record.getMessage()


async def test_a_hanging_post_is_cut_off_by_the_deadline(rig: Rig) -> None:
    gate = threading.Event()  # the server answers only once this is set (or after 10 s)
    rig.server.handler = lambda req: Reply(200, b"", wait=gate)
    entry = await rig.outbox.add(1, items("a"))
    started = time.monotonic()
    result = await rig.deliverer(deadline_s=0.3).deliver(entry)
    gate.set()
    assert time.monotonic() - started < 1.5
    assert result.kept == {"Sa": "a"}
    assert len(await rig.outbox.entries()) == 1


async def test_abort_and_cutoff_stop_retrying_at_once(rig: Rig) -> None:
    rig.server.handler = lambda req: Reply(503)
    deliverer = rig.deliverer(deadline_s=30, cap_s=0.05)
    entry = await rig.outbox.add(1, items("a"))
    task = asyncio.create_task(deliverer.deliver(entry))
    await until(lambda: len(rig.posts) >= 2)
    started = time.monotonic()
    deliverer.set_cutoff(time.monotonic())
    result = await asyncio.wait_for(task, 5)
    assert time.monotonic() - started < 1
    assert result.kept == {"Sa": "a"}

    second = rig.deliverer(deadline_s=30)
    second.abort()
    result = await second.deliver(entry)
    assert result.kept == {"Sa": "a"}
    assert len(await rig.outbox.entries()) == 1
