"""The held-tasks registry (one count per task) and lease extension."""

from __future__ import annotations

from pathlib import Path

from tests.worker.local_server import LocalServer, Reply, Request
from trapline.worker.client import WorkerClient
from trapline.worker.leases import HeldTask, HeldTasks, LeaseExtender, Outcome, TaskState


def task(job: int, image: str) -> HeldTask:
    return HeldTask(job, f"{job}:{image}", image, f"http://x/{image}", f"S{job}.{image}")


def test_every_task_is_counted_once_per_outcome() -> None:
    held = HeldTasks()
    held.add([task(1, "a"), task(1, "b"), task(1, "c"), task(2, "d")])
    held.add([task(1, "a")])  # the same receipt again is not a second task
    assert len(held) == 4 and held.jobs() == {1, 2}
    held.set_state(["S1.a", "S1.b"], TaskState.COMPUTING)
    assert held.states()[TaskState.COMPUTING] == 2

    assert [t.image_id for t in held.settle(["S1.a", "S1.zzz"], Outcome.DELIVERED)] == ["a"]
    held.settle(["S1.a"], Outcome.FAILED)  # already settled: ignored
    held.settle(["S1.b"], Outcome.KEPT)
    held.settle(["S1.c"], Outcome.RELEASED)
    held.settle(["S2.d"], Outcome.ABANDONED)
    one, two = held.tallies()
    assert one.reserved == 3 and one.settled == 3
    assert (one.counts[Outcome.DELIVERED], one.counts[Outcome.KEPT]) == (1, 1)
    assert one.problem_ids[Outcome.KEPT] == ["b"] and not one.clean
    assert two.problem_ids[Outcome.ABANDONED] == ["d"]
    assert len(held) == 0

    # A kept result delivered later (outbox sweep) moves to its real outcome.
    assert held.kept_subjects() == {1: ["S1.b"]}
    assert held.resettle_kept("S1.b", Outcome.DELIVERED)
    assert not held.resettle_kept("S1.b", Outcome.DELIVERED)
    assert one.counts[Outcome.KEPT] == 0 and one.counts[Outcome.DELIVERED] == 2
    assert one.clean and one.problem_ids[Outcome.KEPT] == []


async def test_extension_drops_unknown_receipts_and_reports_gone_jobs(
    tmp_path: Path, local_server: list[LocalServer]
) -> None:
    def handler(req: Request) -> Reply:
        if req.path == "/api/v2/jobs/1/tasks/extend/":
            subjects = req.json()["reply_subjects"]
            return Reply(200, {"extended": subjects[:1], "unknown": subjects[1:]})
        return Reply(404, {"detail": "job not found"})

    server = LocalServer(handler).start()
    local_server.append(server)
    held = HeldTasks()
    held.add([task(1, "a"), task(1, "b"), task(2, "c")])
    gone: list[int] = []
    client = WorkerClient(server.url, "t", worker_name="w", worker_id="i")
    try:
        extender = LeaseExtender(client, held, 10, on_job_gone=gone.append)
        await extender.extend_once()
        assert held.extendable_by_job() == {1: ["S1.a"], 2: ["S2.c"]}
        assert gone == [2]
        await extender.extend_once()
    finally:
        await client.aclose()
    bodies = [r.json() for r in server.requests_to("POST", "/api/v2/jobs/1/tasks/extend/")]
    # One call per job; the receipt the server did not know is not sent again.
    assert bodies == [{"reply_subjects": ["S1.a", "S1.b"]}, {"reply_subjects": ["S1.a"]}]
    assert "b" in {t.image_id for t in held.for_job(1)}  # still held: its result will be delivered
