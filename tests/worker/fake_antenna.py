"""A stand-in for a server the trapline server is not: plain Antenna, or one that sends junk.

Most worker tests run against the real trapline server. This fake is for what
that server never does: answer as a plain Antenna server (no capabilities, no
extend or release, job lists in small pages) and hand out malformed tasks. It
builds the worker API of docs/protocol.md on a :class:`LocalServer`; token
``secret``. Image URLs point nowhere: use it with pipelines that need no pixels.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tests.worker.local_server import LocalServer, Reply, Request

TOKEN = "secret"


@dataclass
class FakeJob:
    id: int
    pipeline_slug: str
    images: dict[str, str]
    ready: deque[str] = field(default_factory=deque)
    leases: dict[str, str] = field(default_factory=dict)
    issued: dict[str, str] = field(default_factory=dict)
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    raw_tasks: list[Any] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return len(self.outcomes) == len(self.images)


class FakeAntenna:
    """The worker API over a :class:`LocalServer`; ``trapline=False`` is plain Antenna."""

    def __init__(self, *, trapline: bool = True, page_size: int = 2) -> None:
        self.trapline = trapline
        self.page_size = page_size
        self.lock = threading.Lock()
        self.jobs: dict[int, FakeJob] = {}
        self.calls: list[tuple[str, int]] = []
        self.list_offsets: list[int] = []
        self._seq = 0
        self.server = LocalServer(self.handle)

    # -- set-up --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.server.url

    def add_job(self, job_id: int, slug: str, image_ids: list[str]) -> FakeJob:
        urls = {i: f"http://images.invalid/{job_id}/{i}.jpg" for i in image_ids}
        job = FakeJob(job_id, slug, urls)
        job.ready.extend(image_ids)
        with self.lock:
            self.jobs[job_id] = job
        return job

    def inject_task(self, job_id: int, raw: Any, image_id: str | None = None) -> None:
        """Hand out ``raw`` as-is on the next reserve; its receipt counts as issued for ``image_id``."""
        with self.lock:
            job = self.jobs[job_id]
            job.raw_tasks.append(raw)
            subject = raw.get("reply_subject") if isinstance(raw, dict) else None
            if image_id is not None and isinstance(subject, str):
                if image_id in job.ready:
                    job.ready.remove(image_id)
                job.issued[subject] = image_id
                job.leases[subject] = image_id

    # -- routing -------------------------------------------------------------------------------

    def handle(self, req: Request) -> Reply:
        parts = [p for p in req.path.split("/") if p]
        if req.headers.get("authorization") != f"Token {TOKEN}":
            return Reply(401, {"detail": "missing or unknown token"})
        if parts == ["api", "v2", "capabilities"]:
            if not self.trapline:
                return Reply(404, {"detail": "Not found."})
            return Reply(
                200,
                {
                    "trapline": "test",
                    "lease_extension": True,
                    "release": True,
                    "ack_wait_seconds": 30,
                    "max_deliver": 3,
                },
            )
        if parts == ["api", "v2", "jobs"] and req.method == "GET":
            return self._list(req)
        if parts[:3] == ["api", "v2", "projects"] and parts[-1] == "pipelines":
            return Reply(
                200, {"pipelines_created": [], "pipelines_updated": [], "processing_service_id": 1}
            )
        if parts[:3] == ["api", "v2", "jobs"] and len(parts) >= 5:
            with self.lock:
                job = self.jobs.get(int(parts[3]))
            if job is None:
                return Reply(404, {"detail": "job not found"})
            action = "/".join(parts[4:])
            if action == "tasks":
                return self._reserve(req, job)
            if action == "result":
                return self._result(req, job)
            if action in ("tasks/extend", "tasks/release") and self.trapline:
                return self._receipts(req, job, action.removeprefix("tasks/"))
        return Reply(404, {"detail": "Not found."})

    def _list(self, req: Request) -> Reply:
        slugs = req.query.get("pipeline__slug__in", "").split(",")
        offset = int(req.query.get("offset", "0"))
        with self.lock:
            rows = [
                {"id": j.id, "pipeline_slug": j.pipeline_slug}
                for j in sorted(self.jobs.values(), key=lambda j: j.id)
                if j.pipeline_slug in slugs and not j.complete
            ]
            self.calls.append(("list", 0))
            self.list_offsets.append(offset)
        page = rows[offset : offset + self.page_size]
        nxt = None
        if offset + self.page_size < len(rows):
            query = "&".join(f"{k}={v}" for k, v in req.query.items() if k != "offset")
            nxt = f"{self.url}/api/v2/jobs?{query}&offset={offset + self.page_size}"
        return Reply(200, {"count": len(rows), "next": nxt, "previous": None, "results": page})

    def _reserve(self, req: Request, job: FakeJob) -> Reply:
        size = int((req.json() or {}).get("batch_size", 1))
        tasks: list[Any] = []
        with self.lock:
            self.calls.append(("reserve", job.id))
            while job.raw_tasks and len(tasks) < size:
                tasks.append(job.raw_tasks.pop(0))
            while job.ready and len(tasks) < size:
                image_id = job.ready.popleft()
                self._seq += 1
                subject = f"$JS.ACK.job{job.id}.{self._seq}"
                job.leases[subject] = image_id
                job.issued[subject] = image_id
                tasks.append(
                    {
                        "id": f"{job.id}:{image_id}",
                        "image_id": image_id,
                        "image_url": job.images[image_id],
                        "reply_subject": subject,
                    }
                )
        return Reply(200, {"tasks": tasks})

    def _result(self, req: Request, job: FakeJob) -> Reply:
        items = req.json()["results"]
        answers = []
        with self.lock:
            self.calls.append(("result", job.id))
            for item in items:
                subject = item["reply_subject"]
                image_id = job.issued.get(subject)
                if image_id is None:
                    answers.append(
                        {"reply_subject": subject, "status": "rejected", "reason": "unknown"}
                    )
                    continue
                job.leases.pop(subject, None)
                status = "duplicate" if image_id in job.outcomes else "accepted"
                job.outcomes.setdefault(image_id, item["result"])
                answers.append({"reply_subject": subject, "status": status, "task_id": image_id})
        return Reply(
            200,
            {
                "status": "accepted",
                "job_id": job.id,
                "results_queued": len(items),
                "tasks": answers,
            },
        )

    def _receipts(self, req: Request, job: FakeJob, action: str) -> Reply:
        subjects = req.json()["reply_subjects"]
        done, unknown = [], []
        with self.lock:
            self.calls.append((action, job.id))
            for subject in subjects:
                image_id = job.leases.get(subject)
                if image_id is None:
                    unknown.append(subject)
                    continue
                done.append(subject)
                if action == "release":
                    del job.leases[subject]
                    job.ready.appendleft(image_id)
        key = "extended" if action == "extend" else "released"
        return Reply(200, {key: done, "unknown": unknown})

    # -- queries for assertions ----------------------------------------------------------------

    def count(self, action: str, job_id: int | None = None) -> int:
        with self.lock:
            return sum(1 for a, j in self.calls if a == action and (job_id is None or j == job_id))

    def outcomes(self, job_id: int) -> dict[str, dict[str, Any]]:
        with self.lock:
            return dict(self.jobs[job_id].outcomes)

    def at_rest(self, job_id: int) -> tuple[int, int, int]:
        """(ready, leased, with outcome) of a job."""
        with self.lock:
            job = self.jobs[job_id]
            return len(job.ready), len(job.leases), len(job.outcomes)
